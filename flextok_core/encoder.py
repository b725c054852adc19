"""Resampler encoder: VAE latents -> a 1-D sequence of register latents (before FSQ).

A ViT over 2x2 latent patches with ``num_registers`` learned register tokens appended. Patches attend to
patches; register ``r`` attends to every patch and to registers ``0..r`` (causal), so the first ``k``
register outputs do not depend on later registers -- encoding with ``k`` registers gives exactly the first
``k`` tokens of the full encoding, for a fraction of the cost.
"""
from __future__ import annotations

import torch
from torch import nn

from .layers import TransformerBlock, layer_norm, patchify, sincos_2d


def causal_last_mask(num_patches: int, num_tokens: int, device=None) -> torch.Tensor:
    """Boolean ``[L, L]`` mask (True = may attend) for the sequence [patches, first ``num_tokens`` registers]."""
    length = num_patches + num_tokens
    idx = torch.arange(length, device=device)
    is_patch_key = idx[None, :] < num_patches
    register_causal = (idx[None, :] >= num_patches) & (idx[None, :] <= idx[:, None]) & (idx[:, None] >= num_patches)
    return is_patch_key | register_causal


class FlexTokEncoder(nn.Module):
    def __init__(
        self,
        latent_channels: int,
        patch_size: int,
        dim: int,
        depth: int,
        head_dim: int,
        mlp_ratio: float,
        num_registers: int,
        grid_size: tuple[int, int],
        latent_dim: int,
    ):
        super().__init__()
        self.patch_size = patch_size
        self.patch_embed = nn.Linear(latent_channels * patch_size * patch_size, dim)
        # Fixed table; kept in the state dict because the release stores it.
        self.register_buffer("pos_embed", sincos_2d(dim, *grid_size))  # [Gh, Gw, D]
        self.registers = nn.Parameter(torch.zeros(num_registers, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, head_dim, mlp_ratio) for _ in range(depth))
        self.to_latents = nn.Linear(dim, latent_dim)

    def embed_patches(self, latents: torch.Tensor) -> torch.Tensor:
        """[B,C,h,w] -> patch tokens [B,h/p,w/p,D] with sin-cos positions (cropped top-left)."""
        x = self.patch_embed(patchify(latents, self.patch_size).to(self.patch_embed.weight.dtype))
        gh, gw = x.shape[1:3]
        return x + self.pos_embed[:gh, :gw].to(x.dtype)

    def encode_registers(self, latents: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """Latents ``[B,C,h,w]`` -> transformer outputs at the first ``k = num_tokens`` register positions
        ``[B,k,D]`` (default: all N)."""
        k = self.registers.shape[0] if num_tokens is None else num_tokens
        patches = self.embed_patches(latents).flatten(1, 2)  # [B, P, D]
        b, p, d = patches.shape
        registers = self.registers[:k].to(patches.dtype).expand(b, k, d)
        x = torch.cat([patches, registers], dim=1).reshape(b * (p + k), d)  # packed [T, D]
        groups = [(b, p + k, causal_last_mask(p, k, device=x.device))]
        for block in self.blocks:
            x = block(x, groups)
        return x.view(b, p + k, d)[:, p:]

    def forward(self, latents: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """Latents ``[B,C,h,w]`` -> register latents ``[B,k,latent_dim]`` for the first ``k = num_tokens``
        registers (before FSQ)."""
        h = layer_norm(self.encode_registers(latents, num_tokens))
        return self.to_latents(h.to(self.to_latents.weight.dtype))  # to_latents may be kept in float32
