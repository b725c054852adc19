"""Finite scalar quantisation (FSQ) with levels [8,8,8,5,5,5] -> 64,000 token ids."""
from __future__ import annotations

import math

import torch
from torch import nn


class FSQ(nn.Module):
    """Bounds each channel with tanh, rounds it to one of ``L`` levels and maps codes to ids (first channel fastest).

    ``quantize`` uses a straight-through estimator so the encoder trains through the rounding.
    """

    def __init__(self, levels: list[int] = (8, 8, 8, 5, 5, 5), eps: float = 1e-3):
        super().__init__()
        self.levels = [int(l) for l in levels]
        if any(l < 2 for l in self.levels):
            raise ValueError(f"FSQ levels must all be >= 2, got {self.levels}")
        levels_t = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1] + self.levels[:-1], dtype=torch.int64), dim=0)
        half_l = (levels_t - 1) * (1 + eps) / 2
        offset = torch.where(levels_t % 2 == 0, 0.5, 0.0)
        self.register_buffer("_levels", levels_t, persistent=False)
        self.register_buffer("_half_l", half_l, persistent=False)
        self.register_buffer("_offset", offset, persistent=False)
        self.register_buffer("_shift", torch.atanh(offset / half_l), persistent=False)
        self.register_buffer("_half_width", (levels_t // 2), persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    @property
    def dim(self) -> int:
        return len(self.levels)

    @property
    def vocab_size(self) -> int:
        return math.prod(self.levels)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z + self._shift) * self._half_l - self._offset

    def saturation(self, z: torch.Tensor, depth: float = 3.0) -> torch.Tensor:
        """Fraction of pre-FSQ values deep in tanh's flat tail (|z + shift| > depth), where the straight-through
        gradient vanishes: a tokenizer whose registers collapse to one code drives this towards 1."""
        return ((z.float() + self._shift).abs() > depth).float().mean()

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> quantised values in [-1, 1] (straight-through gradient). Runs in float32."""
        bounded = self.bound(z.float())
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        return rounded / self._half_width

    def values_to_ids(self, values: torch.Tensor) -> torch.Tensor:
        codes = torch.round(values.float() * self._half_width + self._half_width).long()
        return (codes * self._basis).sum(-1)

    def ids_to_values(self, ids: torch.Tensor) -> torch.Tensor:
        codes = (ids.long()[..., None] // self._basis) % self._levels.long()
        return (codes.float() - self._half_width) / self._half_width

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        values = self.quantize(z)
        return values, self.values_to_ids(values)
