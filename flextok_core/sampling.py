"""Rectified-flow sampling: the Euler time grid and the check of the decoder's sampling settings (guidance itself
lives in :mod:`.guidance`)."""
from __future__ import annotations

from .checks import check_int
from .guidance import check_apg, check_guidance_scale


def check_decoder_sampling(num_inference_steps, guidance_scale, apg_momentum, apg_norm_threshold,
                           apg_eta) -> tuple[int, float, float, float, float]:
    """The rectified-flow decoder's sampling settings, checked and normalised:

    * ``num_inference_steps``: an int >= 1;
    * ``guidance_scale``: see :func:`.guidance.check_guidance_scale`;
    * ``apg_momentum``, ``apg_norm_threshold``, ``apg_eta``: see :func:`.guidance.check_apg`.
    """
    steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
    scale = check_guidance_scale("guidance_scale", guidance_scale)
    momentum, threshold, eta = check_apg(apg_momentum, apg_norm_threshold, apg_eta)
    return steps, scale, momentum, threshold, eta


def flow_timesteps(num_steps: int) -> list[float]:
    """t = 1, (T-1)/T, ..., 1/T; Euler steps ``x <- x - v / T`` take t = 1 (noise) to t = 0 (data)."""
    num_steps = check_int("num_inference_steps", num_steps, minimum=1)
    return [(num_steps - i) / num_steps for i in range(num_steps)]


__all__ = ["check_decoder_sampling", "flow_timesteps"]
