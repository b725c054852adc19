"""Images in and out of every front end (CLI, ComfyUI nodes, pipeline, demo, evaluation, training): find, load,
convert to 8-bit RGB, fit to a size.

One place decides how an unusual picture becomes the RGB the model sees: EXIF rotation applied, 16-bit and
32-bit integer images scaled (not clipped) to 8 bits, float images taken as [0,1], transparency composited on
white.

One vocabulary says how an image is fitted to the size a model takes (:data:`FITS`), for PIL images and tensors:
``center-crop`` (scale, aspect kept, so the image covers the target, then cut the middle: what FlexTok was trained
on), ``resize`` (squash to the target) or ``none`` (keep the size; the front end checks that the model takes it).
:func:`center_box` is the one centre-crop box computation (fitting, and the training data's centre crops).
"""
from __future__ import annotations

from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm"}

FITS = ("center-crop", "resize", "none")
# the ComfyUI Encode node's names before the one vocabulary: saved workflows still hold them
FIT_ALIASES = {"center_crop": "center-crop", "stretch": "resize"}


def images_under(folder, suffixes=IMAGE_SUFFIXES) -> list[Path]:
    """Image files (by suffix) anywhere under ``folder``, sorted."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file())


def find_images(inputs) -> list[Path]:
    """Files, and image files under folders (recursively, sorted), in the order given."""
    files = []
    for item in [inputs] if isinstance(inputs, (str, Path)) else inputs:
        path = Path(item)
        if path.is_dir():
            found = images_under(path)
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


# -- fitting ------------------------------------------------------------------------------------------
def fit_mode(fit: str) -> str:
    """``fit`` in the one vocabulary (:data:`FITS`; the old node names of :data:`FIT_ALIASES` accepted)."""
    mode = FIT_ALIASES.get(fit, fit) if isinstance(fit, str) else fit
    if mode not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    return mode


def center_box(width: int, height: int, crop_width: int, crop_height: int) -> tuple[int, int, int, int]:
    """``(left, top, right, bottom)`` of the ``crop_width`` x ``crop_height`` window in the middle of a ``width`` x
    ``height`` image (an odd margin puts the extra pixel right / below)."""
    left, top = (width - crop_width) // 2, (height - crop_height) // 2
    return left, top, left + crop_width, top + crop_height


def cover_size(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int]:
    """``(width, height)`` of the image scaled, aspect kept, just enough to cover the target in both directions."""
    scale = max(target_width / width, target_height / height)
    return max(target_width, round(width * scale)), max(target_height, round(height * scale))


def fit_plan(width: int, height: int, size, fit: str):
    """What ``fit`` does to a ``width`` x ``height`` image for a target ``size`` (int: square, or (height, width)):
    ``(resize_to, box)``, each ``None`` when that step leaves the image as it is. ``resize_to`` is ``(w, h)``; ``box``
    is ``(left, top, right, bottom)`` in the resized image."""
    mode = fit_mode(fit)
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if mode == "none" or (width, height) == (tw, th):
        return None, None
    if mode == "resize":
        return (tw, th), None
    nw, nh = cover_size(width, height, tw, th)
    return ((nw, nh) if (nw, nh) != (width, height) else None), center_box(nw, nh, tw, th)


def fitted_size(width: int, height: int, size, fit: str) -> tuple[int, int]:
    """``(width, height)`` that :func:`fit_image` makes of a ``width`` x ``height`` image."""
    if fit_mode(fit) == "none":
        return width, height
    return (size, size) if isinstance(size, int) else (int(size[1]), int(size[0]))


def fit_image(im, size, fit: str = "center-crop"):
    """A PIL image fitted to ``size`` (int: square, or (height, width)) as ``fit`` says; resampling: PIL bicubic."""
    import PIL.Image

    resize_to, box = fit_plan(*im.size, size, fit)
    if resize_to is not None:
        im = im.resize(resize_to, PIL.Image.BICUBIC)
    return im if box is None else im.crop(box)


def fit_tensor(x, size, fit: str = "center-crop", value_range=(0.0, 1.0)):
    """Images ``[B,C,H,W]`` fitted to ``size`` (int: square, or (height, width)) as ``fit`` says; resampling: bicubic
    with antialiasing, clamped to ``value_range``."""
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    resize_to, box = fit_plan(int(w), int(h), size, fit)
    if resize_to is not None:
        x = F.interpolate(x, size=(resize_to[1], resize_to[0]), mode="bicubic", align_corners=False,
                          antialias=True).clamp(*value_range)
    if box is not None:
        left, top, right, bottom = box
        x = x[:, :, top:bottom, left:right]
    return x


def load_batch(inputs, size: int, fit: str = "center-crop", limit: int | None = None):
    """Image files / folders (see :func:`find_images`; the first ``limit``) -> float tensor ``[N,3,size,size]`` in
    [-1,1], each image loaded (:func:`load_image`) and fitted (:func:`fit_image`)."""
    paths = find_images([str(p) for p in ([inputs] if isinstance(inputs, (str, Path)) else inputs)])
    if limit:
        paths = paths[:limit]
    fitted = [fit_image(load_image(p), size, fit) for p in paths]
    if len({im.size for im in fitted}) > 1:
        raise ValueError(f"fit={fit!r} leaves images of several sizes; use center-crop or resize")
    return to_tensor(fitted).contiguous()
