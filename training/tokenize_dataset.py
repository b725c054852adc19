"""Tokenize an image dataset with a trained FlexTok pipeline into sharded safetensors token files (for stage 2).

Data-parallel over processes (process r writes shards r, r+W, ...), resumable (finished shards are skipped; each
shard is written to a temporary name and renamed), deterministic (crops from ``(seed, view, index)``; posterior
noise from ``(seed, shard)``).

    accelerate launch -m flextok_kit.training.tokenize_dataset --config tokenize \
        pipeline=runs/tokenizer/export data.path=/data/images output_dir=runs/tokens

Each ``shard-NNNNNN.safetensors`` holds ``tokens`` (int32 or uint16 ``[n, k]``), ``label`` (int64, -1 = none),
``index`` (int64: the image's index in the dataset) and ``view`` (int64); its metadata holds ``count``,
``captions`` and ``sources`` (JSON lists). ``index.json`` lists the shards and the settings (``classes`` too).
``views > 1`` with ``data.crop=random_resized`` stores several augmented crops per image (LlamaGen's ten-crop).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import config_from_argv
from .data import DATA_DEFAULTS, build_dataset, is_streaming, keyed_loader, to_float
from .shards import fingerprint, run_sharded

logger = logging.getLogger("flextok_kit.training")

DEFAULTS = {
    "output_dir": "runs/tokens",
    "seed": 0,
    "mixed_precision": "no",
    "pipeline": None,                # tokenizer pipeline folder (train_tokenizer's export) or hub id
    "official": False,               # pipeline is in the official release format (FlexTokPipeline.from_official)
    "data": {**DATA_DEFAULTS, "crop": "center", "hflip": 0.0, "shuffle": False},
    "views": 1,                      # crops per image
    "num_tokens": None,              # first k tokens (default: all registers)
    "shard_size": 4096,              # items (image views) per shard
    "batch_size": 64,
    "token_dtype": "int32",          # int32 | uint16 (ids < 65536)
    "sample_posterior": None,        # null = the model's setting
    "dtype": "float32",              # float32 | bfloat16 | float16 for the models
    "progress_bar": True,
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKEN_DTYPES = {"int32": torch.int32, "uint16": torch.uint16, "int64": torch.int64}


@dataclass
class ShardTokenizer:
    """``process(start, end) -> (tensors, metadata)`` for :func:`run_sharded`: the first ``num_tokens`` ids of the
    item views ``start..end-1`` (item ``j`` is view ``j % views`` of image ``j // views``); the posterior noise is
    seeded by ``(seed, start)``, so a shard's content does not depend on which process writes it, or when."""

    accelerator: Any
    pipe: Any
    images: Any
    num_tokens: int
    views: int
    seed: int
    batch_size: int
    num_workers: int
    dtype: torch.dtype                # the models' dtype
    token_dtype: torch.dtype          # the stored ids' dtype
    sample_posterior: bool | None

    def __call__(self, start: int, end: int) -> tuple[dict, dict]:
        device, k = self.accelerator.device, self.num_tokens
        keys = [(j // self.views, j % self.views) for j in range(start, end)]
        g = torch.Generator(device=device).manual_seed(self.seed * 1_000_003 + start)
        toks, labels, index, view, captions, sources = [], [], [], [], [], []
        for b in keyed_loader(self.images, keys, self.batch_size, self.num_workers):
            if len(b["index"]) == 0:
                continue
            x = to_float(b["pixels"].to(device), self.dtype)
            with self.accelerator.autocast():
                ids = self.pipe.tokenize(x, num_tokens=k, generator=g, sample_posterior=self.sample_posterior)
            toks.append(ids.cpu().to(torch.int64))
            labels.append(b["label"])
            index.append(b["index"])
            view.append(b["view"])
            captions += b["caption"]
            sources += b["source"]
        n = sum(len(t) for t in toks)
        tokens = torch.cat(toks) if toks else torch.zeros(0, k, dtype=torch.int64)
        tensors = {
            "tokens": tokens.to(self.token_dtype),
            "label": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
            "index": torch.cat(index) if index else torch.zeros(0, dtype=torch.long),
            "view": torch.cat(view) if view else torch.zeros(0, dtype=torch.long),
        }
        return tensors, {"count": str(n), "captions": json.dumps(captions), "sources": json.dumps(sources)}


def main(argv=None, cfg=None) -> dict:
    if cfg is None:
        cfg = config_from_argv(argv, DEFAULTS, __doc__)
    accelerator = make_accelerator(cfg)
    if not cfg.pipeline:
        raise ValueError("pipeline=... is required (train_tokenizer's export folder or a hub id)")
    if not cfg.data.path:
        raise ValueError("data.path is required")
    pipe = load_pipeline(cfg, accelerator.device)
    k, token_dtype = token_format(cfg, pipe)
    images = build_dataset(cfg.data, seed=int(cfg.seed))
    if is_streaming(images):
        raise ValueError("tokenize_dataset needs map-style data (folder, tar, or a non-streaming hf dataset)")
    views = int(cfg.views)
    settings, fp = shard_settings(cfg, pipe, images, k)
    process = ShardTokenizer(accelerator, pipe, images, k, views, int(cfg.seed), int(cfg.batch_size),
                             int(cfg.data.num_workers), DTYPES[cfg.dtype], token_dtype, cfg.sample_posterior)
    result = run_sharded(accelerator, cfg.output_dir, len(images) * views, int(cfg.shard_size), fp, process,
                         settings, desc="tokenize", progress=bool(cfg.progress_bar))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        logger.info("tokens of %d images x %d view(s) in %s", len(images), views, Path(cfg.output_dir))
    return result


def make_accelerator(cfg):
    """A plain Accelerator (no trackers, no checkpoints: the shards are the state), gloo on a CPU-only launch."""
    from accelerate import Accelerator

    from .utils import launched_without_accelerator_device

    accelerator = Accelerator(mixed_precision=cfg.mixed_precision if cfg.mixed_precision not in (None, "null")
                              else None, cpu=launched_without_accelerator_device())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        level=logging.INFO if accelerator.is_main_process else logging.WARNING, force=True)
    return accelerator


def load_pipeline(cfg, device):
    """The tokenizer pipeline ``pipeline`` (``official``: the release format) in ``dtype``, on ``device``."""
    from ..pipelines import FlexTokPipeline

    dtype = DTYPES[cfg.dtype]
    if cfg.official:
        pipe = FlexTokPipeline.from_official(cfg.pipeline, torch_dtype=dtype)
    else:
        pipe = FlexTokPipeline.from_pretrained(cfg.pipeline, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    return pipe


def token_format(cfg, pipe) -> tuple[int, torch.dtype]:
    """-> (tokens per item view: ``num_tokens`` or all registers, the ids' storage dtype), checked."""
    n_reg = pipe.num_registers
    k = int(cfg.num_tokens or n_reg)
    if not 1 <= k <= n_reg:
        raise ValueError(f"num_tokens must be in 1..{n_reg}, got {cfg.num_tokens}")
    vocab = pipe.flextok.vocab_size
    tok_dtype = TOKEN_DTYPES.get(cfg.token_dtype)
    if tok_dtype is None:
        raise ValueError(f"token_dtype must be one of {sorted(TOKEN_DTYPES)}, got {cfg.token_dtype!r}")
    if tok_dtype == torch.uint16 and vocab > 65536:
        raise ValueError(f"vocabulary of {vocab} ids does not fit uint16")
    return k, tok_dtype


def shard_settings(cfg, pipe, images, k: int) -> tuple[dict, str]:
    """-> (the settings stored in ``index.json``, the fingerprint of those that determine the shards' content)."""
    data_keys = ("type", "path", "split", "hf_name", "resolution", "crop", "crop_scale", "crop_ratio", "hflip",
                 "max_items", "class_from_folder", "image_column", "label_column", "caption_column")
    settings = {
        "pipeline": str(cfg.pipeline), "flextok_config": dict(pipe.flextok.config), "num_tokens": k,
        "views": int(cfg.views), "seed": int(cfg.seed), "data": {key: cfg.data.get(key) for key in data_keys},
        "token_dtype": cfg.token_dtype, "sample_posterior": cfg.sample_posterior, "n_images": len(images),
        "dtype": cfg.dtype,
    }
    fp = fingerprint(settings)
    settings.update(classes=list(images.classes), num_classes=images.num_classes, vocab_size=pipe.flextok.vocab_size)
    return settings, fp


def load_tokens(folder) -> dict:
    """All shards of a tokenized folder in memory: ``tokens`` int64 ``[N, k]``, ``label``, ``index``, ``view``,
    ``captions`` (list), ``sources`` (list), ``settings`` (dict from index.json, if present)."""
    from .shards import ShardReader

    r = ShardReader(folder)
    out = {name: r.load_all(name) for name in ("tokens", "label", "index", "view")}
    out["tokens"] = out["tokens"].to(torch.int64) if out["tokens"].dtype != torch.uint16 else \
        out["tokens"].to(torch.int32).to(torch.int64)
    out["captions"] = r.json_column("captions")
    out["sources"] = r.json_column("sources")
    out["settings"] = r.index.get("settings", {})
    return out


if __name__ == "__main__":
    main()
