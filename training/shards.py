"""Sharded safetensors outputs written data-parallel, atomically and resumably (token files, cached latents).

A job over ``num_items`` items is cut into shards of ``shard_size``; process ``r`` of ``W`` writes shards
``r, r+W, r+2W, ...``. Each shard is written to a temporary name and renamed (``shard-000012.safetensors``), so a
file with the final name is always complete; a restarted job skips those. Every shard carries the job's
``fingerprint`` (a hash of the settings that determine its content) in its metadata: resuming into a folder made
with other settings is an error, not a silent mix. When all shards exist the main process writes ``index.json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .utils import atomic_save_safetensors, atomic_write_text

logger = logging.getLogger(__name__)


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.safetensors"


def plan(num_items: int, shard_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_size, num_items)) for s in range(0, num_items, shard_size)]


def read_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


def shard_is_done(path: Path, fp: str) -> bool:
    if not path.is_file():
        return False
    md = read_metadata(path)
    if md.get("fingerprint") != fp:
        raise ValueError(f"{path} was written with other settings (fingerprint {md.get('fingerprint')} != {fp}); "
                         "use a new output folder or delete the old shards")
    return True


class SingleProcess:
    """What :func:`run_sharded` needs of an ``Accelerator`` when one process does the whole job (the CLI)."""

    process_index, num_processes = 0, 1
    is_main_process = is_local_main_process = True

    def wait_for_everyone(self):
        pass


def run_sharded(accelerator, out_dir, num_items: int, shard_size: int, fp: str,
                process: Callable[[int, int], tuple[dict, dict]], settings: dict | None = None,
                desc: str = "shards", progress: bool = True) -> dict:
    """Run ``process(start, end) -> (tensors, metadata)`` for every missing shard of this process, write the shards
    atomically, then (main process) ``index.json``. Returns ``{"written": [...], "skipped": [...]}`` for this
    process. ``accelerator=None``: one process does every shard."""
    from tqdm.auto import tqdm

    accelerator = accelerator or SingleProcess()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards = plan(num_items, shard_size)
    mine = list(range(accelerator.process_index, len(shards), accelerator.num_processes))
    written, skipped = [], []
    bar = tqdm(mine, desc=desc, disable=not (progress and accelerator.is_local_main_process), dynamic_ncols=True)
    for i in bar:
        path = out / shard_name(i)
        if shard_is_done(path, fp):
            skipped.append(i)
            continue
        start, end = shards[i]
        tensors, metadata = process(start, end)
        md = {k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()}
        md.update(fingerprint=fp, start=str(start), end=str(end), shard=str(i))
        atomic_save_safetensors(path, tensors, md)
        written.append(i)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        entries = []
        for i, (start, end) in enumerate(shards):
            path = out / shard_name(i)
            md = read_metadata(path)
            entries.append({"file": path.name, "start": start, "end": end, "count": int(md.get("count", end - start))})
        atomic_write_text(out / "index.json", json.dumps({
            "fingerprint": fp, "num_items": num_items, "shard_size": shard_size, "num_shards": len(shards),
            "settings": settings or {}, "shards": entries}, indent=1, default=str))
    accelerator.wait_for_everyone()
    logger.info("%s: wrote %d shard(s), %d already done (process %d)", desc, len(written), len(skipped),
                accelerator.process_index)
    return {"written": written, "skipped": skipped}


class ShardReader:
    """Row access over the shards of a folder (``index.json`` or ``shard-*.safetensors``). Small tensors can be
    loaded whole (:meth:`load_all`); big ones are read row by row through ``safe_open`` (memory-mapped, opened
    lazily per process)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if index.is_file():
            self.index = json.loads(index.read_text())
            self.files = [self.folder / e["file"] for e in self.index["shards"]]
        else:
            self.index = {}
            self.files = sorted(self.folder.glob("shard-*.safetensors"))
        if not self.files:
            raise FileNotFoundError(f"no shards (shard-*.safetensors) in {folder}")
        self.metadata = [read_metadata(f) for f in self.files]
        self.counts = [int(m.get("count", 0)) for m in self.metadata]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._handles: dict = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def _handle(self, s: int):
        from safetensors import safe_open

        key = (os.getpid(), s)
        h = self._handles.get(key)
        if h is None:
            h = safe_open(str(self.files[s]), "pt")
            self._handles[key] = h
        return h

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_handles"] = {}
        return d

    def locate(self, row: int) -> tuple[int, int]:
        s = int(np.searchsorted(self.offsets, row, side="right") - 1)
        return s, int(row - self.offsets[s])

    def get(self, name: str, row: int) -> torch.Tensor:
        s, r = self.locate(row)
        return self._handle(s).get_slice(name)[r:r + 1][0]

    def load_all(self, name: str) -> torch.Tensor:
        from safetensors.torch import load_file

        parts = [load_file(str(f))[name] for f, c in zip(self.files, self.counts) if c > 0]
        return torch.cat(parts) if parts else torch.zeros(0)

    def json_column(self, key: str) -> list:
        out: list = []
        for m, c in zip(self.metadata, self.counts):
            vals = json.loads(m[key]) if key in m else [None] * c
            out += vals
        return out
