"""Rectified-flow sampling pieces: the time grid and the guided velocity (CFG, APG)."""
from __future__ import annotations

import torch
from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer, normalized_guidance


def flow_timesteps(num_steps: int) -> list[float]:
    """t = 1, (T-1)/T, ..., 1/T; Euler steps ``x <- x - v / T`` take t = 1 (noise) to t = 0 (data)."""
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    return [(num_steps - i) / num_steps for i in range(num_steps)]


def cfg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return v_uncond + scale * (v_cond - v_uncond)


def apg_velocity(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, momentum: MomentumBuffer,
                 norm_threshold: float = 2.5, eta: float = 0.0) -> torch.Tensor:
    """Adaptive projected guidance as FlexTok uses it: ``v_cond + (s-1) * (orthogonal part of the clipped
    momentum-averaged difference)``; per-sample norms over (C,h,w)."""
    return normalized_guidance(v_cond, v_uncond, scale - 1.0, momentum, eta=eta, norm_threshold=norm_threshold,
                               use_original_formulation=True)


__all__ = ["MomentumBuffer", "apg_velocity", "cfg_velocity", "flow_timesteps"]
