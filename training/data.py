"""Image data for training: image folders, webdataset-style tar shards, Hugging Face ``datasets``.

Everything here is worker-safe (sources hold only paths and offsets, files are read with ``os.pread`` through a
per-process descriptor cache) and deterministic: the crop and flip of a sample depend only on
``(seed, epoch, index)``, never on the worker or on the global RNG, so a resumed run sees exactly the pixels an
uninterrupted run would have seen.

Unreadable images never stop a run: a map-style dataset falls through to the next index (the same on every
rank), logs the file (the first few, then every 100th) and counts the skip in the batch's ``skipped`` field, which
the scripts sum and log.

A batch is a dict: ``pixels`` uint8 ``[B,3,H,W]``, ``label`` int64 ``[B]`` (-1 when unknown), ``index`` int64
``[B]`` (dataset index), ``skipped`` int64 ``[B]`` and ``caption`` (list of str, "" when unknown). Convert pixels
with :func:`to_float` (``[-1, 1]``).
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, IterableDataset, Sampler

from ..images import IMAGE_SUFFIXES, center_box, images_under, to_rgb8

logger = logging.getLogger(__name__)

IMAGE_EXTS = IMAGE_SUFFIXES  # the one list of image suffixes (images.py)
CAPTION_EXTS = ("txt", "caption", "text")
LABEL_EXTS = ("cls", "label", "cls.txt")

# -------------------------------------------------------------------------------------------------------------
# Error accounting (per process; the batch field ``skipped`` is what reaches the training loop)
_bad_count = 0


def _report_bad(source: str, err: BaseException) -> None:
    global _bad_count
    _bad_count += 1
    if _bad_count <= 10 or _bad_count % 100 == 0:
        logger.warning("skipping unreadable image %s (%s: %s) [%d skipped in this process]",
                       source, type(err).__name__, err, _bad_count)


def to_float(pixels: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` -> ``[-1, 1]``."""
    return pixels.to(dtype) / 127.5 - 1.0


# -------------------------------------------------------------------------------------------------------------
# Transforms (PIL + numpy; no torchvision)
def sample_rrc_box(width: int, height: int, rng: np.random.Generator, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3)):
    """Random-resized-crop box ``(x0, y0, x1, y1)`` (torchvision's algorithm, own RNG)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            x0 = int(rng.integers(0, width - w + 1))
            y0 = int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    # fallback: central crop with the ratio clamped to the allowed range
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


class ImageTransform:
    """Opened PIL image -> uint8 tensor ``[3, size, size]``.

    ``crop``: ``random_resized`` (the paper's augmentation, ``scale`` of the area and ``ratio`` range), ``center``
    (short side to ``size``, centre square; deterministic, for tokenizing and evaluation) or ``resize`` (whole image
    squashed). ``hflip`` is the flip probability. JPEGs are decoded at a reduced scale (``draft``) when the crop
    stays at least ``size`` pixels, which makes large photos cheap.
    """

    def __init__(self, size: int, crop: str = "random_resized", scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3),
                 hflip: float = 0.5):
        if crop not in ("random_resized", "center", "resize"):
            raise ValueError(f"crop must be random_resized, center or resize, got {crop!r}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
        self.size = int(size)
        self.crop = crop
        self.scale = tuple(float(s) for s in scale)
        self.ratio = tuple(float(r) for r in ratio)
        self.hflip = float(hflip)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        width, height = img.size
        if self.crop == "random_resized":
            box = sample_rrc_box(width, height, rng, self.scale, self.ratio)
        elif self.crop == "center":  # the largest centred square (images.center_box), resampled to size
            side = min(width, height)
            box = center_box(width, height, side, side)
        else:
            box = (0, 0, width, height)
        flip = self.hflip > 0 and rng.random() < self.hflip
        # decode JPEGs at 1/2, 1/4 or 1/8 scale when the crop keeps >= size pixels
        bw, bh = box[2] - box[0], box[3] - box[1]
        factor = min(bw, bh) / self.size
        if img.format == "JPEG" and factor >= 2:
            reduce = 2 ** min(3, int(math.log2(factor)))
            img.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
            sx, sy = img.size[0] / width, img.size[1] / height
            box = (box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy)
        img = img if img.mode == "RGB" else to_rgb8(img)  # the front ends' RGB conversion (images.to_rgb8)
        out = img.resize((self.size, self.size), resample=Image.BICUBIC, box=box)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(out, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def build_transform(cfg) -> ImageTransform:
    return ImageTransform(cfg["resolution"], cfg.get("crop", "random_resized"), cfg.get("crop_scale", (0.4, 1.0)),
                          cfg.get("crop_ratio", (3 / 4, 4 / 3)), cfg.get("hflip", 0.5))


# -------------------------------------------------------------------------------------------------------------
# Sources: index -> (raw bytes or PIL image, label, caption, source id)
_fd_cache: dict = {}


def _pread(path: str, offset: int, size: int) -> bytes:
    key = (os.getpid(), path)
    fd = _fd_cache.get(key)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        _fd_cache[key] = fd
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise OSError(f"short read ({len(data)} of {size} bytes) at offset {offset}")
    return data


class ImageFolderSource:
    """Every image below ``root`` (recursive, sorted). With ``class_from_folder`` the first-level sub-folder is the
    class (sorted names -> 0..C-1); images directly in ``root`` then get label -1. A sidecar ``<stem>.txt`` is the
    caption."""

    def __init__(self, root: str, class_from_folder: bool = True, extensions=IMAGE_EXTS):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        files = images_under(self.root, extensions)
        if not files:
            raise ValueError(f"no images ({', '.join(sorted(extensions))}) found below {root!r}")
        self.files = [str(p.relative_to(self.root)) for p in files]
        tops = [Path(f).parts[0] if len(Path(f).parts) > 1 else None for f in self.files]
        self.classes = sorted({t for t in tops if t is not None}) if class_from_folder else []
        idx = {c: i for i, c in enumerate(self.classes)}
        self.labels = [idx.get(t, -1) if t is not None else -1 for t in tops]

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, i: int) -> str:
        return str(self.root / self.files[i])

    def get(self, i: int):
        path = self.root / self.files[i]
        cap = path.with_suffix(".txt")
        caption = cap.read_text(encoding="utf-8").strip() if cap.is_file() else ""
        return Image.open(path), self.labels[i], caption, self.files[i]


def expand_shards(spec) -> list[str]:
    """A glob, a directory (all ``*.tar`` in it), a brace range ``shard-{000..009}.tar`` or a list of them."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for s in specs:
        s = str(s)
        if os.path.isdir(s):
            out += sorted(glob.glob(os.path.join(s, "*.tar")))
            continue
        if "{" in s and ".." in s:
            pre, rest = s.split("{", 1)
            rng, post = rest.split("}", 1)
            a, b = rng.split("..")
            out += [f"{pre}{str(i).zfill(len(a))}{post}" for i in range(int(a), int(b) + 1)]
            continue
        matches = sorted(glob.glob(s))
        out += matches if matches else ([s] if os.path.exists(s) else [])
    if not out:
        raise FileNotFoundError(f"no tar shards match {spec!r}")
    return out


def _split_key(name: str):
    base = os.path.basename(name)
    d = os.path.dirname(name)
    if "." not in base:
        return name, ""
    stem, ext = base.split(".", 1)
    return (f"{d}/{stem}" if d else stem), ext.lower()


class TarShardSource:
    """Webdataset-style uncompressed tar shards read with the stdlib: members sharing a key (path up to the first dot
    of the basename) form a sample; ``jpg/png/webp/...`` is the image, ``cls``/``label`` the class, ``txt`` the
    caption, ``json`` may hold ``label``/``cls``/``caption``/``text``. The shards are indexed once (headers only,
    small label/caption members are read), then images are read by offset, so the dataset is map-style."""

    def __init__(self, shards, label_key: str | None = None):
        self.shards = expand_shards(shards)
        self.records: list[tuple[int, int, int, str]] = []  # shard idx, offset, size, key
        self.labels: list[int] = []
        self.captions: list[str] = []
        for si, path in enumerate(self.shards):
            if path.endswith((".gz", ".tgz", ".bz2", ".xz", ".zst")):
                raise ValueError(f"{path}: compressed tar shards cannot be read by offset; use plain .tar shards")
            self._index(si, path, label_key)
        if not self.records:
            raise ValueError(f"no images found in {len(self.shards)} tar shards ({self.shards[0]}, ...)")
        self.classes: list = []

    def _index(self, si: int, path: str, label_key):
        samples: dict[str, dict] = {}
        order: list[str] = []
        with tarfile.open(path, "r:") as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = _split_key(m.name)
                if key not in samples:
                    samples[key] = {}
                    order.append(key)
                s = samples[key]
                last = "." + ext.rsplit(".", 1)[-1]
                if last in IMAGE_EXTS and "image" not in s:
                    s["image"] = (m.offset_data, m.size)
                elif ext in LABEL_EXTS or ext in CAPTION_EXTS or ext == "json":
                    try:
                        text = tf.extractfile(m).read().decode("utf-8").strip()
                    except Exception as e:  # noqa: BLE001 - a bad side file only loses its label
                        logger.warning("%s: cannot read %s (%s)", path, m.name, e)
                        continue
                    if ext in LABEL_EXTS:
                        s["label"] = text
                    elif ext in CAPTION_EXTS:
                        s["caption"] = text
                    else:
                        try:
                            j = json.loads(text)
                        except ValueError:
                            continue
                        if isinstance(j, dict):
                            for k in ((label_key,) if label_key else ("label", "cls", "class")):
                                if k in j:
                                    s.setdefault("label", j[k])
                                    break
                            for k in ("caption", "text", "txt"):
                                if k in j:
                                    s.setdefault("caption", j[k])
                                    break
        for key in order:
            s = samples[key]
            if "image" not in s:
                continue
            try:
                label = int(s.get("label", -1))
            except (TypeError, ValueError):
                label = -1
            self.records.append((si, s["image"][0], s["image"][1], key))
            self.labels.append(label)
            self.captions.append(str(s.get("caption", "")))

    def __len__(self) -> int:
        return len(self.records)

    def describe(self, i: int) -> str:
        si, _, _, key = self.records[i]
        return f"{self.shards[si]}:{key}"

    def get(self, i: int):
        si, off, size, key = self.records[i]
        data = _pread(self.shards[si], off, size)
        source_id = f"{os.path.basename(self.shards[si])}:{key}"
        return Image.open(io.BytesIO(data)), self.labels[i], self.captions[i], source_id


def _require_datasets():
    try:
        import datasets  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("data.type=hf needs the optional dependency `datasets` "
                          "(pip install 'flextok-kit[train]' or pip install datasets)") from e
    return datasets


def _open_hf_image(value):
    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return Image.open(io.BytesIO(value["bytes"]))
        if value.get("path"):
            return Image.open(value["path"])
    if isinstance(value, (bytes, bytearray)):
        return Image.open(io.BytesIO(value))
    if isinstance(value, str):
        return Image.open(value)
    if isinstance(value, np.ndarray):
        return Image.fromarray(value)
    raise TypeError(f"cannot read an image from a {type(value).__name__}")


def load_hf_dataset(cfg):
    """``datasets.load_from_disk`` for a saved dataset folder, else ``datasets.load_dataset`` (hub or local)."""
    datasets = _require_datasets()
    path = cfg["path"]
    split = cfg.get("split") or "train"
    if os.path.isdir(path) and (os.path.isfile(os.path.join(path, "dataset_info.json"))
                                or os.path.isfile(os.path.join(path, "dataset_dict.json"))):
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        if cfg.get("streaming"):
            ds = ds.to_iterable_dataset(num_shards=max(1, int(cfg.get("num_shards") or 1)))
        return ds
    kwargs = dict(cfg.get("hf_kwargs") or {})
    return datasets.load_dataset(path, cfg.get("hf_name"), split=split, streaming=bool(cfg.get("streaming")), **kwargs)


def _pick_column(names, wanted, candidates):
    if wanted:
        if wanted not in names:
            raise KeyError(f"column {wanted!r} not in the dataset (columns: {sorted(names)})")
        return wanted
    for c in candidates:
        if c in names:
            return c
    return None


class HFSource:
    """A map-style Hugging Face dataset. Image columns are read undecoded and decoded here (errors are skips)."""

    def __init__(self, ds, image_column=None, label_column=None, caption_column=None):
        datasets = _require_datasets()
        names = ds.column_names
        self.image_column = _pick_column(names, image_column, ("image", "img", "jpg", "png", "webp"))
        if self.image_column is None:
            raise KeyError(f"no image column found (columns: {names}); set data.image_column")
        self.label_column = _pick_column(names, label_column, ("label", "labels", "cls", "class"))
        self.caption_column = _pick_column(names, caption_column, ("caption", "text", "txt", "prompt"))
        feat = ds.features.get(self.image_column) if ds.features else None
        if isinstance(feat, datasets.Image):
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        lf = ds.features.get(self.label_column) if (ds.features and self.label_column) else None
        self.classes = list(lf.names) if isinstance(lf, datasets.ClassLabel) else []
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def describe(self, i: int) -> str:
        return f"row {i} of {getattr(self.ds, 'info', None) and self.ds.info.dataset_name or 'the dataset'}"

    def get(self, i: int):
        row = self.ds[int(i)]
        label = row.get(self.label_column, -1) if self.label_column else -1
        caption = row.get(self.caption_column, "") if self.caption_column else ""
        return _open_hf_image(row[self.image_column]), int(label if label is not None else -1), \
            str(caption or ""), f"{i}"


# -------------------------------------------------------------------------------------------------------------
# Datasets
def _describe(source, i: int) -> str:
    try:
        return source.describe(i)
    except Exception:  # noqa: BLE001
        return f"item {i}"

class ImageDataset(Dataset):
    """Map-style dataset over a source. Keys are ``(index, epoch)`` (from :class:`EpochSampler`) or plain ints
    (epoch 0); the augmentation RNG is seeded with ``(seed, epoch, index)``."""

    def __init__(self, source, transform: ImageTransform, seed: int = 0, max_consecutive_failures: int = 64):
        self.source = source
        self.transform = transform
        self.seed = int(seed)
        self.max_consecutive_failures = max_consecutive_failures

    @property
    def classes(self):
        return getattr(self.source, "classes", [])

    @property
    def num_classes(self) -> int:
        labels = getattr(self.source, "labels", None)
        if self.classes:
            return len(self.classes)
        if labels:
            return max(labels) + 1
        return 0

    def __len__(self) -> int:
        return len(self.source)

    def try_load(self, index: int, epoch: int = 0) -> dict | None:
        """The sample at ``index`` exactly (no fall-through); None (logged) when it cannot be read."""
        try:
            img, label, caption, source_id = self.source.get(index)
            pixels = self.transform(img, np.random.default_rng([self.seed, epoch, index]))
        except Exception as e:  # noqa: BLE001
            _report_bad(_describe(self.source, index), e)
            return None
        return {"pixels": pixels, "label": int(label), "caption": caption, "index": index, "skipped": 0,
                "source": source_id}

    def load(self, index: int, epoch: int = 0) -> dict:
        n = len(self.source)
        for attempt in range(self.max_consecutive_failures):
            i = (index + attempt) % n
            try:
                img, label, caption, source_id = self.source.get(i)
                rng = np.random.default_rng([self.seed, epoch, i])
                pixels = self.transform(img, rng)
            except Exception as e:  # noqa: BLE001 - any decoding problem is a skip, not a crash
                _report_bad(_describe(self.source, i), e)
                continue
            return {"pixels": pixels, "label": int(label), "caption": caption, "index": i, "skipped": attempt,
                    "source": source_id}
        raise RuntimeError(f"{self.max_consecutive_failures} consecutive unreadable images from index {index}: "
                           "is the data path right?")

    def __getitem__(self, key) -> dict:
        if isinstance(key, (tuple, list)):
            return self.load(int(key[0]), int(key[1]))
        return self.load(int(key), 0)


class EpochSampler(Sampler):
    """Yields ``(index, epoch)``; the order is a permutation seeded with ``(seed, epoch)`` (or sequential)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = int(n), int(seed), bool(shuffle), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        epoch = self.epoch
        return iter([(i, epoch) for i in order])

    def __len__(self) -> int:
        return self.n


class KeyedDataset(Dataset):
    """``dataset.try_load(index, epoch)`` for a fixed list of ``(index, epoch)`` keys (no fall-through: unreadable
    items become ``None`` and are dropped by :func:`collate`). For tokenizing and latent caching."""

    def __init__(self, dataset: ImageDataset, keys: Sequence[tuple[int, int]]):
        self.dataset, self.keys = dataset, list(keys)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, j: int):
        i, epoch = self.keys[j]
        item = self.dataset.try_load(int(i), int(epoch))
        if item is not None:
            item["view"] = int(epoch)
        return item


def keyed_loader(dataset: ImageDataset, keys, batch_size: int, num_workers: int = 0) -> DataLoader:
    kw = dict(num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    if num_workers > 0:
        kw["prefetch_factor"] = 2
    return DataLoader(KeyedDataset(dataset, keys), batch_size=batch_size, shuffle=False, collate_fn=collate, **kw)


def collate(items: list[dict]) -> dict:
    """Stack samples; ``None`` items (unreadable, from :meth:`ImageDataset.try_load`) are dropped and counted in
    ``dropped``."""
    dropped = sum(it is None for it in items)
    items = [it for it in items if it is not None]
    if not items:
        return {"pixels": torch.zeros(0, 3, 1, 1, dtype=torch.uint8), "label": torch.zeros(0, dtype=torch.long),
                "index": torch.zeros(0, dtype=torch.long), "skipped": torch.zeros(0, dtype=torch.long),
                "caption": [], "source": [], "dropped": dropped}
    out: dict[str, Any] = {"pixels": torch.stack([torch.as_tensor(it["pixels"]) for it in items])}
    for key in ("label", "index", "skipped"):
        out[key] = torch.tensor([int(it.get(key, -1 if key == "label" else 0)) for it in items], dtype=torch.long)
    out["caption"] = [str(it.get("caption", "")) for it in items]
    out["source"] = [str(it.get("source", "")) for it in items]
    if "view" in items[0]:
        out["view"] = torch.tensor([int(it["view"]) for it in items], dtype=torch.long)
    out["dropped"] = dropped
    return out


class StreamingTransform:
    """``datasets.IterableDataset.map`` function for streaming data: decode + augment, mark failures."""

    def __init__(self, transform, image_column, label_column, caption_column, seed):
        self.transform, self.seed = transform, int(seed)
        self.image_column, self.label_column, self.caption_column = image_column, label_column, caption_column

    def __call__(self, row, idx):
        try:
            img = _open_hf_image(row[self.image_column])
            pixels = self.transform(img, np.random.default_rng([self.seed, 1, int(idx)])).numpy()
            ok = True
        except Exception as e:  # noqa: BLE001
            _report_bad(f"stream item {idx}", e)
            pixels, ok = np.zeros((3, self.transform.size, self.transform.size), np.uint8), False
        label = row.get(self.label_column, -1) if self.label_column else -1
        caption = row.get(self.caption_column, "") if self.caption_column else ""
        return {"pixels": pixels, "label": int(label if label is not None else -1), "caption": str(caption or ""),
                "index": int(idx), "ok": ok}


def streaming_collate(items: list[dict]) -> dict:
    good = [it for it in items if it.get("ok", True)]
    bad = len(items) - len(good)
    if not good:  # keep the batch structure; a whole failed batch is vanishingly rare
        good = items[:1]
    out = collate(good)
    out["skipped"] = torch.zeros(len(good), dtype=torch.long)
    out["skipped"][0] = bad
    return out


def build_dataset(cfg, seed: int, transform: ImageTransform | None = None):
    """``cfg`` is the ``data`` section. Returns a map-style :class:`ImageDataset`, or a ``datasets`` iterable dataset
    when ``data.type=hf`` and ``data.streaming=true``."""
    transform = transform or build_transform(cfg)
    kind = cfg.get("type", "folder")
    if kind == "folder":
        source = ImageFolderSource(cfg["path"], class_from_folder=cfg.get("class_from_folder", True))
    elif kind == "tar":
        source = TarShardSource(cfg["path"], label_key=cfg.get("label_column"))
    elif kind == "hf":
        ds = load_hf_dataset(cfg)
        if cfg.get("streaming"):
            names = list(ds.column_names or [])
            img_col = _pick_column(names, cfg.get("image_column"), ("image", "img", "jpg", "png", "webp")) if names \
                else (cfg.get("image_column") or "image")
            lab_col = _pick_column(names, cfg.get("label_column"), ("label", "labels", "cls", "class")) if names \
                else cfg.get("label_column")
            cap_col = _pick_column(names, cfg.get("caption_column"), ("caption", "text", "txt", "prompt")) if names \
                else cfg.get("caption_column")
            datasets = _require_datasets()
            feat = ds.features.get(img_col) if ds.features else None
            if isinstance(feat, datasets.Image):
                ds = ds.cast_column(img_col, datasets.Image(decode=False))
            if cfg.get("shuffle", True):
                ds = ds.shuffle(seed=seed, buffer_size=int(cfg.get("shuffle_buffer", 1000)))
            fn = StreamingTransform(transform, img_col, lab_col, cap_col, seed)
            ds = ds.map(fn, with_indices=True, remove_columns=names or None)
            ds.num_classes = int(cfg.get("num_classes") or 0)
            return ds
        source = HFSource(ds, cfg.get("image_column"), cfg.get("label_column"), cfg.get("caption_column"))
    else:
        raise ValueError(f"data.type must be folder, tar or hf, got {kind!r}")
    max_items = cfg.get("max_items")
    if max_items:
        source = _Subset(source, int(max_items))
    return ImageDataset(source, transform, seed=seed)


class _Subset:
    def __init__(self, source, n):
        self.source, self.n = source, min(n, len(source))
        self.classes = getattr(source, "classes", [])
        self.labels = list(getattr(source, "labels", []))[: self.n] or None

    def __len__(self):
        return self.n

    def get(self, i):
        return self.source.get(i)

    def describe(self, i):
        return _describe(self.source, i)


def is_streaming(dataset) -> bool:
    return isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__")


def make_loader(dataset, batch_size: int, seed: int, shuffle: bool = True, num_workers: int = 0,
                drop_last: bool = True, collate_fn: Callable | None = None):
    """DataLoader with an :class:`EpochSampler` (map-style) or a plain loader (streaming).

    The loader gets its own ``torch.Generator`` so creating an iterator never consumes the global RNG (which
    ``save_state``/``load_state`` restore; a resumed run must draw the same numbers as an uninterrupted one).
    """
    # persistent workers are safe: the sampler (main process) decides indices and augmentation keys
    common = dict(num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                  persistent_workers=num_workers > 0, pin_memory=torch.cuda.is_available())
    if num_workers > 0:
        common["prefetch_factor"] = 2
    if is_streaming(dataset):
        return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn or streaming_collate,
                          drop_last=drop_last, **common)
    sampler = EpochSampler(len(dataset), seed=seed, shuffle=shuffle)
    batches = BatchSampler(sampler, batch_size=batch_size, drop_last=drop_last)
    if drop_last and len(batches) == 0:
        raise ValueError(f"the dataset has {len(dataset)} items, fewer than one batch of {batch_size}")
    return DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn or collate, **common)


def fixed_batch(dataset, n: int, collate_fn: Callable | None = None) -> dict:
    """The first ``n`` samples at epoch 0 (deterministic): a fixed batch for evaluation curves."""
    if is_streaming(dataset):
        items = []
        for row in dataset:
            items.append(row)
            if len(items) >= n:
                break
        return (collate_fn or streaming_collate)(items)
    n = min(n, len(dataset))
    return (collate_fn or collate)([dataset[(i, 0)] for i in range(n)])


def write_image_folder(root: str | os.PathLike, images: Sequence[np.ndarray], labels: Sequence[int] | None = None,
                       class_names: Sequence[str] | None = None, fmt: str = "png") -> list[str]:
    """Write uint8 HxWx3 arrays as an image folder (``class/xxxxx.png`` when labels are given). For tests and the
    real-data check."""
    root = Path(root)
    out = []
    for i, a in enumerate(images):
        sub = root
        if labels is not None:
            name = class_names[labels[i]] if class_names else f"class_{int(labels[i]):04d}"
            sub = root / name
        sub.mkdir(parents=True, exist_ok=True)
        p = sub / f"{i:06d}.{fmt}"
        Image.fromarray(np.asarray(a, dtype=np.uint8)).save(p)
        out.append(str(p))
    return out


def write_tar_shards(out_dir: str | os.PathLike, images: Sequence[np.ndarray], labels: Sequence[int] | None = None,
                     captions: Sequence[str] | None = None, per_shard: int = 100, fmt: str = "png") -> list[str]:
    """Write webdataset-style ``shard-000000.tar`` files (``key.png``, ``key.cls``, ``key.txt``) with the stdlib."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(images), per_shard):
        path = out_dir / f"shard-{s // per_shard:06d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w") as tf:
            for i in range(s, min(s + per_shard, len(images))):
                key = f"{i:08d}"
                buf = io.BytesIO()
                Image.fromarray(np.asarray(images[i], dtype=np.uint8)).save(
                    buf, format="PNG" if fmt == "png" else "JPEG")
                members = [(f"{key}.{fmt}", buf.getvalue())]
                if labels is not None:
                    members.append((f"{key}.cls", str(int(labels[i])).encode()))
                if captions is not None:
                    members.append((f"{key}.txt", captions[i].encode("utf-8")))
                for name, data in members:
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        os.replace(tmp, path)
        paths.append(str(path))
    return paths


__all__ = [
    "EpochSampler", "HFSource", "ImageDataset", "ImageFolderSource", "ImageTransform", "TarShardSource",
    "build_dataset", "build_transform", "collate", "expand_shards", "fixed_batch", "is_streaming", "make_loader",
    "sample_rrc_box", "to_float", "write_image_folder", "write_tar_shards",
]


# Config schema of the ``data`` section (shared by the scripts)
DATA_DEFAULTS = {
    "type": "folder",            # folder | tar | hf
    "path": None,                # folder / tar glob, dir or list / HF dataset name or local path
    "split": "train",
    "streaming": False,          # hf only: datasets streaming (iterable)
    "hf_name": None,             # hf config name
    "hf_kwargs": {},             # extra kwargs for datasets.load_dataset (free-form)
    "image_column": None,        # hf: auto (image, img, jpg, png, webp)
    "label_column": None,        # hf: auto (label, labels, cls, class); tar: json key
    "caption_column": None,      # hf: auto (caption, text, txt, prompt)
    "class_from_folder": True,
    "num_classes": None,         # needed only for streaming data with labels
    "resolution": 256,
    "crop": "random_resized",    # random_resized | center | resize
    "crop_scale": [0.4, 1.0],
    "crop_ratio": [0.75, 1.3333333333],
    "hflip": 0.5,
    "batch_size": 32,            # per process
    "num_workers": 4,
    "shuffle": True,
    "shuffle_buffer": 1000,
    "num_shards": 1,             # hf load_from_disk + streaming: shards of the iterable dataset
    "max_items": None,           # use only the first N images (debugging)
}
