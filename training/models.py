"""Building, initialising and loading the models the training scripts need."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
from torch import nn

logger = logging.getLogger(__name__)

# AutoencoderKL with 16 latent channels and a /8 downsampling (FlexTok's VAE shape); override any key in vae.model
VAE_DEFAULT_KWARGS = dict(
    in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, layers_per_block=2,
    norm_num_groups=32, act_fn="silu", scaling_factor=1.0,
)


def build_vae(model_kwargs: dict | None = None):
    from diffusers import AutoencoderKL

    kwargs = dict(VAE_DEFAULT_KWARGS)
    kwargs.update(model_kwargs or {})
    n = len(kwargs["block_out_channels"])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if len(kwargs[key]) != n:
            kwargs[key] = [kind] * n
    return AutoencoderKL(**kwargs)


def load_vae(path: str, torch_dtype=None):
    """An ``AutoencoderKL`` folder (stage 0 export), a pipeline folder (its ``vae`` subfolder), or a hub id."""
    from diffusers import AutoencoderKL

    p = Path(path)
    if (p / "model_index.json").is_file() and (p / "vae").is_dir():
        return AutoencoderKL.from_pretrained(str(p / "vae"), torch_dtype=torch_dtype)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "vae" / "config.json").is_file():
        return AutoencoderKL.from_pretrained(str(p / "vae"), torch_dtype=torch_dtype)
    return AutoencoderKL.from_pretrained(str(path), torch_dtype=torch_dtype)


def vae_downsample(vae) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def init_flextok_weights(model, std: float = 0.02) -> None:
    """Training initialisation of a fresh :class:`FlexTokModel` (the core constructor leaves register, mask and null
    tokens at zero, which suits loading weights, not training): truncated-normal linear weights and tokens, zero
    biases, adaLN-zero (modulation and output projection start at zero, as in DiT)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    enc, dec = model.encoder, model.decoder
    for p in (enc.registers, dec.register_pos_embed, dec.mask_token):
        nn.init.trunc_normal_(p, std=std, a=-2 * std, b=2 * std)
    if isinstance(dec.null_cond, nn.Parameter):
        nn.init.trunc_normal_(dec.null_cond, std=std, a=-2 * std, b=2 * std)
    for block in dec.blocks:
        nn.init.zeros_(block.adaLN.weight)
        nn.init.zeros_(block.adaLN.bias)
    nn.init.zeros_(dec.final_adaLN.weight)
    nn.init.zeros_(dec.final_adaLN.bias)
    nn.init.zeros_(dec.proj_out.weight)
    nn.init.zeros_(dec.proj_out.bias)
    # encoder head: unit-variance pre-FSQ values, so that the codes spread over the levels from the start (with a
    # 0.02 init every image maps to the same middle code and the straight-through signal starts near zero)
    nn.init.normal_(enc.to_latents.weight, std=1.0 / math.sqrt(enc.to_latents.in_features))
    # the timestep MLP: normal(0.02) as DiT
    for lin in (dec.time_embed.linear_1, dec.time_embed.linear_2):
        nn.init.normal_(lin.weight, std=std)


def build_flextok(model_kwargs: dict, init: bool = True):
    from ..flextok_core import FlexTokModel

    kwargs = dict(model_kwargs)
    for key in ("grid_size", "fsq_levels"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    model = FlexTokModel(**kwargs)
    if init:
        init_flextok_weights(model)
    return model


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pretrained_atomic(obj, out_dir, **kwargs) -> None:
    """``obj.save_pretrained`` into a temp folder next to ``out_dir``, then swap it in."""
    from .utils import replace_dir

    out = Path(out_dir)
    tmp = out.with_name(f".tmp-{out.name}")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    obj.save_pretrained(str(tmp), **kwargs)
    replace_dir(tmp, out)


def write_json(path, data) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=1, default=str))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (per sample)."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM (uniform window, per-channel, on [0,1] images) per sample: a dependency-free approximation of
    skimage's ``structural_similarity`` with ``gaussian_weights=False``."""
    import torch.nn.functional as F

    x = (x.float().clamp(-1, 1) + 1) / 2
    y = (y.float().clamp(-1, 1) + 1) / 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    k = torch.ones(x.shape[1], 1, window, window, device=x.device) / window ** 2
    mu_x = F.conv2d(x, k, groups=x.shape[1])
    mu_y = F.conv2d(y, k, groups=x.shape[1])
    sxx = F.conv2d(x * x, k, groups=x.shape[1]) - mu_x ** 2
    syy = F.conv2d(y * y, k, groups=x.shape[1]) - mu_y ** 2
    sxy = F.conv2d(x * y, k, groups=x.shape[1]) - mu_x * mu_y
    n = window ** 2
    sxx, syy, sxy = sxx * n / (n - 1), syy * n / (n - 1), sxy * n / (n - 1)
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


def log2_int(n: int) -> int:
    return int(round(math.log2(n)))
