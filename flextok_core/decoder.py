"""Rectified-flow decoder: predicts the velocity of noised VAE latents, conditioned on register tokens.

Sequence per sample: [noised latent patches (P), registers (N)], full bidirectional attention. Registers past
the kept prefix ``keep_k`` are overwritten by a learned mask token (nested dropout); for classifier-free
guidance every register is overwritten by the null condition. adaLN-zero on the timestep modulates patches
and registers separately (``adaln_expansion = 2``). The register sequences (and their exact collapsed form,
P+k+1 tokens instead of P+N) are built in :mod:`.registers`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.embeddings import TimestepEmbedding
from torch import nn

from .layers import Attention, SwiGLU, layer_norm, patchify, sincos_2d, swiglu_hidden_dim, timestep_frequencies, unpatchify
from .precision import REDUCED_PRECISION
from .registers import RegisterSequences, build_register_sequences, mask_dropped
from .rng import on_device

Groups = list  # [(batch, length, attention mask or None)] -- see layers.Attention


def key_bias_mask(bias: torch.Tensor, num_patches: int, dtype: torch.dtype) -> torch.Tensor:
    """The fast path's key bias ``[B, R]`` as SDPA's float mask ``[B, 1, 1, P+R]`` (0 on the patch keys), in
    ``dtype`` (SDPA's fused kernels take a float mask of the query's dtype). Its rows are stored 16 elements
    aligned: CUDA's memory-efficient kernel, the one that takes a float mask, wants an aligned row stride (PyTorch
    would otherwise copy the mask into an aligned buffer at every call)."""
    length = num_patches + bias.shape[1]
    aligned = -(-length // 16) * 16
    return F.pad(bias.to(dtype), (num_patches, aligned - length))[:, None, None, :length]


def _split_types(t: torch.Tensor, groups: Groups, num_patches: int):
    """Yield the patch part ``[B,P,..]`` and register part ``[B,R,..]`` of every group in a packed tensor."""
    start = 0
    for batch, length, _ in groups:
        tg = t[start : start + batch * length].view(batch, length, -1)
        start += batch * length
        yield tg[:, :num_patches], tg[:, num_patches:]


def _apply_per_type(t, groups, num_patches, fn):
    """Packed ``[T, D]`` -> packed ``[T, D]`` with ``fn(part, type_index)``; type 0 = patches, 1 = registers."""
    out = [torch.cat([fn(p, 0), fn(r, 1)], dim=1).flatten(0, 1) for p, r in _split_types(t, groups, num_patches)]
    return out[0] if len(out) == 1 else torch.cat(out)


class AdaLNBlock(nn.Module):
    """Pre-norm block with adaLN-zero modulation from the timestep embedding, per token type."""

    def __init__(self, dim: int, head_dim: int, mlp_ratio: float, adaln_expansion: int = 2):
        super().__init__()
        self.adaln_expansion = adaln_expansion
        self.attn = Attention(dim, head_dim)
        self.mlp = SwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio))
        self.adaLN = nn.Linear(dim, adaln_expansion * 6 * dim)

    def forward(self, x: torch.Tensor, groups: Groups, num_patches: int, modulation: torch.Tensor):
        # x: packed [T, D]; modulation: adaLN(SiLU(temb)) [B or 1, E*6*D], shared by every group (same t)
        d = x.shape[-1]
        mod = modulation.view(modulation.shape[0], self.adaln_expansion, 6, d)[:, :, :, None, :]  # [B, E, 6, 1, D]
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = mod.unbind(2)  # [B, E, 1, D]
        types = [(0, slice(None, num_patches)), (self.adaln_expansion - 1, slice(num_patches, None))]
        if torch.is_grad_enabled():
            return self._forward_autograd(x, groups, num_patches, types, mod.unbind(2))
        # Sampling: modulate and gate each token type's rows in place (no split-and-concatenate copies of [T, D]
        # per modulation; the gate and the residual add fuse into one addcmul_).
        # Under bf16/fp16 x is the float32 residual stream (see FlexTokDecoder.forward); the branches compute in the
        # weights' dtype.
        dtype = self.attn.qkv.weight.dtype
        h = self._modulate_(layer_norm(x).to(dtype), groups, types, shift_msa, 1 + scale_msa)
        self._gated_residual_(x, self.attn(h, groups), groups, types, gate_msa)
        h = self._modulate_(layer_norm(x).to(dtype), groups, types, shift_mlp, 1 + scale_mlp)
        return self._gated_residual_(x, self.mlp(h), groups, types, gate_mlp)

    @staticmethod
    def _rows(t: torch.Tensor, groups: Groups, types):
        """(view ``[B, P or R, D]`` of ``t``, modulation index) of every group's patch and register rows."""
        start = 0
        for batch, length, _ in groups:
            tg = t[start : start + batch * length].view(batch, length, -1)
            start += batch * length
            for index, rows in types:
                yield tg[:, rows], index

    def _modulate_(self, h, groups, types, shift, scale1):
        shift, scale1 = shift.to(h.dtype), scale1.to(h.dtype)  # one dtype: no per-row conversion copies
        for part, e in self._rows(h, groups, types):
            torch.addcmul(shift[:, e], part, scale1[:, e], out=part)  # shift + h * (1 + scale), in place
        return h

    def _gated_residual_(self, x, h, groups, types, gate):
        for (part, e), (residual, _) in zip(self._rows(h, groups, types), self._rows(x, groups, types)):
            residual.addcmul_(part, gate[:, e])  # x + gate * h, in place
        return x

    def _forward_autograd(self, x, groups, num_patches, types, mods):
        """The same block without in-place writes (training: autograd saves the activations)."""
        gate_msa, gate_mlp, shift_msa, scale_msa, shift_mlp, scale_mlp = mods

        def modulated(h, shift, scale):
            return _apply_per_type(h, groups, num_patches, lambda part, ty: torch.addcmul(
                shift[:, types[ty][0]], part, 1 + scale[:, types[ty][0]])).to(self.attn.qkv.weight.dtype)

        def gated(h, gate):
            return _apply_per_type(h, groups, num_patches, lambda part, ty: part * gate[:, types[ty][0]])

        x = x + gated(self.attn(modulated(layer_norm(x), shift_msa, scale_msa), groups), gate_msa)
        return x + gated(self.mlp(modulated(layer_norm(x), shift_mlp, scale_mlp)), gate_mlp)


class FlexTokDecoder(nn.Module):
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
        null_condition: str = "learned",
        adaln_expansion: int = 2,
        time_embed_dim: int = 256,
        max_timestep: float = 1000.0,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.patch_size = patch_size
        self.num_registers = num_registers
        self.max_timestep = max_timestep
        self.time_embed_dim = time_embed_dim
        # registers: FSQ values -> tokens, plus a learned 1-D position table
        self.from_latents = nn.Linear(latent_dim, dim)
        self.register_pos_embed = nn.Parameter(torch.zeros(num_registers, dim))
        self.mask_token = nn.Parameter(torch.zeros(dim))  # nested dropout: registers >= keep_k
        if null_condition == "learned":
            self.null_cond = nn.Parameter(torch.zeros(dim))
        elif null_condition == "zero":
            self.register_buffer("null_cond", torch.zeros(dim), persistent=False)
        else:
            raise ValueError(f"null_condition must be 'learned' or 'zero', got {null_condition!r}")
        # noised latent patches
        self.patch_embed = nn.Linear(latent_channels * patch_size * patch_size, dim)
        self.register_buffer("pos_embed", sincos_2d(dim, *grid_size))  # [Gh, Gw, D]
        self.time_embed = TimestepEmbedding(time_embed_dim, dim)
        self.blocks = nn.ModuleList(AdaLNBlock(dim, head_dim, mlp_ratio, adaln_expansion) for _ in range(depth))
        # final layer: adaLN (shift, scale) + linear back to patches
        self.final_adaLN = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, latent_channels * patch_size * patch_size)

    # -- conditioning -------------------------------------------------------------------------------
    def embed_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """t [B] in [0, 1] -> temb [B, D]; features [cos, sin] with max period 256 (as released)."""
        freqs = timestep_frequencies(self.time_embed_dim, self.max_timestep).to(t.device)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.time_embed(emb.to(self.time_embed.linear_1.weight.dtype))

    def embed_registers(self, values: torch.Tensor, keep_k: torch.Tensor) -> torch.Tensor:
        """FSQ values [B,N,6] -> register tokens [B,N,D], positions >= keep_k overwritten by the mask token."""
        n = values.shape[1]
        x = self.from_latents(values.to(self.from_latents.weight.dtype)) + self.register_pos_embed[:n]
        return mask_dropped(x, keep_k, self.mask_token)

    def prepare_registers(
        self,
        values: torch.Tensor,
        keep_k,
        guidance: bool = False,
        fast: bool = True,
        null_condition_mask=None,
    ) -> RegisterSequences:
        """Build the register sequences of the conditional (and, if ``guidance``, unconditional) pass
        (:func:`.registers.build_register_sequences`).

        values: FSQ values ``[B, N, 6]`` (positions >= keep_k are ignored); keep_k: ``[B]`` in 1..N;
        null_condition_mask: ``[B]`` bool, samples whose conditional pass is unconditional (CFG dropout). Both may
        be tensors on any device or host values (CPU tensors, lists), which size the sequences without a device read.
        """
        tokens = self.embed_registers(values, on_device(keep_k, values.device))
        return build_register_sequences(tokens, keep_k, self.mask_token, self.null_cond, guidance=guidance, fast=fast,
                                        null_condition_mask=null_condition_mask)

    # -- velocity -----------------------------------------------------------------------------------
    def embed_patches(self, x_t: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patchify(x_t, self.patch_size).to(self.patch_embed.weight.dtype))
        gh, gw = x.shape[1:3]
        return x + self.pos_embed[:gh, :gw].to(x.dtype)  # [B, gh, gw, D]

    def timestep_modulation(self, t: torch.Tensor) -> list[torch.Tensor]:
        """adaLN outputs of every block, then the final layer's (shift | scale), for timesteps ``t`` ``[N]``.

        They depend on t alone: a sampler computes them for all its steps in one call, which reads each adaLN
        weight once per run instead of once per step (``forward(..., modulation=[m[i:i+1] for m in mods])``).
        """
        temb_act = F.silu(self.embed_timesteps(t))
        # In the adaLN's dtype: float32 when kept so (bf16 / fp16 models), applied to the float32 residual stream
        return [block.adaLN(temb_act) for block in self.blocks] + [self.final_adaLN(temb_act)]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, registers: RegisterSequences,
                hidden_layer: int | None = None, modulation: list[torch.Tensor] | None = None):
        """Velocity of ``x_t`` ``[B,C,h,w]`` at ``t`` ``[B]`` -> ``[G*B,C,h,w]``, one ``[B,...]`` block per group
        (conditional first, then unconditional when guided).

        With ``hidden_layer=i`` also returns the patch tokens after block ``i`` ``[G*B, P, D]`` (REPA target layer).
        ``modulation``: precomputed :meth:`timestep_modulation` for this t (rows of 1 or B), else computed here.
        """
        b, _, h, w = x_t.shape
        patches = self.embed_patches(x_t)  # [B, gh, gw, D]
        gh, gw = patches.shape[1:3]
        patches = patches.flatten(1, 2)  # [B, P, D]
        num_patches = patches.shape[1]
        groups, seqs = [], []
        for tokens, bias in zip(registers.tokens, registers.key_bias):
            seq = torch.cat([patches, tokens.expand(b, -1, -1)], dim=1)  # [B, P+R, D]
            mask = None
            if bias is not None:
                mask = key_bias_mask(bias, num_patches, seq.dtype)  # [B, 1, 1, P+R]
            groups.append((b, seq.shape[1], mask))
            seqs.append(seq.flatten(0, 1))
        x = seqs[0] if len(seqs) == 1 else torch.cat(seqs)  # packed [T, D]
        if x.dtype in REDUCED_PRECISION:
            # The residual stream stays float32 under bf16 / fp16 weights; the matmuls, attention and MLP still run
            # in bf16. Rounding the stream after every block was nearly all of the bf16 decoder's error (d12-d12,
            # 25 steps: max |latent deviation| from float32 6.7e-2 -> 5.0e-3) and the float32 stream costs no
            # measurable time.
            x = x.float()

        if modulation is None:
            modulation = self.timestep_modulation(t.expand(b) if t.dim() == 0 else t)
        hidden = None
        for i, block in enumerate(self.blocks):
            x = block(x, groups, num_patches, modulation[i])
            if i == hidden_layer:
                hidden = torch.cat([p for p, _ in _split_types(x, groups, num_patches)])

        shift, scale = modulation[-1].chunk(2, dim=-1)  # [B or 1, D] each
        outs = []
        for p, _ in _split_types(x, groups, num_patches):
            y = torch.addcmul(shift[:, None], layer_norm(p), 1 + scale[:, None])
            outs.append(self.proj_out(y.to(self.proj_out.weight.dtype)))  # [B, P, C*p*p]
        out = torch.cat(outs).view(len(outs) * b, gh, gw, -1)
        velocity = unpatchify(out, self.patch_size, self.latent_channels)
        return velocity if hidden_layer is None else (velocity, hidden)
