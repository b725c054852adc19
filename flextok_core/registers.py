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

    def conditional(self) -> "RegisterSequences":
        """The conditional pass alone (a step whose guidance scale is 1 needs no unconditional pass)."""
        return RegisterSequences(self.tokens[:1], self.key_bias[:1])


def mask_dropped(tokens: torch.Tensor, keep_k: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    """Register tokens ``[B,N,D]`` with positions >= ``keep_k [B]`` overwritten by the mask token ``[D]``."""
    n = tokens.shape[1]
    dropped = torch.arange(n, device=tokens.device)[None, :] >= keep_k[:, None]  # [B, N]
    return torch.where(dropped[..., None], mask_token.to(tokens.dtype), tokens)


def build_register_sequences(
    tokens: torch.Tensor,
    keep_k: torch.Tensor,
    mask_token: torch.Tensor,
    null_cond: torch.Tensor,
    guidance: bool = False,
    fast: bool = True,
    null_condition_mask: torch.Tensor | None = None,
) -> RegisterSequences:
    """The register sequences of the conditional (and, if ``guidance``, unconditional) pass.

    tokens: embedded registers ``[B, N, D]`` whose positions >= keep_k already hold the mask token
    (:func:`mask_dropped`); keep_k: ``[B]`` in 1..N; mask_token, null_cond: ``[D]``;
    null_condition_mask: ``[B]`` bool, samples whose conditional pass is unconditional (CFG dropout).
    ``fast`` collapses the runs of mask / null tokens (exact, see the module docstring).
    """
    b, n, _ = tokens.shape
    dim = mask_token.shape[0]
    if null_condition_mask is not None:
        tokens = torch.where(null_condition_mask[:, None, None], null_cond.to(tokens.dtype), tokens)
    null = null_cond.to(tokens.dtype)
    if not fast:
        seqs = RegisterSequences([tokens], [None])
        if guidance:
            seqs.tokens.append(null.expand(b, n, dim))
            seqs.key_bias.append(None)
        return seqs
    if null_condition_mask is not None and bool(null_condition_mask.any()):
        # A null-conditioned sample is one run of n identical tokens.
        keep_k = torch.where(null_condition_mask, 0, keep_k)
    # conditional: the kept prefix, then one token standing for the run of n - k mask tokens
    has_run = keep_k < n
    length = int((keep_k + has_run.long()).max())
    pos = torch.arange(length, device=tokens.device)[None, :]  # [1, R]
    run_len = torch.where(pos < keep_k[:, None], 1, torch.where(pos == keep_k[:, None], n - keep_k[:, None], 0))
    cond_tokens = tokens[:, :length]
    fill = torch.where(null_condition_mask[:, None, None], null, mask_token.to(tokens.dtype)) \
        if null_condition_mask is not None else mask_token.to(tokens.dtype).expand(b, 1, dim)
    cond_tokens = torch.where(pos[..., None] >= keep_k[:, None, None], fill, cond_tokens)
    bias = None if bool((run_len == 1).all()) else torch.log(run_len.float())
    seqs = RegisterSequences([cond_tokens], [bias])
    if guidance:
        seqs.tokens.append(null.expand(b, 1, dim))
        seqs.key_bias.append(torch.full((b, 1), math.log(n), device=tokens.device))
    return seqs


__all__ = ["RegisterSequences", "build_register_sequences", "mask_dropped"]
