"""Stage 0: train a diffusers ``AutoencoderKL`` (16 latent channels, /8 by default) for FlexTok.

Loss (LDM recipe): pixel L1 or L2 + perceptual distance + ``kl_weight`` * KL, and after ``loss.disc_start`` steps a
PatchGAN hinge loss whose weight is adapted to the reconstruction gradient at the decoder's last layer.

    accelerate launch -m flextok_kit.training.train_vae --config vae_tiny data.path=/data/images

The export (``output_dir/export`` unless ``export.dir``) is an ``AutoencoderKL`` folder with its
``scaling_factor`` set to 1/std of the latents, ready for ``train_tokenizer`` (``vae.path=...``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import config_from_argv, merged_defaults
from .data import DATA_DEFAULTS, build_dataset, fixed_batch, make_loader, to_float
from .loop import run_stage
from ..metrics import build_perceptual, psnr, ssim
from .losses import PatchDiscriminator, adaptive_weight, hinge_d_loss, hinge_g_loss, kl_loss
from .models import build_vae, count_params, load_vae, save_pretrained_atomic
from .utils import (CheckpointManager, LoopState, TrainRun, build_adamw, build_ema, ema_checkpoint_slots, logger,
                    optimizer_update, resolve_max_steps, start_run)

DEFAULTS = merged_defaults({
    "output_dir": "runs/vae",
    "data": DATA_DEFAULTS,
    "vae": {
        "pretrained": None,          # start from an AutoencoderKL folder / hub id instead of a fresh model
        "model": {},                 # AutoencoderKL kwargs over models.VAE_DEFAULT_KWARGS (free-form)
        "gradient_checkpointing": False,
    },
    "loss": {
        "pixel": "l1",               # l1 | l2
        "pixel_weight": 1.0,
        "perceptual": "none",        # none | random_conv | stlpips-alex | stlpips-vgg | package.module:factory
        "perceptual_weight": 1.0,
        "kl_weight": 1.0e-6,
        "disc_start": None,          # optimizer step at which the GAN loss starts; null = no discriminator
        "disc_weight": 0.5,
        "adaptive_weight": True,
        "disc_layers": 3,
        "disc_channels": 64,
        "disc_norm": "group",        # group | batch | none
        "disc_lr": None,             # null = optim.lr
    },
    "optim": {"lr": 1.0e-4, "betas": [0.5, 0.9], "weight_decay": 0.0, "eps": 1.0e-8, "warmup_steps": 0,
              "schedule": "constant", "min_lr_ratio": 0.0, "grad_clip": 1.0},
    "ema": {"decay": 0.0, "warmup": True, "update_after_step": 0},   # decay 0 = no EMA
    "export": {"dir": None, "scaling_factor": "auto", "scaling_batches": 4, "use_ema": True},
})


class VAETrainModule(nn.Module):
    """Wraps the VAE so that DDP/FSDP see one forward: images -> (reconstruction, posterior mean, logvar)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, sample: bool = True, generator=None):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator=generator) if sample else posterior.mode()
        recon = self.vae.decode(z).sample
        return recon, posterior.mean, posterior.logvar


def pixel_loss(recon, x, kind: str) -> torch.Tensor:
    if kind == "l1":
        return (recon.float() - x.float()).abs().mean()
    if kind == "l2":
        return F.mse_loss(recon.float(), x.float())
    raise ValueError(f"loss.pixel must be l1 or l2, got {kind!r}")


@dataclass(kw_only=True)
class VAERun(TrainRun):
    """What train_vae's step, evaluation and export share: :class:`TrainRun` (``optimizer`` is the VAE's) plus the
    discriminator and its optimizer (None without ``loss.disc_start``), the perceptual network and the dataset."""

    disc: nn.Module | None
    opt_d: torch.optim.Optimizer | None
    perceptual: nn.Module | None
    dataset: Any


def main(argv=None, cfg=None):
    if cfg is None:
        cfg = config_from_argv(argv, DEFAULTS, __doc__)
    run = build_run(cfg)
    return run_stage(run, train_step, evaluate, export,
                     modules=[run.module] + ([run.disc] if run.disc is not None else []))


def build_models(cfg) -> tuple[VAETrainModule, nn.Module | None, nn.Module | None]:
    """-> (the train module around a fresh or ``vae.pretrained`` VAE, the PatchGAN discriminator or None, the
    perceptual network or None)."""
    vae = load_vae(cfg.vae.pretrained) if cfg.vae.pretrained else build_vae(cfg.vae.model)
    if cfg.vae.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    module = VAETrainModule(vae.train())
    lc = cfg.loss
    use_disc = lc.disc_start is not None and float(lc.disc_weight) > 0
    disc = PatchDiscriminator(3, int(lc.disc_channels), int(lc.disc_layers), lc.disc_norm) if use_disc else None
    perceptual = build_perceptual(lc.perceptual)
    logger.info("VAE: %.2fM parameters%s", count_params(vae) / 1e6,
                f", discriminator {count_params(disc) / 1e6:.2f}M" if disc else "")
    return module, disc, perceptual


def build_run(cfg) -> VAERun:
    """Accelerator, models, data, optimizers, EMA and checkpoints, in the order that fixes the random streams: the
    global seed before the models, the per-rank seed after ``accelerator.prepare``."""
    from accelerate.utils import set_seed

    accelerator = start_run(cfg, "train_vae")
    if not cfg.data.path:
        raise ValueError("data.path is required (an image folder, tar shards or a datasets name/path)")
    module, disc, perceptual = build_models(cfg)
    dataset = build_dataset(cfg.data, seed=int(cfg.seed))
    loader = make_loader(dataset, int(cfg.data.batch_size), int(cfg.seed), bool(cfg.data.shuffle),
                         int(cfg.data.num_workers))
    opt_g = build_adamw(module.named_parameters(), cfg.optim)
    if disc is not None:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=float(cfg.loss.disc_lr or cfg.optim.lr),
                                  betas=tuple(cfg.optim.betas), weight_decay=0.0)
        module, opt_g, disc, opt_d, loader = accelerator.prepare(module, opt_g, disc, opt_d, loader)
    else:
        opt_d = None
        module, opt_g, loader = accelerator.prepare(module, opt_g, loader)
    if perceptual is not None:
        perceptual.to(accelerator.device)
    raw = accelerator.unwrap_model(module)
    ema, emas = build_ema(cfg.ema, raw.parameters, accelerator.device)
    set_seed(int(cfg.seed), device_specific=True)  # per-rank training randomness (restored by load_state)
    ckpt = CheckpointManager(accelerator, cfg.output_dir, int(cfg.keep_last), **ema_checkpoint_slots(accelerator, ema))
    total = resolve_max_steps(cfg, loader)
    fixed = fixed_batch(dataset, int(cfg.eval_batch_size))
    return VAERun(cfg=cfg, accelerator=accelerator, module=module, raw=raw, optimizer=opt_g, loader=loader, ema=ema,
                  emas=emas, ckpt=ckpt, total_steps=total, fixed=fixed, disc=disc, opt_d=opt_d,
                  perceptual=perceptual, dataset=dataset)


def train_step(run: VAERun, batch: dict, state: LoopState) -> dict:
    """One micro-batch: the VAE's loss and update, then (once ``loss.disc_start`` is reached) the
    discriminator's. -> values to log."""
    acc = run.accelerator
    x = to_float(batch["pixels"].to(acc.device))
    gan_on = run.disc is not None and state.step >= int(run.cfg.loss.disc_start)
    models = (run.module, run.disc) if run.disc is not None else (run.module,)
    with acc.accumulate(*models):
        with acc.autocast():
            recon, loss, out = generator_loss(run, x, gan_on)
        acc.backward(loss)
        out.update(optimizer_update(acc, run.module, run.optimizer, run.cfg.optim, state.step, run.total_steps))
        out["loss"] = loss.detach()
        if gan_on:
            out["d_loss"] = discriminator_update(run, x, recon)
    return out


def generator_loss(run: VAERun, x: torch.Tensor, gan_on: bool) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The VAE's loss on ``x``: pixel + perceptual + KL (+ the adaptively weighted hinge GAN term when ``gan_on``).
    -> (reconstruction, loss, detached terms to log)."""
    lc = run.cfg.loss
    out = {}
    recon, mean, logvar = run.module(x)
    rec = pixel_loss(recon, x, lc.pixel)
    nll = float(lc.pixel_weight) * rec
    out["rec"] = rec.detach()
    if run.perceptual is not None and float(lc.perceptual_weight) > 0:
        p = run.perceptual(recon.float(), x).mean()
        nll = nll + float(lc.perceptual_weight) * p
        out["perceptual"] = p.detach()
    kl = kl_loss(mean.float(), logvar.float())
    loss = nll + float(lc.kl_weight) * kl
    out["kl"] = kl.detach()
    if gan_on:
        d_raw = run.accelerator.unwrap_model(run.disc)
        d_raw.requires_grad_(False)
        g = hinge_g_loss(d_raw(recon).float())
        d_raw.requires_grad_(True)
        if lc.adaptive_weight:
            w = adaptive_weight(nll, g, run.raw.vae.decoder.conv_out.weight) * float(lc.disc_weight)
        else:
            w = torch.tensor(float(lc.disc_weight), device=x.device)
        loss = loss + w * g
        out.update(g_loss=g.detach(), d_weight=w)
    return recon, loss, out


def discriminator_update(run: VAERun, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss on real ``x`` versus the detached ``recon``, its backward pass and optimizer
    step (inside the caller's ``accelerator.accumulate``). -> the detached loss."""
    acc, oc = run.accelerator, run.cfg.optim
    with acc.autocast():  # one forward over [real, fake] (one DDP forward per backward)
        logits = run.disc(torch.cat([x, recon.detach().to(x.dtype)])).float()
        d_loss = hinge_d_loss(*logits.chunk(2))
    acc.backward(d_loss)
    if acc.sync_gradients and oc.grad_clip:
        acc.clip_grad_norm_(run.disc.parameters(), float(oc.grad_clip))
    run.opt_d.step()
    run.opt_d.zero_grad(set_to_none=True)
    return d_loss.detach()


@torch.no_grad()
def evaluate(run: VAERun) -> dict:
    """Reconstruction of the fixed batch from the posterior mean: losses, PSNR, SSIM."""
    lc = run.cfg.loss
    x = to_float(run.fixed["pixels"].to(run.device))
    run.module.eval()
    with run.accelerator.autocast():
        recon, mean, logvar = run.module(x, sample=False)
    run.module.train()
    recon = recon.float()
    rec = pixel_loss(recon, x, lc.pixel)
    m = {"rec": rec, "psnr": psnr(recon, x).mean(), "ssim": ssim(recon, x).mean(),
         "kl": kl_loss(mean.float(), logvar.float())}
    loss = float(lc.pixel_weight) * rec + float(lc.kl_weight) * m["kl"]
    if run.perceptual is not None:
        m["perceptual"] = run.perceptual(recon, x).mean()
        loss = loss + float(lc.perceptual_weight) * m["perceptual"]
    m["loss"] = loss
    return {k: float(v) for k, v in m.items()}


def export(run: VAERun, state: LoopState) -> None:
    """``export.dir``: an AutoencoderKL folder (EMA weights with ``export.use_ema``) with its ``scaling_factor``."""
    weights = run.export_weights(run.raw.parameters(), "vae.")
    if weights is None:
        return
    from diffusers import AutoencoderKL

    cfg = run.cfg
    final = AutoencoderKL.from_config(run.raw.vae.config)
    final.load_state_dict(weights)
    final.eval()
    sf = cfg.export.scaling_factor
    if sf in ("auto", None):
        sf = estimate_scaling_factor(final, run.dataset, int(cfg.export.scaling_batches), int(cfg.data.batch_size),
                                     run.device)
    final.register_to_config(scaling_factor=float(sf))
    out_dir = run.export_dir()
    save_pretrained_atomic(final, out_dir)
    logger.info("exported AutoencoderKL (scaling_factor %.4f) to %s", float(sf), out_dir)


@torch.no_grad()
def estimate_scaling_factor(vae, dataset, num_batches: int, batch_size: int, device) -> float:
    """1 / std of posterior samples over the first ``num_batches * batch_size`` samples (epoch-0 crops)."""
    vae = copy.deepcopy(vae).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    xs = []
    n = min(len(dataset), num_batches * batch_size) if hasattr(dataset, "__len__") else num_batches * batch_size
    for start in range(0, n, batch_size):
        b = fixed_batch_range(dataset, start, min(n, start + batch_size))
        x = to_float(b.to(device))
        xs.append(vae.encode(x).latent_dist.sample(generator=g).float().flatten())
    z = torch.cat(xs)
    return float(1.0 / z.std().clamp_min(1e-6))


def fixed_batch_range(dataset, start, end):
    from .data import collate, is_streaming

    if is_streaming(dataset):
        return fixed_batch(dataset, end - start)["pixels"]
    return collate([dataset[(i, 0)] for i in range(start, end)])["pixels"]


if __name__ == "__main__":
    main()
