"""Random draws on any device, the diffusers way: a generator may live on the CPU or on the device the result is
for (or be a list of generators, one per row); the draw happens on the generator's device and the result is moved.

A seeded CPU generator therefore gives the same noise, posterior samples and sampled tokens whichever device the
model runs on (up to the device's arithmetic: a token whose probability differs in the last bits between devices
can be drawn differently). Without a generator the draw uses the global RNG of ``device``. On the CPU every function
here makes exactly the torch call it replaces, so CPU results and RNG consumption are unchanged.

``randn`` follows ``diffusers.utils.torch_utils.randn_tensor`` (per-row draws for a list of generators), but also
accepts a generator on the device when the result is for the CPU.
"""
from __future__ import annotations

from typing import Sequence

import torch


def _draw_device(generator, device) -> torch.device:
    """Where the draw happens: the generator's device, else ``device`` (CPU when None)."""
    if generator is None:
        return torch.device("cpu") if device is None else torch.device(device)
    return (generator[0] if isinstance(generator, (list, tuple)) else generator).device


def _single(generator):
    """A list of one generator is that generator (diffusers' rule)."""
    if isinstance(generator, (list, tuple)):
        if not generator:
            raise ValueError("generator is an empty list: pass a torch.Generator, a list of one per row, or None")
        if len({g.device for g in generator}) != 1:
            raise ValueError(f"generators of one draw must share a device, got {sorted({str(g.device) for g in generator})}")
        return generator[0] if len(generator) == 1 else list(generator)
    return generator


def _draw(fn, shape: Sequence[int], generator, device, **kwargs) -> torch.Tensor:
    shape = tuple(shape)
    where = _draw_device(generator, device)
    generator = _single(generator)
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        out = torch.cat([fn((1, *shape[1:]), generator=g, device=where, **kwargs) for g in generator])
    else:
        out = fn(shape, generator=generator, device=where, **kwargs)
    return out if device is None else out.to(device)


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``device``."""
    return _draw(torch.randn, shape, generator, device, dtype=dtype)


def rand(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) values of ``shape`` on ``device``."""
    return _draw(torch.rand, shape, generator, device, dtype=dtype)


def randint(high: int, shape, generator=None, device=None) -> torch.Tensor:
    """Integers uniform in [0, high) of ``shape`` on ``device``."""
    return _draw(lambda s, **kw: torch.randint(high, s, **kw), shape, generator, device)


def multinomial(probs: torch.Tensor, generator=None) -> torch.Tensor:
    """One index per row of ``probs [B, V]`` -> ``[B]`` on ``probs``' device. With a generator on another device
    (a CPU generator for a GPU model) the probabilities go to the generator's device for the draw."""
    where = _draw_device(generator, probs.device)
    generator = _single(generator)
    p = probs.to(where)
    if isinstance(generator, list):
        if len(generator) != p.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {p.shape[0]}")
        ids = torch.cat([torch.multinomial(p[i : i + 1], 1, generator=g) for i, g in enumerate(generator)])
    else:
        ids = torch.multinomial(p, 1, generator=generator)
    return ids[:, 0].to(probs.device)


def host_values(x) -> list:
    """The values of a small tensor (or sequence) as a Python list. Free for a CPU tensor or a list; for a tensor on
    an accelerator this waits for the device, so callers pass host values where they have them."""
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


def on_device(x, device, dtype=None) -> torch.Tensor:
    """A tensor (moved) or a sequence of host values (copied) on ``device``. A copy from the host to a CUDA device
    does not wait for the device's queue (``non_blocking``: safe from pageable memory, which CUDA stages at once);
    other copies are ordinary ones."""
    if not isinstance(x, torch.Tensor):
        x = torch.tensor(list(x), dtype=dtype)
    to_cuda = x.device.type == "cpu" and torch.device(device).type == "cuda"
    return x.to(device=device, dtype=dtype, non_blocking=to_cuda)


__all__ = ["host_values", "multinomial", "on_device", "rand", "randint", "randn"]
