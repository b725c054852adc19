"""FlexTok's use of a diffusers ``AutoencoderKL``: scaled latents, posterior sample or mean, no shift factor."""
from __future__ import annotations

import torch
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from .precision import REDUCED_PRECISION, cpu_attention_fallback
from .rng import randn


def prefer_channels_last(vae) -> None:
    """Store a bfloat16 / float16 VAE's convolution weights channels-last (once; a no-op afterwards).

    Reduced-precision convolutions and GroupNorm run in oneDNN's (CPU) and cuDNN's (GPU) channels-last kernels;
    in the default layout PyTorch reorders every activation around every convolution. Measured on a 2-core AMX
    Xeon, real-size VAE at 256x256 in bf16: decode 0.86 -> 0.35 s, encode 0.49 -> 0.19 s. float32 keeps the
    default layout (no gain there, and the float32 path stays bit-for-bit what it was)."""
    weight = vae.decoder.conv_in.weight
    if weight.dtype in REDUCED_PRECISION and not weight.is_meta \
            and not weight.is_contiguous(memory_format=torch.channels_last):
        vae.to(memory_format=torch.channels_last)


def vae_chunks(batch: int, device: torch.device, batch_size: int | None = None) -> list[slice]:
    """Slices of a batch for the VAE: ``batch_size`` images at a time; by default one at a time on the CPU (its
    activations at 256x256 -- 128-512 channels -- leave the caches beyond one image: per image, a batch of 8 cost
    1.7x (bf16) a single image) and the whole batch on accelerators."""
    size = batch_size or (1 if torch.device(device).type == "cpu" else batch)
    return [slice(i, min(i + size, batch)) for i in range(0, batch, size)]


def vae_encode(vae, images: torch.Tensor, sample_posterior: bool, generator=None,
               batch_size: int | None = None) -> torch.Tensor:
    """Images ``[B,3,H,W]`` in [-1,1] -> latents ``[B,C,H/8,W/8]`` times the scaling factor.

    With ``sample_posterior`` the latents are ``mean + std * eps`` with one ``eps`` draw for the whole batch
    (global RNG when ``generator`` is None), exactly as the release's VAE wrapper. ``eps`` is drawn on the
    generator's device (the CPU or the VAE's; a list of generators draws image i from generator i) and moved, the
    same numbers as ``DiagonalGaussianDistribution.sample``. The VAE runs on :func:`vae_chunks` of the batch; the
    draw is one for the whole batch whatever the chunks.
    """
    prefer_channels_last(vae)
    images = images.to(vae.dtype)
    with cpu_attention_fallback(vae.dtype, images.device):
        params = torch.cat([vae.encode(images[c]).latent_dist.parameters
                            for c in vae_chunks(images.shape[0], images.device, batch_size)])
    posterior = DiagonalGaussianDistribution(params)
    if sample_posterior:
        latents = posterior.mean + posterior.std * randn(posterior.mean.shape, generator, params.device, params.dtype)
    else:
        latents = posterior.mode()
    return latents * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor, batch_size: int | None = None) -> torch.Tensor:
    """Scaled latents -> images ``[B,3,H,W]`` in about [-1,1] (not clamped); the VAE runs on :func:`vae_chunks`."""
    prefer_channels_last(vae)
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    with cpu_attention_fallback(vae.dtype, latents.device):
        return torch.cat([vae.decode(latents[c]).sample
                          for c in vae_chunks(latents.shape[0], latents.device, batch_size)])
