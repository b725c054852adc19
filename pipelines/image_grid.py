"""Labelled image grids (the coarse-to-fine strip)."""
from __future__ import annotations

import os

import PIL.Image
import PIL.ImageDraw

from ..flextok_core.fileio import atomic_write


def labelled_grid(rows: list[list[PIL.Image.Image]], column_labels: list[str], pad: int = 4,
                  label_height: int = 14, row_labels: list[str] | None = None) -> PIL.Image.Image:
    """rows[r][c] images of one size -> one image with a label above each column (and left of each row)."""
    if not rows or not rows[0]:
        raise ValueError("labelled_grid needs at least one image")
    w, h = rows[0][0].size
    cols = len(rows[0])
    draw_probe = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    left = max((draw_probe.textlength(t) for t in row_labels), default=0) + pad if row_labels else 0
    left = int(left)
    grid = PIL.Image.new("RGB", (left + cols * (w + pad) + pad, len(rows) * (h + pad) + pad + label_height), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for c, label in enumerate(column_labels):
        draw.text((left + pad + c * (w + pad), 1), label, fill="black")
    for r, row in enumerate(rows):
        top = label_height + pad + r * (h + pad)
        if row_labels:
            draw.text((pad, top + h // 2 - 5), row_labels[r], fill="black")
        for c, im in enumerate(row):
            grid.paste(im.convert("RGB"), (left + pad + c * (w + pad), top))
    return grid


def save_image_atomic(image: PIL.Image.Image, path: str | os.PathLike) -> None:
    """Save through a temporary file and a rename, so no half-written image is ever left behind."""
    fmt = PIL.Image.registered_extensions().get(os.path.splitext(os.fspath(path))[1].lower(), "PNG")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt))
