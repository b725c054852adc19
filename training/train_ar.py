"""Stage 2: train the autoregressive model (:class:`FlexTokAR`) on token shards from ``tokenize_dataset``.

Class-conditional (labels from the shards) or caption-conditional (captions from the shards, encoded on the fly by
a frozen text encoder: ``text.path`` = a ``transformers`` encoder folder or hub id, e.g. all-MiniLM-L6-v2 or a T5
encoder; or ``text.encoder=package.module:factory``). Label / caption dropout for classifier-free guidance is the
model's ``class_dropout_prob`` / ``text_dropout_prob``. AdamW betas (0.9, 0.95), weight decay 0.05.

    accelerate launch -m flextok_kit.training.train_ar --config ar_tiny tokens=runs/tokens

The export (``output_dir/export``) is the FlexTokAR folder (``FlexTokAR.from_pretrained``). With
``export.pipeline=<tokenizer pipeline folder>`` a complete FlexTokPipeline with the AR model (and the text encoder)
is also written to ``export.pipeline_dir`` (default ``output_dir/export_pipeline``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .config import config_from_argv, merged_defaults
from .data import make_loader
from .loop import run_stage
from .models import count_params, save_pretrained_atomic
from .utils import LoopState, TrainRun, logger, optimizer_update, start_run

DEFAULTS = merged_defaults({
    "output_dir": "runs/ar",
    "tokens": None,                  # a tokenize_dataset output folder (or a list of folders)
    "num_tokens": None,              # train on the first k tokens (default: all in the shards)
    "condition": "class",            # class | caption
    "data": {"batch_size": 32, "num_workers": 0, "shuffle": True},
    "model": {},                     # FlexTokAR kwargs (free-form); "preset: ar-49m" picks a paper size
    "text": {
        "encoder": "hf",             # hf (AutoModel + AutoTokenizer from text.path) | package.module:factory
        "path": None,
        "max_length": 64,
        "kwargs": {},
        "dtype": "float32",
    },
    "optim": {"lr": 4.0e-4, "betas": [0.9, 0.95], "weight_decay": 0.05, "eps": 1.0e-8, "warmup_steps": 1000,
              "schedule": "cosine", "min_lr_ratio": 0.01, "grad_clip": 1.0},
    "ema": {"decay": 0.0, "warmup": True, "update_after_step": 0},
    "export": {"dir": None, "use_ema": True, "pipeline": None, "pipeline_dir": None},
})

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenDataset(Dataset):
    """Rows of one or more tokenized folders: ``tokens`` (first ``num_tokens``, read row by row from the
    memory-mapped shards, so ImageNet x 10 crops does not have to fit in RAM), ``label``, ``caption``."""

    def __init__(self, folders, num_tokens: int | None = None):
        from .shards import ShardReader

        folders = [folders] if isinstance(folders, (str, Path)) else list(folders)
        self.readers = [ShardReader(f) for f in folders]
        ks = set()
        for r in self.readers:
            s, _ = r.locate(0)
            ks.add(int(r._handle(s).get_slice("tokens").get_shape()[1]))
        if len(ks) != 1:
            raise ValueError(f"token folders hold different numbers of tokens per image: {sorted(ks)}")
        k = ks.pop()
        if num_tokens is not None and not 1 <= int(num_tokens) <= k:
            raise ValueError(f"num_tokens must be in 1..{k} (the shards hold {k} tokens per image), got {num_tokens}")
        self.num_tokens = int(num_tokens or k)
        self.offsets = np.cumsum([0] + [len(r) for r in self.readers])
        self.labels = torch.cat([r.load_all("label") for r in self.readers]).long()
        self.captions = sum((r.json_column("captions") for r in self.readers), [])
        self.settings = self.readers[0].index.get("settings", {})
        for r in self.readers:  # opened lazily again in each process / worker
            r._handles.clear()
        if self.offsets[-1] == 0:
            raise ValueError(f"no tokens in {folders}")

    @property
    def classes(self) -> list:
        return list(self.settings.get("classes") or [])

    @property
    def num_classes(self) -> int:
        return int(self.settings.get("num_classes") or 0) or int(self.labels.max()) + 1

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, key) -> dict:
        i = int(key[0]) if isinstance(key, (tuple, list)) else int(key)
        f = int(np.searchsorted(self.offsets, i, side="right") - 1)
        row = self.readers[f].get("tokens", i - int(self.offsets[f]))[: self.num_tokens]
        tokens = row.to(torch.int32).long() if row.dtype == torch.uint16 else row.long()
        return {"tokens": tokens, "label": int(self.labels[i]), "caption": self.captions[i] or "", "index": i}


def collate_tokens(items: list[dict]) -> dict:
    return {"tokens": torch.stack([it["tokens"] for it in items]),
            "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "caption": [it["caption"] for it in items]}


class ARTrainModule(nn.Module):
    """One ``forward`` for DDP/FSDP: tokens + condition -> mean next-token cross-entropy."""

    def __init__(self, ar):
        super().__init__()
        self.ar = ar

    def forward(self, tokens, class_labels=None, text_states=None, text_mask=None, null_condition_mask=None):
        return self.ar.loss(tokens, class_labels=class_labels, text_states=text_states, text_mask=text_mask,
                            null_condition_mask=null_condition_mask)


class HFTextEncoder(nn.Module):
    """Frozen ``transformers`` text encoder: captions -> (hidden states ``[B,S,D]``, mask ``[B,S]``)."""

    def __init__(self, path: str, max_length: int = 64, torch_dtype=None):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, **({"dtype": torch_dtype} if torch_dtype is not None else {}))
        if getattr(model.config, "is_encoder_decoder", False):
            model = model.get_encoder()
        self.model = model.eval().requires_grad_(False)
        self.max_length = int(max_length)
        self.feature_dim = int(getattr(model.config, "hidden_size", None) or model.config.d_model)

    @torch.no_grad()
    def forward(self, captions: list[str]):
        device = next(self.model.parameters()).device
        b = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(device)
        h = self.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        return h.float(), b["attention_mask"].bool()


def build_text_encoder(tc):
    if tc.encoder == "hf":
        if not tc.path:
            raise ValueError("condition=caption needs text.path (a transformers encoder folder or hub id)")
        return HFTextEncoder(tc.path, int(tc.max_length), DTYPES[tc.dtype])
    from ..metrics import import_object

    enc = import_object(tc.encoder)(**dict(tc.kwargs or {}))
    if not hasattr(enc, "feature_dim"):
        raise ValueError("a custom text encoder must have a feature_dim attribute")
    return enc


def build_ar(cfg, dataset, text_dim: int):
    from ..flextok_core.ar import FlexTokAR

    mk = dict(cfg.model)
    preset = mk.pop("preset", None)
    mk.setdefault("max_tokens", dataset.num_tokens)
    if cfg.condition == "class":
        mk.setdefault("num_classes", dataset.num_classes)
        mk.setdefault("text_dim", 0)
        if dataset.classes and "id2label" not in mk:
            mk["id2label"] = {str(i): c for i, c in enumerate(dataset.classes)}
    elif cfg.condition == "caption":
        mk["num_classes"] = 0
        mk.setdefault("text_dim", text_dim)
    else:
        raise ValueError(f"condition must be class or caption, got {cfg.condition!r}")
    if "vocab_size" not in mk and dataset.settings.get("vocab_size"):
        mk["vocab_size"] = int(dataset.settings["vocab_size"])
    return FlexTokAR.from_preset(preset, **mk) if preset else FlexTokAR(**mk)


@dataclass(kw_only=True)
class ARRun(TrainRun):
    """What train_ar's step, evaluation and export share: :class:`TrainRun` (``raw`` is the unwrapped
    :class:`ARTrainModule`) plus the frozen text encoder (None when class-conditional)."""

    text: nn.Module | None


def main(argv=None, cfg=None):
    if cfg is None:
        cfg = config_from_argv(argv, DEFAULTS, __doc__)
    return run_stage(build_run(cfg), train_step, evaluate, export, batch_size_of=lambda b: len(b["tokens"]))


def build_models(cfg, dataset: TokenDataset, device):
    """-> (FlexTokAR for ``dataset``'s tokens and conditions, the frozen text encoder or None)."""
    text = None
    if cfg.condition == "caption":
        text = build_text_encoder(cfg.text).to(device)
    elif int(dataset.labels.min()) < 0:
        raise ValueError("condition=class but some token rows have no label (-1); tokenize a labelled dataset or "
                         "use condition=caption")
    ar = build_ar(cfg, dataset, text.feature_dim if text is not None else 0)
    if cfg.condition == "class" and int(dataset.labels.max()) >= ar.config.num_classes:
        raise ValueError(f"labels go up to {int(dataset.labels.max())} but model.num_classes is "
                         f"{ar.config.num_classes}")
    logger.info("FlexTokAR: %.2fM parameters, %d tokens, %s-conditional, %d rows", count_params(ar) / 1e6,
                dataset.num_tokens, cfg.condition, len(dataset))
    return ar, text


def build_run(cfg) -> ARRun:
    """Accelerator, token data, models, optimizer, EMA and checkpoints, in the order that fixes the random streams:
    the global seed before the models, the per-rank seed after ``accelerator.prepare``."""
    accelerator = start_run(cfg, "train_ar")
    if not cfg.tokens:
        raise ValueError("tokens=... is required (a tokenize_dataset output folder)")
    device = accelerator.device
    dataset = TokenDataset(cfg.tokens, cfg.num_tokens)
    ar, text = build_models(cfg, dataset, device)
    module = ARTrainModule(ar.train())
    loader = make_loader(dataset, int(cfg.data.batch_size), int(cfg.seed), bool(cfg.data.shuffle),
                         int(cfg.data.num_workers), collate_fn=collate_tokens)
    return ARRun.prepare(cfg, accelerator, module, loader, dataset, collate_tokens, lambda raw: raw.ar.parameters,
                         text=text)


def condition_of(run: ARRun, batch: dict) -> dict:
    """The model's condition keyword arguments for a batch: encoded captions or class labels."""
    if run.text is not None:
        states, mask = run.text(batch["caption"])
        return {"text_states": states, "text_mask": mask}
    return {"class_labels": batch["label"].to(run.device)}


def train_step(run: ARRun, batch: dict, state: LoopState) -> dict:
    """One micro-batch: next-token loss, backward pass and, on a sync step, the optimizer update."""
    acc = run.accelerator
    cond = condition_of(run, batch)
    with acc.accumulate(run.module):
        with acc.autocast():
            loss = run.module(batch["tokens"].to(run.device), **cond)
        acc.backward(loss)
        out = optimizer_update(acc, run.module, run.optimizer, run.cfg.optim, state.step, run.total_steps)
    out["loss"] = loss.detach()
    return out


@torch.no_grad()
def evaluate(run: ARRun) -> dict:
    """Next-token loss on the fixed batch, conditional and with the null condition."""
    run.module.eval()
    tokens = run.fixed["tokens"].to(run.device)
    cond = condition_of(run, run.fixed)
    with run.accelerator.autocast():
        loss = run.module(tokens, **cond)
        null = torch.ones(len(tokens), dtype=torch.bool, device=run.device)
        loss_null = run.module(tokens, null_condition_mask=null, **cond)
    run.module.train()
    return {"loss": float(loss), "loss_uncond": float(loss_null)}


def export(run: ARRun, state: LoopState) -> None:
    """``export.dir``: the FlexTokAR folder (EMA weights with ``export.use_ema``); with ``export.pipeline`` also a
    full pipeline (:func:`export_pipeline`)."""
    weights = run.export_weights(run.raw.ar.parameters(), "ar.")
    if weights is None:
        return
    from ..flextok_core.ar import FlexTokAR

    model = FlexTokAR.from_config(run.raw.ar.config)
    model.load_state_dict(weights)
    model.eval()
    out_dir = run.export_dir()
    save_pretrained_atomic(model, out_dir)
    logger.info("exported FlexTokAR (%s weights) to %s", "EMA" if run.export_ema else "raw", out_dir)
    if run.cfg.export.pipeline:
        export_pipeline(run, model)


def export_pipeline(run: ARRun, model) -> None:
    """``export.pipeline_dir``: the tokenizer pipeline ``export.pipeline`` with the AR ``model`` (and the text
    encoder, when it is a ``transformers`` one)."""
    from ..pipelines import FlexTokPipeline

    cfg = run.cfg
    pipe = FlexTokPipeline.from_pretrained(cfg.export.pipeline)
    extra = {}
    if isinstance(run.text, HFTextEncoder):
        extra = {"text_encoder": run.text.model.cpu(), "tokenizer": run.text.tokenizer}
    full = FlexTokPipeline(vae=pipe.vae, flextok=pipe.flextok, scheduler=pipe.scheduler, ar_model=model, **extra)
    pdir = Path(cfg.export.pipeline_dir or Path(cfg.output_dir) / "export_pipeline")
    save_pretrained_atomic(full, pdir)
    if run.text is not None:
        run.text.to(run.device)
    logger.info("exported FlexTokPipeline with the AR model to %s", pdir)


if __name__ == "__main__":
    main()
