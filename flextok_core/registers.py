"""Register sequences of the rectified-flow decoder: the kept prefix of k registers (of N), the learned mask token
over the dropped registers past it (nested dropout), the null condition of classifier-free guidance, and the exact
collapsed form of the runs of identical mask / null registers.

Exact fast path: the overwritten registers are identical vectors, and nothing position-dependent touches
them after the overwrite, so they stay identical through every block. A run of ``n`` identical keys/values
contributes ``n * exp(q.k) v`` to attention, which one token with key logit ``q.k + log n`` reproduces. The
conditional sequence therefore shrinks from P+N to P+k+1 tokens and the unconditional one to P+1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .rng import host_values, on_device


@dataclass
class RegisterSequences:
    """Register tokens of every decoder pass of one sampling run, built once and reused at every step.

    ``tokens[g]`` is ``[B, R_g, D]`` for group ``g`` (conditional first, then unconditional if guided), and
    ``key_bias[g]`` is ``[B, R_g]`` (``log`` of the run length each token stands for, ``-inf`` for padding) or
    ``None`` when every token stands for itself.
    """

    tokens: list
    key_bias: list

    @property
    def guided(self) -> bool:
        return len(self.tokens) == 2

    def to(self, *args, **kwargs) -> "RegisterSequences":
        """Every tensor moved / cast like ``Tensor.to`` (accelerate's hooks move a model's inputs with ``.to``)."""
        return RegisterSequences([t.to(*args, **kwargs) for t in self.tokens],
                                 [None if b is None else b.to(*args, **kwargs) for b in self.key_bias])

    def conditional(self) -> "RegisterSequences":
        """The conditional pass alone (a step whose guidance scale is 1 needs no unconditional pass)."""
        return RegisterSequences(self.tokens[:1], self.key_bias[:1])


def mask_dropped(tokens: torch.Tensor, keep_k: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Register tokens ``[B,N,D]`` with positions >= ``keep_k [B]`` overwritten by the mask token ``[D]``."""
    n = tokens.shape[1]
    dropped = torch.arange(n, device=tokens.device)[None, :] >= keep_k[:, None]  # [B, N]
    return torch.where(dropped[..., None], mask_token.to(tokens.dtype), tokens)


def collapsed_length(keep_k: list[int], num_registers: int) -> tuple[int, bool]:
    """Host arithmetic of the fast path: (length R of the collapsed conditional sequence, whether every token stands
    for itself) for kept lengths ``keep_k`` (0 = a null-conditioned sample, one run of N)."""
    n = num_registers
    length = max(k + (k < n) for k in keep_k)  # the kept prefix, then one token for the run of n - k mask tokens
    return length, min(keep_k) >= n - 1  # k >= n - 1: no run longer than one token, no padding


def build_register_sequences(
    tokens: torch.Tensor,
    keep_k,
    mask_token: torch.Tensor,
    null_cond: torch.Tensor,
    guidance: bool = False,
    fast: bool = True,
    null_condition_mask=None,
) -> RegisterSequences:
    """The register sequences of the conditional (and, if ``guidance``, unconditional) pass.

    tokens: embedded registers ``[B, N, D]`` whose positions >= keep_k already hold the mask token
    (:func:`mask_dropped`); keep_k: ``[B]`` in 1..N; mask_token, null_cond: ``[D]``;
    null_condition_mask: ``[B]`` bool, samples whose conditional pass is unconditional (CFG dropout).
    ``fast`` collapses the runs of mask / null tokens (exact, see the module docstring); its sequence lengths are
    computed on the host, from ``keep_k`` and ``null_condition_mask`` given as host values (CPU tensors or lists:
    no device read; tensors on an accelerator are read once).
    """
    b, n, _ = tokens.shape
    dim = mask_token.shape[0]
    device = tokens.device
    null_mask = None if null_condition_mask is None else on_device(null_condition_mask, device, torch.bool)
    if null_mask is not None:
        tokens = torch.where(null_mask[:, None, None], null_cond.to(tokens.dtype), tokens)
    null = null_cond.to(tokens.dtype)
    if not fast:
        seqs = RegisterSequences([tokens], [None])
        if guidance:
            seqs.tokens.append(null.expand(b, n, dim))
            seqs.key_bias.append(None)
        return seqs
    host_k = [int(k) for k in host_values(keep_k)]
    keep_k = on_device(keep_k, device, torch.long)
    if null_mask is not None:
        # A null-conditioned sample is one run of n identical tokens.
        host_k = [0 if drop else k for k, drop in zip(host_k, host_values(null_condition_mask))]
        keep_k = torch.where(null_mask, 0, keep_k)
    length, every_token_itself = collapsed_length(host_k, n)
    pos = torch.arange(length, device=device)[None, :]  # [1, R]
    run_len = torch.where(pos < keep_k[:, None], 1, torch.where(pos == keep_k[:, None], n - keep_k[:, None], 0))
    cond_tokens = tokens[:, :length]
    fill = torch.where(null_mask[:, None, None], null, mask_token.to(tokens.dtype)) \
        if null_mask is not None else mask_token.to(tokens.dtype).expand(b, 1, dim)
    cond_tokens = torch.where(pos[..., None] >= keep_k[:, None, None], fill, cond_tokens)
    bias = None if every_token_itself else torch.log(run_len.float())
    seqs = RegisterSequences([cond_tokens], [bias])
    if guidance:
        seqs.tokens.append(null.expand(b, 1, dim))
        seqs.key_bias.append(torch.full((b, 1), math.log(n), device=device))
    return seqs


__all__ = ["RegisterSequences", "build_register_sequences", "collapsed_length", "mask_dropped"]
