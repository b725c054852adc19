"""Classifier-free guidance, as FlexTok uses it: CFG and adaptive projected guidance (APG) of the decoder's
velocity, CFG of the AR model's logits, guidance schedules (per decoder step, per AR token), and the checks of the
guidance settings (scale, schedule values, APG) shared by the pipeline and the AR model."""
from __future__ import annotations

from typing import Callable

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance

from .checks import check_float

GUIDANCE_HINT = "1 = no guidance, 0 = unconditional, above 1 = stronger guidance"
GUIDANCE_SCHEDULES = ("constant", "linear")  # AR per-token schedules


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------
def check_guidance_scale(name: str, value) -> float:
    """A classifier-free guidance scale (decoder or AR): finite and >= 0. Scales in [0, 1) interpolate towards
    the unconditional prediction and are legal; a negative scale would push away from the condition (guide
    towards its opposite), which no FlexTok use needs, so it is refused as a likely sign error."""
    return check_float(name, value, minimum=0.0, hint=GUIDANCE_HINT)


def check_guidance_value(value, t: float) -> float:
    """One value returned by a ``guidance_schedule(t)`` callable."""
    return check_guidance_scale(f"guidance_schedule(t={t:g})", value)


def check_apg(apg_momentum, apg_norm_threshold, apg_eta) -> tuple[float, float, float]:
    """APG settings, checked and normalised:

    * ``apg_momentum``: finite in [-1, 1] (``None`` = 0, no momentum); beyond that the running average grows
      geometrically with the steps (the release uses -0.5);
    * ``apg_norm_threshold``: finite >= 0; ``None`` or 0 = no clipping of the guidance difference (release 2.5);
    * ``apg_eta``: finite in [0, 1], the weight of the difference's component parallel to the conditional
      prediction (0 = drop it, as the release does; 1 = keep it, clipped CFG).
    """
    momentum = 0.0 if apg_momentum is None else check_float(
        "apg_momentum", apg_momentum, -1.0, 1.0, hint="the release uses -0.5; None or 0 = no momentum")
    threshold = 0.0 if apg_norm_threshold is None else check_float(
        "apg_norm_threshold", apg_norm_threshold, minimum=0.0, hint="None or 0 = no clipping; the release uses 2.5")
    eta = check_float("apg_eta", apg_eta, 0.0, 1.0, hint="0 = drop the parallel component, as the release does")
    return momentum, threshold, eta


# ---------------------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------------------
def decoder_guidance_scales(guidance_scale: float, guidance_schedule: Callable | None, sigmas) -> list[float]:
    """The decoder's guidance scale at each step: constant, or ``guidance_schedule(t)`` at every ``t`` of
    ``sigmas`` (each value checked)."""
    if guidance_schedule is None:
        return [float(guidance_scale)] * len(sigmas)
    if not callable(guidance_schedule):
        raise TypeError(f"guidance_schedule must be None or a callable t -> scale, got "
                        f"{type(guidance_schedule).__name__}")
    return [check_guidance_value(guidance_schedule(float(t)), float(t)) for t in sigmas]


def guidance_scales(num_tokens: int, guidance_scale: float, schedule: str = "constant") -> list[float]:
    """Per-token CFG scale of the AR model. ``linear`` ramps from 1 at token 0 to ``guidance_scale`` at the last
    token, so the coarse first tokens (global layout) are guided least; a single token is the ramp's start
    (scale 1)."""
    if schedule not in GUIDANCE_SCHEDULES:
        raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")
    if schedule == "constant":
        return [float(guidance_scale)] * num_tokens
    return [1.0 + (guidance_scale - 1.0) * i / max(num_tokens - 1, 1) for i in range(num_tokens)]


# ---------------------------------------------------------------------------------------------------------
# guided predictions
# ---------------------------------------------------------------------------------------------------------
def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def apg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, momentum: MomentumBuffer,
                 norm_threshold: float = 2.5, eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance as FlexTok uses it: ``v_cond + (s-1) * (orthogonal part of the clipped
    momentum-averaged difference)``; per-sample norms over (C,h,w)."""
    return normalized_guidance(v_cond, v_uncond, scale - 1.0, momentum, eta=eta, norm_threshold=norm_threshold,
                               use_original_formulation=True)


def cfg_logits(logits: torch.Tensor, scale: float) -> torch.Tensor:
    """Doubled-batch logits ``[2B, V]`` (conditional rows first) -> guided ``[B, V]``: null + s (cond - null)."""
    cond, uncond = logits.float().chunk(2)
    return uncond + scale * (cond - uncond)


__all__ = ["GUIDANCE_SCHEDULES", "MomentumBuffer", "apg_velocity", "cfg_logits", "cfg_velocity", "check_apg",
           "check_guidance_scale", "check_guidance_value", "decoder_guidance_scales", "guidance_scales"]
