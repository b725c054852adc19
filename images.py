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
            # Pillow has no 16-bit colour mode: it keeps the high byte of each sample (v >> 8), one level below
            # round(v / 257) for about half the values. Those files are decoded in full instead.
            deep = im.format == "PNG" and im.mode in ("RGB", "RGBA") and im.tile and im.tile[0][3].endswith(";16B")
            exif = im.info.get("exif")
            im.load()
            if deep and _have_pypng():
                im = _png_16bit_colour_to_8bit(path, exif)
            im = PIL.ImageOps.exif_transpose(im)
    except Exception as e:
        raise ValueError(f"cannot read image {path}: {e}") from e
    return to_rgb8(im)


def _have_pypng() -> bool:
    try:
        import png  # noqa: F401
    except ImportError:  # a ComfyUI environment without the CLI's dependencies: Pillow's high byte it is
        import warnings

        warnings.warn("16-bit colour PNG read with Pillow's 8-bit truncation; `pip install pypng` for exact "
                      "rounding", stacklevel=3)
        return False
    return True


def _png_16bit_colour_to_8bit(path, exif):
    """A 16-bit RGB(A) PNG -> 8-bit RGB(A) PIL image, each sample rounded as round(v / 65535 * 255)."""
    import numpy as np
    import PIL.Image
    import png  # pypng: a small pure-Python decoder that keeps all 16 bits

    width, height, rows, info = png.Reader(filename=str(path)).asDirect()
    channels = info["planes"]
    arr = np.vstack([np.asarray(row, dtype=np.uint32) for row in rows]).reshape(height, width, channels)
    arr8 = ((arr * 255 + 32767) // 65535).astype(np.uint8)  # integer round-half-up of v * 255 / 65535
    im = PIL.Image.fromarray(arr8, mode="RGBA" if channels == 4 else "RGB")
    if exif:
        im.info["exif"] = exif
    return im


def to_tensor(pil_images):
    """8-bit RGB PIL images of one size -> float tensor [B,3,H,W] in [-1,1]."""
    import numpy as np
    import torch

    arr = np.stack([np.asarray(im, dtype=np.float32) / 127.5 - 1 for im in pil_images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2)
