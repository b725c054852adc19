"""Nested dropout: the number k of registers a training sample keeps (of N), so that every prefix of the token
sequence learns to stand for the whole image. The decoder replaces the dropped registers past the kept prefix by
a learned mask token (:func:`.registers.mask_dropped`)."""
from __future__ import annotations

import torch

from .rng import randint


def pow2_token_counts(num_registers: int) -> list[int]:
    """1, 2, 4, ... up to N, and N: the prefix lengths nested dropout trains (``pow2``), so also the natural ones to
    evaluate or search over."""
    counts = [2 ** i for i in range(num_registers.bit_length()) if 2 ** i <= num_registers]
    return counts + ([num_registers] if counts[-1] != num_registers else [])


def keep_k_choices(num_registers: int, mode: str = "pow2") -> torch.Tensor:
    if mode == "pow2":
        return torch.tensor(pow2_token_counts(num_registers))
    if mode == "uniform":
        return torch.arange(1, num_registers + 1)
    if mode == "none":
        return torch.tensor([num_registers])
    raise ValueError(f"nested dropout mode must be pow2, uniform or none, got {mode!r}")


def sample_keep_k(batch: int, num_registers: int, mode: str = "pow2", device=None, generator=None) -> torch.Tensor:
    """Nested dropout: number of kept registers per sample, uniform over ``{1, 2, 4, ..., N}`` (``pow2``, the paper)
    or ``{1..N}`` (``uniform``); ``none`` keeps all. Drawn on the generator's device (the CPU without one) and
    returned on ``device`` (default: the CPU, host values that size the decoder's sequences without a device read)."""
    choices = keep_k_choices(num_registers, mode)
    idx = randint(len(choices), (batch,), generator, device="cpu")
    return choices[idx].to(device)


__all__ = ["keep_k_choices", "pow2_token_counts", "sample_keep_k"]
