"""Building, initialising and loading the models the training scripts need."""
from __future__ import annotations

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
