"""Stage 0: train a diffusers ``AutoencoderKL`` (16 latent channels, /8 by default) for FlexTok.

Loss (LDM recipe): pixel L1 or L2 + perceptual distance + ``kl_weight`` * KL, and after ``loss.disc_start`` steps a
PatchGAN hinge loss whose weight is adapted to the reconstruction gradient at the decoder's last layer.

    accelerate launch -m flextok_kit.training.train_vae --config vae_tiny data.path=/data/images

The export (``output_dir/export`` unless ``export.dir``) is an ``AutoencoderKL`` folder with its
``scaling_factor`` set to 1/std of the latents, ready for ``train_tokenizer`` (``vae.path=...``).
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import load_config, parse_cli
from .data import DATA_DEFAULTS, build_dataset, fixed_batch, make_loader, to_float
from .loop import training_loop
from .losses import (PatchDiscriminator, adaptive_weight, build_perceptual, hinge_d_loss, hinge_g_loss, kl_loss)
from .models import build_vae, count_params, load_vae, psnr, save_pretrained_atomic, ssim
from .utils import (CheckpointManager, build_ema, ema_checkpoint_slots, gathered_state_dict, build_accelerator,
                    build_adamw, init_run, logger, merged_defaults, optimizer_update, resolve_max_steps)

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


def main(argv=None, cfg=None):
    if cfg is None:
        path, overrides = parse_cli(argv, __doc__)
        cfg = load_config(path, overrides, DEFAULTS)
    from accelerate.utils import set_seed

    accelerator = build_accelerator(cfg)
    init_run(accelerator, cfg, "train_vae")
    set_seed(int(cfg.seed))
    if not cfg.data.path:
        raise ValueError("data.path is required (an image folder, tar shards or a datasets name/path)")

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

    dataset = build_dataset(cfg.data, seed=int(cfg.seed))
    loader = make_loader(dataset, int(cfg.data.batch_size), int(cfg.seed), bool(cfg.data.shuffle),
                         int(cfg.data.num_workers))
    opt_g = build_adamw(module.named_parameters(), cfg.optim)
    if disc is not None:
        opt_d = torch.optim.AdamW(disc.parameters(), lr=float(lc.disc_lr or cfg.optim.lr),
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
    oc = cfg.optim
    total = resolve_max_steps(cfg, loader)

    def train_step(batch, state):
        x = to_float(batch["pixels"].to(accelerator.device))
        gan_on = disc is not None and state.step >= int(lc.disc_start)
        models = (module, disc) if disc is not None else (module,)
        out = {}
        with accelerator.accumulate(*models):
            with accelerator.autocast():
                recon, mean, logvar = module(x)
                rec = pixel_loss(recon, x, lc.pixel)
                nll = float(lc.pixel_weight) * rec
                out["rec"] = rec.detach()
                if perceptual is not None and float(lc.perceptual_weight) > 0:
                    p = perceptual(recon.float(), x).mean()
                    nll = nll + float(lc.perceptual_weight) * p
                    out["perceptual"] = p.detach()
                kl = kl_loss(mean.float(), logvar.float())
                loss = nll + float(lc.kl_weight) * kl
                out["kl"] = kl.detach()
                if gan_on:
                    d_raw = accelerator.unwrap_model(disc)
                    d_raw.requires_grad_(False)
                    g = hinge_g_loss(d_raw(recon).float())
                    d_raw.requires_grad_(True)
                    if lc.adaptive_weight:
                        last = raw.vae.decoder.conv_out.weight
                        w = adaptive_weight(nll, g, last) * float(lc.disc_weight)
                    else:
                        w = torch.tensor(float(lc.disc_weight), device=x.device)
                    loss = loss + w * g
                    out.update(g_loss=g.detach(), d_weight=w)
            accelerator.backward(loss)
            out.update(optimizer_update(accelerator, module, opt_g, oc, state.step, total))
            out["loss"] = loss.detach()
            if gan_on:
                with accelerator.autocast():  # one forward over [real, fake] (one DDP forward per backward)
                    logits = disc(torch.cat([x, recon.detach().to(x.dtype)])).float()
                    d_loss = hinge_d_loss(*logits.chunk(2))
                accelerator.backward(d_loss)
                if accelerator.sync_gradients and oc.grad_clip:
                    accelerator.clip_grad_norm_(disc.parameters(), float(oc.grad_clip))
                opt_d.step()
                opt_d.zero_grad(set_to_none=True)
                out["d_loss"] = d_loss.detach()
        return out

    fixed = fixed_batch(dataset, int(cfg.eval_batch_size))

    @torch.no_grad()
    def evaluate():
        x = to_float(fixed["pixels"].to(accelerator.device))
        module.eval()
        with accelerator.autocast():
            recon, mean, logvar = module(x, sample=False)
        module.train()
        recon = recon.float()
        rec = pixel_loss(recon, x, lc.pixel)
        m = {"rec": rec, "psnr": psnr(recon, x).mean(), "ssim": ssim(recon, x).mean(),
             "kl": kl_loss(mean.float(), logvar.float())}
        loss = float(lc.pixel_weight) * rec + float(lc.kl_weight) * m["kl"]
        if perceptual is not None:
            m["perceptual"] = perceptual(recon, x).mean()
            loss = loss + float(lc.perceptual_weight) * m["perceptual"]
        m["loss"] = loss
        return {k: float(v) for k, v in m.items()}

    def export(state):
        out_dir = Path(cfg.export.dir or Path(cfg.output_dir) / "export")
        use_ema = ema is not None and cfg.export.use_ema
        sd = gathered_state_dict(accelerator, module, raw.parameters(), ema if use_ema else None)
        if sd is None:
            return
        from diffusers import AutoencoderKL

        final = AutoencoderKL.from_config(raw.vae.config)
        final.load_state_dict({k[len("vae."):]: v.float() for k, v in sd.items() if k.startswith("vae.")})
        final.eval()
        sf = cfg.export.scaling_factor
        if sf in ("auto", None):
            sf = estimate_scaling_factor(final, dataset, int(cfg.export.scaling_batches), int(cfg.data.batch_size),
                                         accelerator.device)
        final.register_to_config(scaling_factor=float(sf))
        save_pretrained_atomic(final, out_dir)
        logger.info("exported AutoencoderKL (scaling_factor %.4f) to %s", float(sf), out_dir)

    return training_loop(accelerator, cfg, loader, train_step, ckpt=ckpt, evaluate=evaluate, export=export, emas=emas,
                         modules=[module] + ([disc] if disc is not None else []))


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
