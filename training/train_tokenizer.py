"""Stage 1: train the FlexTok tokenizer (encoder + FSQ + rectified-flow decoder) on a frozen VAE.

Per sample: VAE latents x0 -> encoder -> FSQ (straight-through) -> registers; nested dropout keeps the first k
(``train.nested_dropout``: ``pow2`` = k uniform over {1, 2, 4, ..., N}, or ``uniform``); with probability
``train.cfg_dropout`` the whole register sequence becomes the null condition (for classifier-free guidance);
t ~ logit-normal (or uniform), x_t = t * noise + (1 - t) * x0, loss ||v - (noise - x0)||^2, plus REPA: an MLP
projects the decoder's patch tokens after block ``repa.layer`` onto a frozen vision encoder's patch features
(DINOv2 by default) with a cosine-similarity loss of weight ``repa.weight``.

    accelerate launch -m flextok_kit.training.train_tokenizer --config tokenizer_tiny \
        vae.path=runs/vae_tiny/export data.path=/data/images

The export (``output_dir/export``) is a FlexTokPipeline folder (vae + flextok (EMA weights) + scheduler) that
``FlexTokPipeline.from_pretrained`` loads. Latents can be precomputed once (``cache.enabled=true``): each image is
encoded in ``cache.views`` deterministic crops, and the posterior (mean, logvar) is stored in safetensors shards.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .config import config_from_argv, merged_defaults
from .data import DATA_DEFAULTS, build_dataset, is_streaming, keyed_loader, make_loader, to_float
from .loop import run_stage
from ..flextok_core.nested_dropout import sample_keep_k
from ..flextok_core.rng import rand, randn
from .losses import build_mlp, repa_loss, sample_timesteps
from .models import build_flextok, count_params, load_vae, save_pretrained_atomic, vae_downsample
from .repa import build_repa_target
from .shards import ShardReader, fingerprint, run_sharded
from .utils import LoopState, TrainRun, logger, optimizer_update, start_run

DEFAULTS = merged_defaults({
    "output_dir": "runs/tokenizer",
    "data": DATA_DEFAULTS,
    "vae": {
        "path": None,                # AutoencoderKL folder (stage 0 export), pipeline folder or hub id
        "sample_posterior": True,    # train on posterior samples (as the release) or on the mean
        "dtype": "float32",          # float32 | bfloat16 | float16 (the frozen VAE's weights)
    },
    "cache": {
        "enabled": False,            # precompute VAE posteriors once (safetensors shards), then train from them
        "dir": None,                 # default: output_dir/latent_cache
        "views": 1,                  # deterministic crops per image (data.crop decides what a crop is)
        "dtype": "float32",
        "shard_size": 1024,
        "batch_size": 32,
    },
    "model": {},                     # FlexTokModel kwargs (free-form); latent_channels/grid_size default from VAE/data
    "init_from": None,               # start from a pipeline folder's flextok (or a FlexTokModel folder)
    "train": {
        "nested_dropout": "pow2",    # pow2 | uniform | none
        "cfg_dropout": 0.1,          # probability of the null condition per sample
        "timesteps": "logit_normal", # logit_normal | uniform
        "t_mean": 0.0,
        "t_std": 1.0,
        "fast_registers": True,      # collapse runs of identical mask/null registers (exact; see registers.py)
        "gradient_checkpointing": False,
    },
    "repa": {
        "encoder": "dinov2",         # dinov2 | effnet-lite0 | none | package.module:factory
        "encoder_path": None,        # dinov2: a folder or hub id (default facebook/dinov2-large)
        "encoder_kwargs": {},
        "feature_dim": None,         # default: the encoder's feature_dim
        "layer": 1,                  # decoder block (0-based) whose patch tokens are aligned (the release: 1)
        "weight": 0.5,
        "proj_dim": 2048,
        "proj_layers": 3,
    },
    "optim": {"lr": 5.0e-4, "betas": [0.9, 0.99], "weight_decay": 0.05, "eps": 1.0e-8, "warmup_steps": 5000,
              "schedule": "cosine", "min_lr_ratio": 0.0, "grad_clip": 1.0},
    "ema": {"decay": 0.9999, "warmup": True, "update_after_step": 0},
    "export": {"dir": None, "use_ema": True},
})

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TokenizerTrainModule(nn.Module):
    """FlexTok + REPA projector behind one ``forward`` (what DDP/FSDP wrap): latents -> losses."""

    def __init__(self, flextok, projector: nn.Module | None, tcfg, repa_layer: int, repa_weight: float):
        super().__init__()
        self.flextok = flextok
        self.projector = projector
        self.nested_dropout = tcfg.nested_dropout
        self.cfg_dropout = float(tcfg.cfg_dropout)
        self.t_mode, self.t_mean, self.t_std = tcfg.timesteps, float(tcfg.t_mean), float(tcfg.t_std)
        self.fast = bool(tcfg.fast_registers)
        self.repa_layer = int(repa_layer)
        self.repa_weight = float(repa_weight)

    def forward(self, x0: torch.Tensor, repa_target: torch.Tensor | None = None, generator=None,
                keep_k: torch.Tensor | None = None, null_condition_mask: torch.Tensor | None = None) -> dict:
        """Losses of a batch of latents. ``generator`` (CPU or the model's device, or None for the global RNGs)
        draws nested dropout's k, the CFG dropout, t and the noise, in that order; k and the dropout mask are drawn
        to the host (given, they are used as they are), so the decoder sizes its sequences without a device read."""
        model = self.flextok
        b, dev = x0.shape[0], x0.device
        n = model.config.num_registers
        values = model.register_values(x0)  # [B, N, 6], straight-through
        if keep_k is None:
            keep_k = sample_keep_k(b, n, self.nested_dropout, generator=generator)
        null = null_condition_mask
        if null is None:
            null = rand((b,), generator, device="cpu") < self.cfg_dropout
        registers = model.registers_from_values(values, keep_k, fast=self.fast, null_condition_mask=null)
        t = sample_timesteps(b, self.t_mode, dev, generator, self.t_mean, self.t_std)
        noise = randn(x0.shape, generator, device=dev, dtype=torch.float32)
        tb = t.view(b, 1, 1, 1)
        x_t = tb * noise + (1 - tb) * x0.float()
        use_repa = self.projector is not None and repa_target is not None
        if use_repa:
            v, hidden = model(x_t, t, registers, hidden_layer=self.repa_layer)
        else:
            v = model(x_t, t, registers)
        flow = F.mse_loss(v.float(), (noise - x0.float()))
        out = {"flow": flow, "loss": flow}
        if use_repa:
            r = repa_loss(self.projector(hidden), repa_target)
            out["repa"] = r
            out["loss"] = flow + self.repa_weight * r
        return out


class CachedLatentDataset(Dataset):
    """Rows of a latent cache grouped by image: item ``k`` at epoch ``e`` is one of image ``k``'s cached views,
    picked with an RNG seeded by ``(seed, e, index)``. With ``images`` (the image dataset) the same crop's pixels are
    returned too (for REPA targets)."""

    def __init__(self, folder, seed: int, images=None):
        self.reader = ShardReader(folder)
        index = self.reader.load_all("index").long()
        self.views = self.reader.load_all("view").long()
        self.labels = self.reader.load_all("label").long()
        order = torch.argsort(index * 100_000 + self.views, stable=True)
        uniq, counts = torch.unique_consecutive(index[order], return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        self.keys = uniq.tolist()
        self.groups = [order[s:s + c].tolist() for s, c in zip(starts.tolist(), counts.tolist())]
        self.seed = int(seed)
        self.images = images
        self.classes = getattr(images, "classes", []) if images is not None else []

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, key) -> dict:
        k, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        i = self.keys[k]
        rows = self.groups[k]
        row = rows[int(np.random.default_rng([self.seed, epoch, i, 7]).integers(len(rows)))] if len(rows) > 1 \
            else rows[0]
        item = {"moments": self.reader.get("moments", row).float(), "label": int(self.labels[row]), "index": i,
                "skipped": 0}
        if self.images is not None:
            img = self.images.try_load(i, int(self.views[row]))
            if img is None:
                raise RuntimeError(f"image {i} was readable when the cache was built but not now")
            item["pixels"] = img["pixels"]
        return item


def collate_latents(items: list[dict]) -> dict:
    out = {"moments": torch.stack([it["moments"] for it in items]),
           "label": torch.tensor([it["label"] for it in items], dtype=torch.long),
           "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
           "skipped": torch.zeros(len(items), dtype=torch.long)}
    if "pixels" in items[0]:
        out["pixels"] = torch.stack([it["pixels"] for it in items])
    return out


def activation_checkpointing(blocks) -> None:
    """Recompute each block's activations in the backward pass (``torch.utils.checkpoint``, non-reentrant):
    less memory for the big models, same gradients."""
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        fwd = block.forward

        def wrapped(*args, _fwd=fwd, **kwargs):
            if not torch.is_grad_enabled():
                return _fwd(*args, **kwargs)
            return checkpoint(_fwd, *args, use_reentrant=False, **kwargs)

        block.forward = wrapped


@torch.no_grad()
def code_health(flextok, x0: torch.Tensor) -> dict:
    """Watch for register collapse: ``token_usage`` = distinct ids per register position over the batch / batch size
    (mean over positions; 1/B means every image gets the same token there) and ``fsq_saturation`` = fraction of
    pre-FSQ values deep in tanh's flat tail (|z + shift| > 3), where the straight-through gradient vanishes. A tiny
    tokenizer trained with too high a learning rate drives its registers to an image-independent, saturated code
    within a few hundred steps, and never recovers."""
    z = flextok.pre_quantization(x0).float()                          # [B, N, 6]
    ids = flextok.fsq(z)[1]                                           # [B, N]
    distinct = torch.tensor([len(torch.unique(ids[:, i])) for i in range(ids.shape[1])], dtype=torch.float32)
    return {"token_usage": distinct.mean() / ids.shape[0], "fsq_saturation": flextok.fsq.saturation(z)}


def data_settings(cfg) -> dict:
    d = cfg.data
    return {k: d.get(k) for k in ("type", "path", "split", "hf_name", "resolution", "crop", "crop_scale", "crop_ratio",
                                  "hflip", "max_items", "class_from_folder")}


@dataclass
class LatentShardEncoder:
    """``process(start, end) -> (tensors, metadata)`` for :func:`run_sharded`: the VAE posteriors (mean, logvar) of
    the item views ``start..end-1`` of the latent cache (item ``j`` is view ``j % views`` of image ``j // views``)."""

    accelerator: Any
    vae: nn.Module
    dataset: Any
    views: int
    batch_size: int
    num_workers: int
    dtype: torch.dtype                # storage dtype of the moments

    @torch.no_grad()
    def __call__(self, start: int, end: int) -> tuple[dict, dict]:
        keys = [(j // self.views, j % self.views) for j in range(start, end)]
        moments, index, view, label = [], [], [], []
        for b in keyed_loader(self.dataset, keys, self.batch_size, self.num_workers):
            if len(b["index"]) == 0:
                continue
            x = to_float(b["pixels"].to(self.accelerator.device))
            with self.accelerator.autocast():
                m = self.vae.encode(x.to(self.vae.dtype)).latent_dist.parameters
            moments.append(m.to(self.dtype).cpu())
            index.append(b["index"])
            view.append(b["view"])
            label.append(b["label"])
        if not moments:
            raise RuntimeError(f"no readable image among items {start}..{end - 1}")
        tensors = {"moments": torch.cat(moments), "index": torch.cat(index), "view": torch.cat(view),
                   "label": torch.cat(label)}
        return tensors, {"count": str(len(tensors["index"]))}


def build_latent_cache(accelerator, cfg, dataset, vae) -> Path:
    """Encode ``cache.views`` crops of every image with the VAE and store (mean, logvar) in shards (resumable)."""
    cc = cfg.cache
    folder = Path(cc.dir or Path(cfg.output_dir) / "latent_cache")
    views = int(cc.views)
    settings = {"vae": str(cfg.vae.path), "vae_config": dict(vae.config), "data": data_settings(cfg), "views": views,
                "seed": int(cfg.seed), "dtype": cc.dtype, "n": len(dataset)}
    encode = LatentShardEncoder(accelerator, vae, dataset, views, int(cc.batch_size), int(cfg.data.num_workers),
                                DTYPES[cc.dtype])
    run_sharded(accelerator, folder, len(dataset) * views, int(cc.shard_size), fingerprint(settings), encode,
                settings, desc="latent cache")
    return folder


@dataclass(kw_only=True)
class TokenizerRun(TrainRun):
    """What train_tokenizer's step, evaluation and export share: :class:`TrainRun` (``raw`` is the unwrapped
    :class:`TokenizerTrainModule`) plus the frozen VAE, the latent geometry and the REPA target encoder."""

    vae: nn.Module
    scaling_factor: float             # the VAE's latent scaling factor
    downsample: int                   # the VAE's spatial downsampling
    patch: int                        # FlexTok's patch size (model.patch_size)
    repa: nn.Module | None            # RepaTarget, or None without REPA


def main(argv=None, cfg=None, repa_encoder=None):
    """``repa_encoder``: optional module or factory overriding ``repa.encoder`` (Python API)."""
    if cfg is None:
        cfg = config_from_argv(argv, DEFAULTS, __doc__)
    return run_stage(build_run(cfg, repa_encoder), train_step, evaluate, export,
                     batch_size_of=lambda b: len(b["index"]))


def build_run(cfg, repa_encoder=None) -> TokenizerRun:
    """Accelerator, frozen VAE, FlexTok + REPA, data (and latent cache), optimizer, EMA and checkpoints, in the
    order that fixes the random streams: the global seed before the models, the per-rank seed after ``prepare``."""
    accelerator = start_run(cfg, "train_tokenizer")
    if not cfg.vae.path:
        raise ValueError("vae.path is required (an AutoencoderKL folder such as train_vae's export, a pipeline "
                         "folder, or a hub id)")
    if not cfg.data.path:
        raise ValueError("data.path is required")
    device = accelerator.device
    vae = load_vae(cfg.vae.path, torch_dtype=DTYPES[cfg.vae.dtype]).to(device).eval().requires_grad_(False)
    down = vae_downsample(vae)
    patch, grid = patch_and_grid(cfg, down)
    flextok = build_flextok_model(cfg, vae, grid)
    module, repa = build_train_module(cfg, flextok, grid, device, repa_encoder)
    dataset, collate_fn, loader = build_data(accelerator, cfg, vae, with_pixels=repa is not None)
    return TokenizerRun.prepare(cfg, accelerator, module, loader, dataset, collate_fn,
                                lambda raw: raw.flextok.parameters, vae=vae,
                                scaling_factor=float(vae.config.scaling_factor), downsample=down, patch=patch,
                                repa=repa)


def patch_and_grid(cfg, down: int) -> tuple[int, tuple[int, int]]:
    """-> (patch size, the decoder's patch grid at ``data.resolution``) for a VAE that downsamples by ``down``."""
    patch = int(cfg.model.get("patch_size", 2))
    res = int(cfg.data.resolution)
    if res % (down * patch):
        raise ValueError(f"data.resolution {res} must be a multiple of {down * patch} (VAE /{down} x patch {patch})")
    return patch, (res // (down * patch), res // (down * patch))


def build_flextok_model(cfg, vae, grid: tuple[int, int]):
    """``init_from``'s FlexTok, or a fresh one from ``model`` (latent channels, grid and posterior sampling default
    to the VAE's, the data's and ``vae.sample_posterior``)."""
    mk = dict(cfg.model)
    mk.setdefault("latent_channels", int(vae.config.latent_channels))
    mk.setdefault("grid_size", list(grid))
    mk.setdefault("sample_posterior", bool(cfg.vae.sample_posterior))
    if cfg.init_from:
        from ..flextok_core import FlexTokModel

        p = Path(cfg.init_from)
        sub = "flextok" if (p / "flextok").is_dir() else None
        flextok = FlexTokModel.from_pretrained(str(p), subfolder=sub)
    else:
        flextok = build_flextok(mk)
    if int(flextok.config.latent_channels) != int(vae.config.latent_channels):
        raise ValueError(f"model.latent_channels {flextok.config.latent_channels} != VAE latent channels "
                         f"{vae.config.latent_channels}")
    return flextok


def build_train_module(cfg, flextok, grid, device, repa_encoder=None) -> tuple[TokenizerTrainModule, nn.Module | None]:
    """FlexTok + the REPA projector in one train module, and the frozen REPA target (None without REPA)."""
    rc = cfg.repa
    repa = build_repa_target(rc, grid, encoder=repa_encoder) if (rc.encoder not in (None, "none") or repa_encoder) \
        and float(rc.weight) > 0 else None
    projector = None
    if repa is not None:
        repa.to(device)
        if not 0 <= int(rc.layer) < int(flextok.config.decoder_depth):
            raise ValueError(f"repa.layer must be in [0, {flextok.config.decoder_depth}), got {rc.layer}")
        projector = build_mlp(int(flextok.config.decoder_dim), int(rc.proj_dim), repa.feature_dim,
                              int(rc.proj_layers))
    module = TokenizerTrainModule(flextok, projector, cfg.train, int(rc.layer), float(rc.weight))
    if cfg.train.gradient_checkpointing:
        activation_checkpointing([*flextok.encoder.blocks, *flextok.decoder.blocks])
    logger.info("FlexTok: %.2fM parameters (encoder %.2fM, decoder %.2fM)%s", count_params(flextok) / 1e6,
                count_params(flextok.encoder) / 1e6, count_params(flextok.decoder) / 1e6,
                f"; REPA projector {count_params(projector) / 1e6:.2f}M" if projector is not None else "")
    return module, repa


def build_data(accelerator, cfg, vae, with_pixels: bool):
    """The images, or with ``cache.enabled`` their cached VAE posteriors (the cache is built first; ``with_pixels``
    adds each crop's pixels, for REPA targets). -> (dataset, collate_fn, loader)."""
    images = build_dataset(cfg.data, seed=int(cfg.seed))
    if cfg.cache.enabled:
        if is_streaming(images):
            raise ValueError("cache.enabled needs map-style data (not streaming)")
        folder = build_latent_cache(accelerator, cfg, images, vae)
        dataset = CachedLatentDataset(folder, int(cfg.seed), images if with_pixels else None)
        collate_fn = collate_latents
    else:
        dataset, collate_fn = images, None
    loader = make_loader(dataset, int(cfg.data.batch_size), int(cfg.seed), bool(cfg.data.shuffle),
                         int(cfg.data.num_workers), collate_fn=collate_fn)
    return dataset, collate_fn, loader


@torch.no_grad()
def latents_of(run: TokenizerRun, batch: dict, generator=None) -> torch.Tensor:
    """Scaled VAE latents of a batch: sampled from (or the mean of) its cached moments or its pixels' posterior."""
    device = run.device
    if "moments" in batch:
        mean, logvar = batch["moments"].to(device).float().chunk(2, dim=1)
        if run.cfg.vae.sample_posterior:
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
            z = mean + std * randn(mean.shape, generator, device=device)
        else:
            z = mean
        return z * run.scaling_factor
    x = to_float(batch["pixels"].to(device))
    with run.accelerator.autocast():
        post = run.vae.encode(x.to(run.vae.dtype)).latent_dist
        z = post.sample(generator=generator) if run.cfg.vae.sample_posterior else post.mode()
    return z.float() * run.scaling_factor


@torch.no_grad()
def repa_target_of(run: TokenizerRun, batch: dict) -> torch.Tensor | None:
    """The REPA encoder's features of a batch's pixels on the decoder's patch grid (None without REPA or pixels)."""
    if run.repa is None or "pixels" not in batch:
        return None
    with run.accelerator.autocast():
        return run.repa(to_float(batch["pixels"].to(run.device)), patch_grid_of(run, batch)).float()


def patch_grid_of(run: TokenizerRun, batch: dict) -> tuple[int, int]:
    if "moments" in batch:
        h, w = batch["moments"].shape[-2:]
    else:
        h, w = (s // run.downsample for s in batch["pixels"].shape[-2:])
    return h // run.patch, w // run.patch


def train_step(run: TokenizerRun, batch: dict, state: LoopState) -> dict:
    """One micro-batch: flow (+ REPA) loss, backward pass and, on a sync step, the optimizer update."""
    acc = run.accelerator
    x0 = latents_of(run, batch)
    target = repa_target_of(run, batch)
    with acc.accumulate(run.module):
        with acc.autocast():
            out = run.module(x0, target)
        acc.backward(out["loss"])
        out.update(optimizer_update(acc, run.module, run.optimizer, run.cfg.optim, state.step, run.total_steps))
    return {k: (v.detach() if torch.is_tensor(v) else v) for k, v in out.items()}


@torch.no_grad()
def evaluate(run: TokenizerRun) -> dict:
    """Losses on the fixed batch (fixed noise), the flow loss with one and with all tokens, and the code health."""
    g = torch.Generator(device=run.device).manual_seed(1234)
    x0 = latents_of(run, run.fixed, generator=g)
    target = repa_target_of(run, run.fixed)
    flextok = run.raw.flextok
    with run.accelerator.autocast():
        out = run.module(x0, target, generator=g)
        # flow loss with every token kept and with one token (nested dropout's two ends)
        n = flextok.config.num_registers
        for k in sorted({1, n}):
            g.manual_seed(99)
            kk = torch.full((x0.shape[0],), k, device=run.device, dtype=torch.long)
            out[f"flow_k{k}"] = run.module(x0, None, generator=g, keep_k=kk)["flow"]
        out.update(code_health(flextok, x0))
    return {k: float(v) for k, v in out.items()}


def export(run: TokenizerRun, state: LoopState) -> None:
    """``export.dir``: a FlexTokPipeline folder (the VAE from ``vae.path``, FlexTok with the EMA weights with
    ``export.use_ema``, the default scheduler)."""
    weights = run.export_weights(run.raw.flextok.parameters(), "flextok.")
    if weights is None:
        return
    from ..flextok_core import FlexTokModel
    from ..pipelines import FlexTokPipeline

    model = FlexTokModel.from_config(run.raw.flextok.config)
    model.load_state_dict(weights)
    pipe = FlexTokPipeline(vae=load_vae(run.cfg.vae.path).eval(), flextok=model.eval(),
                           scheduler=FlexTokPipeline.default_scheduler())
    out_dir = run.export_dir()
    save_pretrained_atomic(pipe, out_dir)
    logger.info("exported FlexTokPipeline (%s weights) to %s", "EMA" if run.export_ema else "raw", out_dir)


if __name__ == "__main__":
    main()
