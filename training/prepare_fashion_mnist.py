"""Fashion-MNIST (idx.gz files, e.g. Debian's ``dataset-fashion-mnist``) -> image folders for the training scripts.

    python -m flextok_kit.training.prepare_fashion_mnist --out runs/fashion/data [--per-class 1000] [--pad 2]

writes ``OUT/train/<class>/<index>.png`` and ``OUT/test/<class>/<index>.png`` (and with ``--eval-per-class N``
``OUT/eval/``: the first N test items of each class, a small balanced evaluation set) (grayscale, padded with the black
background to 32 x 32 by default so the /8 VAE and 2 x 2 patches tile the image). The folder names are the ten
class names, which the folder dataset turns into labels and the AR model's ``id2label``. The output folder is built
beside its final place and renamed into it, so an interrupted run leaves no half-written dataset.
"""
from __future__ import annotations

import argparse
import gzip
import struct
import tempfile
from pathlib import Path

import numpy as np

from ..flextok_core.fileio import replace_dir

DEFAULT_SOURCE = "/usr/share/datasets/fashion-mnist"
# Label order of the dataset; "/" cannot be in a folder name.
CLASSES = ["T-shirt-top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
SPLITS = {"train": "train", "test": "t10k"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzip or plain): magic ``0x0000 <dtype 0x08> <ndim>`` then big-endian int32 dims, uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path}: not a uint8 idx file (magic {data[:4].hex()!r})")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but holds {body.size} bytes")
    return body.reshape(dims)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """-> images ``[n, 28, 28]`` uint8, labels ``[n]``."""
    stem = SPLITS[split]
    paths = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        cands = [source / f"{stem}-{kind}{ext}" for ext in (".gz", "")]
        found = next((p for p in cands if p.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{cands[0]} not found: install the Debian package dataset-fashion-mnist "
                                    f"(apt-get install dataset-fashion-mnist) or pass --src")
        paths.append(found)
    images, labels = read_idx(paths[0]), read_idx(paths[1])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{source}: images {images.shape} and labels {labels.shape} do not match")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{paths[1]}: label {int(labels.max())} out of range 0..{len(CLASSES) - 1}")
    return images, labels


def write_split(images: np.ndarray, labels: np.ndarray, folder: Path, per_class: int | None, pad: int) -> int:
    from PIL import Image

    count = np.zeros(len(CLASSES), dtype=int)
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i, (img, y) in enumerate(zip(images, labels)):
        if per_class is not None and count[y] >= per_class:
            continue
        count[y] += 1
        if pad:
            img = np.pad(img, pad)
        Image.fromarray(img, mode="L").save(folder / CLASSES[y] / f"{i:05d}.png")
    return int(count.sum())


def prepare(out: str | Path, source: str | Path = DEFAULT_SOURCE, per_class: dict | None = None,
            pad: int = 2, eval_per_class: int | None = None) -> dict:
    """Write both splits to ``out``; ``per_class`` caps the images per class per split (``{"train": 1000}``);
    ``eval_per_class`` also writes ``eval/`` from the test split."""
    out, source = Path(out), Path(source)
    per_class = per_class or {}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    counts = {}
    for split in SPLITS:
        images, labels = load_split(source, split)
        counts[split] = write_split(images, labels, tmp / split, per_class.get(split), pad)
        if split == "test" and eval_per_class:
            counts["eval"] = write_split(images, labels, tmp / "eval", eval_per_class, pad)
    replace_dir(tmp, out)
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (gets train/ and test/)")
    p.add_argument("--src", default=DEFAULT_SOURCE, help="folder with the idx(.gz) files")
    p.add_argument("--per-class", type=int, help="at most this many training images per class (default: all)")
    p.add_argument("--test-per-class", type=int, help="at most this many test images per class (default: all)")
    p.add_argument("--eval-per-class", type=int, help="also write eval/: the first N test items of each class")
    p.add_argument("--pad", type=int, default=2, help="black border in pixels (2: 28 -> 32)")
    a = p.parse_args(argv)
    if a.pad < 0:
        p.error("--pad must be >= 0")
    counts = prepare(a.out, a.src, {"train": a.per_class, "test": a.test_per_class}, a.pad, a.eval_per_class)
    print(f"wrote {counts['train']} training and {counts['test']} test images"
          + (f" ({counts['eval']} in eval/)" if "eval" in counts else "") + f" of {28 + 2 * a.pad} px to {a.out}")


if __name__ == "__main__":
    main()
