"""Images in and out of every front end (CLI, pipeline, demo, evaluation): find, load, convert to 8-bit RGB.

One place decides how an unusual picture becomes the RGB the model sees: EXIF rotation applied, 16-bit and
32-bit integer images scaled (not clipped) to 8 bits, float images taken as [0,1], transparency composited on
white.
"""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}


def find_images(inputs) -> list[Path]:
    """Files, and image files under folders (recursively, sorted), in the order given."""
    files = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in folder {path}")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def to_rgb8(im):
    """A PIL image of any mode -> 8-bit RGB of the same picture."""
    import numpy as np
    import PIL.Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(im).astype(np.float64)
        # 16-bit modes span 0..65535; mode "I" (32-bit) holds 16-bit data when PIL widened it, else 8-bit data
        top = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = PIL.Image.fromarray((arr / top * 255).round().clip(0, 255).astype(np.uint8))
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = PIL.Image.fromarray((np.nan_to_num(arr).clip(0, 1) * 255).round().astype(np.uint8))
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = PIL.Image.alpha_composite(background, rgba)
    return im.convert("RGB")


def load_image(path):
    """Any PIL-readable image file as 8-bit RGB (see :func:`to_rgb8`), EXIF rotation applied."""
    import PIL.Image
    import PIL.ImageOps

    try:
        with PIL.Image.open(path) as im:
            im.load()
            im = PIL.ImageOps.exif_transpose(im)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return to_rgb8(im)


def to_tensor(pil_images):
    """8-bit RGB PIL images of one size -> float tensor [B,3,H,W] in [-1,1]."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in pil_images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)
