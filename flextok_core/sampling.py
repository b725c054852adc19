"""Rectified-flow sampling pieces: the time grid, the guided velocity (CFG, APG), and the checks of sampling
settings shared by the pipeline and the AR model (one validator, one wording)."""
from __future__ import annotations

import math
import numbers

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance


# ---------------------------------------------------------------------------------------------------------
# validation of user-facing settings: errors name the argument, the accepted range and the value
# ---------------------------------------------------------------------------------------------------------
def _type_name(value) -> str:
    return type(value).__name__


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an int in ``minimum..maximum`` (either bound optional); bools, floats and strings are refused
    (``2.7`` tokens or ``True`` steps are mistakes, not numbers to round)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if minimum is not None and maximum is not None:
        accepted = f"an integer in {minimum}..{maximum}"
    elif minimum is not None:
        accepted = f"an integer >= {minimum}"
    else:
        accepted = "an integer" if maximum is None else f"an integer <= {maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be {accepted}, got {value!r} ({_type_name(value)})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}, got {value}")
    return value


def check_float(name: str, value, minimum: float | None = None, maximum: float | None = None,
                open_minimum: bool = False, hint: str = "") -> float:
    """``value`` as a finite float in ``[minimum, maximum]`` (``(minimum, ...`` with ``open_minimum``); NaN,
    inf, bools and non-numbers are refused. ``hint`` is appended to the message (what the values mean)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        value = value.item()
    if minimum is not None and maximum is not None:
        accepted = f"a finite number in {'(' if open_minimum else '['}{minimum:g}, {maximum:g}]"
    elif minimum is not None:
        accepted = f"a finite number {'>' if open_minimum else '>='} {minimum:g}"
    else:
        accepted = "a finite number" + ("" if maximum is None else f" <= {maximum:g}")
    hint = f" ({hint})" if hint else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {accepted}{hint}, got {value!r} ({_type_name(value)})")
    value = float(value)
    if not math.isfinite(value) or (minimum is not None and (value <= minimum if open_minimum else value < minimum)) \
            or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be {accepted}{hint}, got {value}")
    return value


GUIDANCE_HINT = "1 = no guidance, 0 = unconditional, above 1 = stronger guidance"


def check_guidance_scale(name: str, value) -> float:
    """A classifier-free guidance scale (decoder or AR): finite and >= 0. Scales in [0, 1) interpolate towards
    the unconditional prediction and are legal; a negative scale would push away from the condition (guide
    towards its opposite), which no FlexTok use needs, so it is refused as a likely sign error."""
    return check_float(name, value, minimum=0.0, hint=GUIDANCE_HINT)


def check_decoder_sampling(num_inference_steps, guidance_scale, apg_momentum, apg_norm_threshold,
                           apg_eta) -> tuple[int, float, float, float, float]:
    """The rectified-flow decoder's sampling settings, checked and normalised:

    * ``num_inference_steps``: an int >= 1;
    * ``guidance_scale``: see :func:`check_guidance_scale`;
    * ``apg_momentum``: finite in [-1, 1] (``None`` = 0, no momentum); beyond that the running average grows
      geometrically with the steps (the release uses -0.5);
    * ``apg_norm_threshold``: finite >= 0; ``None`` or 0 = no clipping of the guidance difference (release 2.5);
    * ``apg_eta``: finite in [0, 1], the weight of the difference's component parallel to the conditional
      prediction (0 = drop it, as the release does; 1 = keep it, clipped CFG).
    """
    steps = check_int("num_inference_steps", num_inference_steps, minimum=1)
    scale = check_guidance_scale("guidance_scale", guidance_scale)
    momentum = 0.0 if apg_momentum is None else check_float(
        "apg_momentum", apg_momentum, -1.0, 1.0, hint="the release uses -0.5; None or 0 = no momentum")
    threshold = 0.0 if apg_norm_threshold is None else check_float(
        "apg_norm_threshold", apg_norm_threshold, minimum=0.0, hint="None or 0 = no clipping; the release uses 2.5")
    eta = check_float("apg_eta", apg_eta, 0.0, 1.0, hint="0 = drop the parallel component, as the release does")
    return steps, scale, momentum, threshold, eta


def check_guidance_value(value, t: float) -> float:
    """One value returned by a ``guidance_schedule(t)`` callable."""
    return check_guidance_scale(f"guidance_schedule(t={t:g})", value)


def flow_timesteps(num_steps: int) -> list[float]:
    """t = 1, (T-1)/T, ..., 1/T; Euler steps ``x <- x - v / T`` take t = 1 (noise) to t = 0 (data)."""
    num_steps = check_int("num_inference_steps", num_steps, minimum=1)
    return [(num_steps - i) / num_steps for i in range(num_steps)]


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def apg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, momentum: MomentumBuffer,
                 norm_threshold: float = 2.5, eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance as FlexTok uses it: ``v_cond + (s-1) * (orthogonal part of the clipped
    momentum-averaged difference)``; per-sample norms over (C,h,w)."""
    return normalized_guidance(v_cond, v_uncond, scale - 1.0, momentum, eta=eta, norm_threshold=norm_threshold,
                               use_original_formulation=True)


__all__ = ["MomentumBuffer", "apg_velocity", "cfg_velocity", "check_decoder_sampling", "check_float",
           "check_guidance_scale", "check_int", "flow_timesteps"]
