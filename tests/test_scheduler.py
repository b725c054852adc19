"""The scheduler reproduces the release's sampler: t grid and Euler update."""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flextok_kit.pipelines import FlexTokFlowScheduler, FlexTokPipeline


def official_euler(x, velocities, steps):
    """The release's loop: t = i/T for i = T..1, x <- x - dt * v with dt = 1/T (float32 tensors)."""
    ts, dt = [], torch.tensor(1.0 / steps, dtype=torch.float32)
    for j, i in enumerate(range(steps, 0, -1)):
        ts.append(torch.tensor(i / steps, dtype=torch.float32))
        x = x - dt * velocities[j]
    return x, torch.stack(ts)


def run(scheduler, x, velocities, steps):
    scheduler.set_timesteps(sigmas=[(steps - i) / steps for i in range(steps)])
    ts = []
    for j, timestep in enumerate(scheduler.timesteps):
        ts.append(scheduler.sigmas[j])
        x = scheduler.step(velocities[j], timestep, x, return_dict=False)[0]
    return x, torch.stack(ts)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7, 10, 20, 25, 50])
def test_flextok_scheduler_is_the_official_sampler_bit_for_bit(steps):
    g = torch.Generator().manual_seed(steps)
    x = torch.randn(2, 16, 4, 4, generator=g)
    velocities = torch.randn(steps, 2, 16, 4, 4, generator=g) * 3
    ref, ref_t = official_euler(x, velocities, steps)
    ours, ours_t = run(FlexTokPipeline.default_scheduler(), x, velocities, steps)
    assert torch.equal(ours_t, ref_t)
    assert torch.equal(ours, ref)
    # the timesteps handed to callbacks are sigma * num_train_timesteps, as in diffusers
    s = FlexTokPipeline.default_scheduler()
    s.set_timesteps(steps)
    assert torch.equal(s.timesteps, ref_t * 1000)


def test_stock_diffusers_scheduler_matches_only_for_powers_of_two():
    """Why we subclass: stock FlowMatchEuler has the exact grid but steps by float32 sigma differences."""
    stock = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    g = torch.Generator().manual_seed(0)
    for steps, exact in [(4, True), (8, True), (25, False)]:
        x = torch.randn(1, 16, 4, 4, generator=g)
        velocities = torch.randn(steps, 1, 16, 4, 4, generator=g)
        ref, ref_t = official_euler(x, velocities, steps)
        ours, ours_t = run(stock, x, velocities, steps)
        assert torch.equal(ours_t, ref_t)  # the grid itself is exact
        assert torch.equal(ours, ref) == exact
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)  # but never by more than rounding


def test_swapped_schedulers_still_work():
    s = FlexTokFlowScheduler(stochastic_sampling=True)
    s.set_timesteps(4)
    assert s._uniform_dt is None  # falls back to diffusers' own (stochastic) step
    x = torch.zeros(1, 2, 2, 2)
    out = s.step(torch.ones_like(x), s.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    assert out.shape == x.shape
