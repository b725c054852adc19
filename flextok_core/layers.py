"""Transformer building blocks shared by the FlexTok encoder and decoder.

Numerics follow the official release: non-affine LayerNorm in float32 (eps 1e-5), QK-norm per head,
attention scale ``8 / head_dim`` (muP-style), SwiGLU MLP with hidden size ``int(2 * mlp_ratio * dim / 3)``,
no biases inside the blocks.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .precision import REDUCED_PRECISION, cpu_attention_fallback


def layer_norm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Non-affine LayerNorm over the last dim, computed in float32 (as the release does under autocast).

    bfloat16 / float16 inputs go to the kernel as they are: it accumulates the statistics in float32 itself, so
    the explicit upcast would only add a float32 copy in and a conversion out (on [770, 768] bf16: 0.30 -> 0.11 ms);
    outputs agree to one bf16 rounding. (Under autocast the kernel returns float32, hence the cast.)"""
    if x.dtype in REDUCED_PRECISION:
        return F.layer_norm(x, x.shape[-1:], eps=eps).to(x.dtype)
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


def swiglu_hidden_dim(dim: int, mlp_ratio: float) -> int:
    return int(2 * mlp_ratio * dim / 3)


def sincos_2d(dim: int, height: int, width: int) -> torch.Tensor:
    """Fixed 2-D sin-cos table ``[height, width, dim]``: [sin(a w), cos(a w), sin(b w), cos(b w)] per cell (a=row, b=col)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs dim divisible by 4, got {dim}")
    q = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(q, dtype=torch.float64) / q))
    rows = torch.arange(height, dtype=torch.float64)[:, None] * omega  # [h, q]
    cols = torch.arange(width, dtype=torch.float64)[:, None] * omega  # [w, q]
    table = torch.cat(
        [
            rows.sin()[:, None, :].expand(height, width, q),
            rows.cos()[:, None, :].expand(height, width, q),
            cols.sin()[None, :, :].expand(height, width, q),
            cols.cos()[None, :, :].expand(height, width, q),
        ],
        dim=-1,
    )
    return table.float()


def patchify(latents: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B,C,h,w] -> [B,h/p,w/p,p*p*C], vector layout (dy, dx, c) with c fastest (the release's layout)."""
    b, c, h, w = latents.shape
    p = patch_size
    x = latents.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, h // p, w // p, p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """[B,gh,gw,p*p*C] -> [B,C,gh*p,gw*p], inverse of :func:`patchify`."""
    b, gh, gw, _ = patches.shape
    p = patch_size
    x = patches.reshape(b, gh, gw, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, gh * p, gw * p)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and the release's ``8 / head_dim`` scale, via SDPA.

    ``forward`` takes a packed token matrix ``[T, D]`` and a list of groups: group ``g`` occupies ``B*L_g``
    consecutive rows laid out as ``[B, L_g]`` and attends only within its own sequences. One matmul serves all
    groups; only the attention itself runs per group. This lets the decoder push a long conditional sequence
    and a short unconditional one through one forward pass without padding the short one.
    """

    def __init__(self, dim: int, head_dim: int = 64):
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"dim {dim} is not divisible by head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.scale = 8.0 / head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, groups: list[tuple[int, int, torch.Tensor | None]]) -> torch.Tensor:
        # x: [T, D]; groups: (batch, length, mask) with mask broadcastable to [batch, heads, length, length]
        qkv = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim)  # [T, 3, H, hd]
        qk = layer_norm(qkv[:, :2])  # QK-norm of every group's queries and keys in one call, [T, 2, H, hd]
        outs = []
        start = 0
        for batch, length, mask in groups:
            rows = slice(start, start + batch * length)
            start += batch * length
            q, k, v = (t[rows].view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, L, hd]
                       for t in (qk[:, 0], qk[:, 1], qkv[:, 2]))
            with cpu_attention_fallback(q.dtype, q.device):
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            outs.append(o.transpose(1, 2).reshape(batch * length, -1))
        return self.proj(outs[0] if len(outs) == 1 else torch.cat(outs))


class SwiGLU(nn.Module):
    """``down(SiLU(gate x) * up x)``; gate and up share one matmul."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gate_up = nn.Linear(dim, 2 * hidden_dim, bias=False)
        self.down = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden_dim, dim=-1)
        return self.down(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block of the encoder: ``x + Attn(LN x)``, then ``x + MLP(LN x)``."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float):
        super().__init__()
        self.attn = Attention(dim, head_dim)
        self.mlp = SwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio))

    def forward(self, x: torch.Tensor, groups) -> torch.Tensor:
        x = x + self.attn(layer_norm(x), groups)
        return x + self.mlp(layer_norm(x))


def timestep_frequencies(dim: int, max_timestep: float, max_period: float = 256.0) -> torch.Tensor:
    half = dim // 2
    return (1000.0 / max_timestep) * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
