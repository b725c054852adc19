"""The release's rectified-flow Euler sampler as a diffusers scheduler.

``FlowMatchEulerDiscreteScheduler`` with ``sigmas = [1, (T-1)/T, ..., 1/T]`` reproduces the release's time grid
bit for bit, but its update ``x + (sigma_next - sigma) v`` differs from the release's ``x - v / T`` by the float32
rounding of the sigma differences (up to a few 1e-6 relative in dt whenever T is not a power of two; see
tests/test_scheduler.py). This subclass keeps everything else and takes the release's step on that grid.
"""
from __future__ import annotations

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (diffusers' loader looks it up here)
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput

from ..flextok_core.sampling import flow_timesteps as flextok_sigmas


class FlexTokFlowScheduler(FlowMatchEulerDiscreteScheduler):
    """Euler over t = 1, (T-1)/T, ..., 1/T with the release's exact update ``x <- x - v / T``."""

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, **kwargs):
        """diffusers' ``set_timesteps`` on the CPU, the check for the release's grid on those host values (no device
        read), then ``timesteps`` moved to ``device``. ``sigmas`` stay on the CPU, as in diffusers' Euler
        schedulers: the step reads them as host scalars."""
        if sigmas is None and num_inference_steps is not None:
            sigmas = flextok_sigmas(num_inference_steps)
        super().set_timesteps(device="cpu", sigmas=sigmas, **kwargs)
        steps = len(self.timesteps)
        grid = torch.tensor(flextok_sigmas(steps), dtype=torch.float32)
        uniform = (not self.config.stochastic_sampling and not kwargs.get("timesteps")
                   and torch.equal(self.sigmas[:-1].float(), grid) and float(self.sigmas[-1]) == 0.0)
        self._uniform_dt = 1.0 / steps if uniform else None
        if device is not None:
            self.timesteps = self.timesteps.to(device)

    def step(self, model_output, timestep, sample, *args, return_dict: bool = True, **kwargs):
        if getattr(self, "_uniform_dt", None) is None or kwargs.get("per_token_timesteps") is not None:
            return super().step(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        if self.step_index is None:
            self._init_step_index(timestep)
        prev_sample = sample.to(torch.float32) - self._uniform_dt * model_output
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
