"""FlexTok's use of a diffusers ``AutoencoderKL``: scaled latents, posterior sample or mean, no shift factor."""
from __future__ import annotations

import torch

from .rng import randn


def vae_encode(vae, images: torch.Tensor, sample_posterior: bool, generator=None) -> torch.Tensor:
    """Images ``[B,3,H,W]`` in [-1,1] -> latents ``[B,C,H/8,W/8]`` times the scaling factor.

    With ``sample_posterior`` the latents are ``mean + std * eps`` with one ``eps`` draw for the whole batch
    (global RNG when ``generator`` is None), exactly as the release's VAE wrapper. ``eps`` is drawn on the
    generator's device (the CPU or the VAE's; a list of generators draws image i from generator i) and moved, the
    same numbers as ``DiagonalGaussianDistribution.sample``.
    """
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    if sample_posterior:
        params = posterior.parameters
        latents = posterior.mean + posterior.std * randn(posterior.mean.shape, generator, params.device, params.dtype)
    else:
        latents = posterior.mode()
    return latents * vae.config.scaling_factor


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images ``[B,3,H,W]`` in about [-1,1] (not clamped)."""
    return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
