"""FlexTokModel: the resampler tokenizer (encoder + FSQ + rectified-flow decoder) as a diffusers model."""
from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook

from .decoder import FlexTokDecoder
from .encoder import FlexTokEncoder
from .fsq import FSQ
from .precision import quiet_fp32_cast_warning
from .registers import RegisterSequences

# Kept in float32 when the model runs in bfloat16 / float16: the timestep embedding and every adaLN (computed
# once per sampling run for all steps), the decoder's output projection (the velocity the float32 Euler update
# integrates) and the encoder's projection to the FSQ latents (rounding there flips token ids). Together they
# are <4% of the FLOPs of a step and of the parameters.
KEEP_IN_FP32 = ["time_embed", "adaLN", "final_adaLN", "proj_out", "to_latents"]


class FlexTokModel(ModelMixin, ConfigMixin):
    """Images' VAE latents <-> 1..N discrete tokens, ordered coarse to fine.

    The VAE itself is a separate ``AutoencoderKL``; ``sample_posterior`` records whether the tokenizer was
    trained on (and the release encodes with) posterior samples rather than the posterior mean.

    Every compute method, not only ``forward``, first fires an accelerate offload hook when one is attached
    (``apply_forward_hook``, as ``AutoencoderKL.encode``/``decode``), so ``enable_model_cpu_offload`` moves the
    weights to the execution device before ``encode``, ``prepare_registers`` or ``timestep_modulation`` computes.
    """

    config_name = "config.json"
    _keep_in_fp32_modules = KEEP_IN_FP32

    @register_to_config
    def __init__(
        self,
        latent_channels: int = 16,
        patch_size: int = 2,
        grid_size: tuple = (16, 16),
        num_registers: int = 256,
        fsq_levels: tuple = (8, 8, 8, 5, 5, 5),
        encoder_dim: int = 768,
        encoder_depth: int = 12,
        encoder_head_dim: int = 64,
        decoder_dim: int = 768,
        decoder_depth: int = 12,
        decoder_head_dim: int = 64,
        encoder_mlp_ratio: float = 4.0,
        decoder_mlp_ratio: float = 4.0,
        null_condition: str = "learned",
        adaln_expansion: int = 2,
        time_embed_dim: int = 256,
        max_timestep: float = 1000.0,
        sample_posterior: bool = True,
    ):
        super().__init__()
        grid_size = tuple(grid_size)
        self.fsq = FSQ(list(fsq_levels))
        self.encoder = FlexTokEncoder(
            latent_channels, patch_size, encoder_dim, encoder_depth, encoder_head_dim, encoder_mlp_ratio,
            num_registers, grid_size, self.fsq.dim,
        )
        self.decoder = FlexTokDecoder(
            latent_channels, patch_size, decoder_dim, decoder_depth, decoder_head_dim, decoder_mlp_ratio,
            num_registers, grid_size, self.fsq.dim, null_condition, adaln_expansion, time_embed_dim, max_timestep,
        )

    # -- precision ----------------------------------------------------------------------------------
    def _keeps_fp32(self, name: str) -> bool:
        return any(module in name.split(".") for module in self._keep_in_fp32_modules)  # diffusers' loading rule

    def _apply(self, fn, recurse=True):
        """Every conversion (``.to(torch.bfloat16)``, ``.half()``, ...) leaves the :data:`KEEP_IN_FP32` parameters
        in float32, with their original float32 values, so ``.to(dtype)`` gives exactly the model that
        ``from_pretrained(..., torch_dtype=dtype)`` loads."""
        kept = {name: p.data for name, p in self.named_parameters() if self._keeps_fp32(name)
                and p.dtype == torch.float32}
        out = super()._apply(fn, recurse)
        target = fn(torch.zeros((), dtype=torch.float32))  # where this conversion sends a float32 tensor
        if kept and target.dtype != torch.float32 and target.dtype.is_floating_point:
            for name, p in self.named_parameters():
                if name in kept and p.dtype != torch.float32:
                    p.data = kept[name].to(target.device)
        return out

    def to(self, *args, **kwargs):
        with quiet_fp32_cast_warning():
            return super().to(*args, **kwargs)

    @property
    def vocab_size(self) -> int:
        return self.fsq.vocab_size

    @property
    def num_registers(self) -> int:
        return self.config.num_registers

    @property
    def max_latent_size(self) -> tuple[int, int]:
        gh, gw = self.config.grid_size
        return gh * self.config.patch_size, gw * self.config.patch_size

    # -- tokenizing -----------------------------------------------------------------------------------
    @apply_forward_hook
    def encode(self, latents: torch.Tensor, num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE latents ``[B,C,h,w]`` -> (FSQ values ``[B,k,6]``, ids ``[B,k]``) for the first ``k`` tokens."""
        return self.fsq(self.encoder(latents, num_tokens))

    @apply_forward_hook
    def pre_quantization(self, latents: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """The encoder's register outputs before FSQ ``[B,k,6]`` (training monitors look at these)."""
        return self.encoder(latents, num_tokens)

    @apply_forward_hook
    def register_values(self, latents: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """Quantized register values ``[B,k,6]`` with the straight-through gradient (training)."""
        return self.fsq.quantize(self.encoder(latents, num_tokens))

    # -- detokenizing ---------------------------------------------------------------------------------
    @apply_forward_hook
    def prepare_registers(self, ids: torch.Tensor, keep_k, guidance: bool, fast: bool = True
                          ) -> RegisterSequences:
        """Token ids ``[B, k_max]`` (right-padded) with per-sample lengths ``keep_k [B]`` -> decoder registers.

        ``keep_k``: a tensor on any device or a list of ints; host values (a CPU tensor or a list, as the pipeline
        passes) size the fast path's sequences without reading the device."""
        b, k = ids.shape
        n = self.config.num_registers
        padded = torch.zeros(b, n, dtype=torch.long, device=ids.device)
        padded[:, :k] = ids
        values = self.fsq.ids_to_values(padded)
        return self.decoder.prepare_registers(values, keep_k, guidance=guidance, fast=fast)

    @apply_forward_hook
    def registers_from_values(self, values: torch.Tensor, keep_k, guidance: bool = False,
                              fast: bool = True, null_condition_mask=None) -> RegisterSequences:
        """FSQ values ``[B,N,6]`` (training: they carry the encoder's gradient) with nested-dropout lengths
        ``keep_k [B]`` -> decoder registers; ``null_condition_mask [B]`` drops the condition (CFG dropout). Both may
        be host values (CPU tensors or lists): see :meth:`prepare_registers`."""
        return self.decoder.prepare_registers(values, keep_k, guidance=guidance, fast=fast,
                                              null_condition_mask=null_condition_mask)

    @apply_forward_hook
    def timestep_modulation(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The decoder's adaLN modulation for timesteps ``t [T]``, computed once per sampling run (it depends on
        t alone); pass ``[m[i:i+1] for m in mods]`` as ``modulation`` at step i."""
        return self.decoder.timestep_modulation(t)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, registers: RegisterSequences,
                hidden_layer: int | None = None, modulation: list[torch.Tensor] | None = None):
        """Velocity ``[G*B,C,h,w]`` (conditional block first, then unconditional when guided); with
        ``hidden_layer`` also the decoder's patch tokens after that block (for REPA). ``modulation``: see
        ``FlexTokDecoder.timestep_modulation``."""
        return self.decoder(x_t, t, registers, hidden_layer=hidden_layer, modulation=modulation)
