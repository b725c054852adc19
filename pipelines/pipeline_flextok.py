"""FlexTokPipeline: images <-> 1..256 coarse-to-fine tokens, as a diffusers ``DiffusionPipeline``."""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..flextok_core import (LICENSE_NOTICE, FlexTokModel, apg_velocity, cfg_velocity, flow_timesteps, load_official,
                            vae_decode, vae_encode)
from ..flextok_core.sampling import MomentumBuffer

logger = logging.getLogger(__name__)
_license_shown = False

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _show_license_once():
    global _license_shown
    if not _license_shown:
        logger.warning(LICENSE_NOTICE)
        _license_shown = True


class FlexTokPipeline(DiffusionPipeline):
    """Tokenize images into 1-D coarse-to-fine token sequences and decode any prefix back into an image.

    Components: ``vae`` (AutoencoderKL), ``flextok`` (:class:`FlexTokModel`), ``scheduler``
    (FlowMatchEulerDiscreteScheduler with sigmas t = 1, (T-1)/T, ..., 1/T).
    """

    model_cpu_offload_seq = "vae->flextok->vae"
    _callback_tensor_inputs = ["latents", "velocity", "velocity_cond", "velocity_uncond"]

    def __init__(self, vae: AutoencoderKL, flextok: FlexTokModel, scheduler: FlowMatchEulerDiscreteScheduler):
        super().__init__()
        self.register_modules(vae=vae, flextok=flextok, scheduler=scheduler)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False)

    # -- construction -------------------------------------------------------------------------------
    @staticmethod
    def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

    @classmethod
    def from_official(cls, path_or_repo, vae=None, sample_posterior: bool | None = None,
                      torch_dtype: torch.dtype | None = None) -> "FlexTokPipeline":
        """Load the official release format (``config.json`` + ``model.safetensors``; folder or hub id)."""
        _show_license_once()
        ckpt = load_official(path_or_repo, vae=vae, sample_posterior=sample_posterior)
        for note in ckpt.notes:
            logger.info("from_official(%s): %s", path_or_repo, note)
        pipe = cls(vae=ckpt.vae, flextok=ckpt.model, scheduler=cls.default_scheduler())
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    # -- sizes --------------------------------------------------------------------------------------
    @property
    def num_registers(self) -> int:
        return self.flextok.config.num_registers

    @property
    def default_image_size(self) -> tuple[int, int]:
        h, w = self.flextok.max_latent_size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def _check_image_size(self, height: int, width: int):
        unit = self.vae_scale_factor * self.flextok.config.patch_size
        max_h, max_w = self.default_image_size
        if height % unit or width % unit or not (0 < height <= max_h and 0 < width <= max_w):
            raise ValueError(
                f"image size {height}x{width} is not supported by this model: height and width must be multiples "
                f"of {unit} and at most {max_h}x{max_w}")

    # -- input handling -----------------------------------------------------------------------------
    def _images_to_tensor(self, images) -> torch.Tensor:
        if isinstance(images, (PIL.Image.Image, np.ndarray)):
            images = [images]
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is an empty list")
            if isinstance(images[0], PIL.Image.Image):
                arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
                if len({a.shape for a in arrays}) != 1:
                    raise ValueError(f"images in one batch must share a size, got {sorted({a.shape[:2] for a in arrays})}")
                images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2 - 1
            elif isinstance(images[0], torch.Tensor):
                images = torch.stack(list(images))
            else:
                raise TypeError(f"images must be a tensor, PIL images or numpy arrays, got a list of {type(images[0])}")
        if isinstance(images, np.ndarray):
            raise TypeError("numpy images: pass a list of HxWx3 uint8 arrays as PIL images or a [-1,1] tensor")
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor [B,3,H,W] in [-1,1] or PIL images, got {type(images)}")
        if images.dim() == 3:
            images = images[None]
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"image tensor must have shape [B,3,H,W] (or [3,H,W]), got {tuple(images.shape)}")
        if not images.is_floating_point():
            raise ValueError(f"image tensor must be floating point in [-1,1], got dtype {images.dtype}")
        if not torch.isfinite(images).all():
            raise ValueError("image tensor contains NaN or inf")
        lo, hi = images.min().item(), images.max().item()
        if lo < -1.5 or hi > 1.5:
            raise ValueError(f"image values must lie in [-1,1], got range [{lo:.3g}, {hi:.3g}]"
                             + (" (looks like [0,255]: divide by 127.5 and subtract 1)" if hi > 2 else ""))
        self._check_image_size(images.shape[2], images.shape[3])
        return images

    def _tokens_to_batch(self, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """LongTensor [B,k] or a list of 1-D / [1,k] tensors (ragged) -> (ids [B,k_max] right-padded, lengths [B])."""
        if isinstance(tokens, torch.Tensor):
            if tokens.dim() == 1:
                tokens = tokens[None]
            if tokens.dim() != 2:
                raise ValueError(f"tokens must be [B,k] or a list of 1-D tensors, got shape {tuple(tokens.shape)}")
            seqs = list(tokens)
        elif isinstance(tokens, (list, tuple)) and tokens:
            seqs = []
            for i, s in enumerate(tokens):
                s = torch.as_tensor(s)
                if s.dim() == 2 and s.shape[0] == 1:
                    s = s[0]
                if s.dim() != 1:
                    raise ValueError(f"token sequence {i} must be 1-D (or [1,k]), got shape {tuple(s.shape)}")
                seqs.append(s)
        else:
            raise ValueError("tokens must be a LongTensor [B,k] or a non-empty list of 1-D token tensors")
        n, vocab = self.num_registers, self.flextok.vocab_size
        for i, s in enumerate(seqs):
            if s.is_floating_point() or s.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, sequence {i} has dtype {s.dtype}")
            if not 1 <= len(s) <= n:
                raise ValueError(f"sequence {i} has {len(s)} tokens; this model decodes 1..{n} tokens")
            bad = (s < 0) | (s >= vocab)
            if bad.any():
                j = int(bad.nonzero()[0, 0])
                raise ValueError(f"token id {int(s[j])} at position {j} of sequence {i} is outside [0, {vocab})")
        lengths = torch.tensor([len(s) for s in seqs])
        ids = torch.zeros(len(seqs), int(lengths.max()), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s.long().cpu()
        return ids.to(self._execution_device), lengths.to(self._execution_device)

    # -- tokenize -----------------------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, images, num_tokens: int | None = None, generator: torch.Generator | None = None,
                 sample_posterior: bool | None = None) -> torch.LongTensor:
        """Images ([B,3,H,W] in [-1,1], or PIL images) -> token ids ``[B, num_tokens]`` (default: all N).

        The first k tokens do not depend on later ones, so ``num_tokens=k`` runs only k registers and returns
        exactly the first k ids of the full sequence. ``sample_posterior`` defaults to the checkpoint's setting.
        """
        n = self.num_registers
        k = n if num_tokens is None else int(num_tokens)
        if not 1 <= k <= n:
            raise ValueError(f"num_tokens must be in 1..{n}, got {num_tokens}")
        images = self._images_to_tensor(images).to(self._execution_device)
        sample = self.flextok.config.sample_posterior if sample_posterior is None else sample_posterior
        latents = vae_encode(self.vae, images, sample, generator)
        _, ids = self.flextok.encode(latents.to(self.flextok.dtype), num_tokens=k)
        self.maybe_free_model_hooks()
        return ids

    # -- detokenize ---------------------------------------------------------------------------------
    def prepare_latents(self, batch_size, height, width, dtype, device, generator, latents=None) -> torch.Tensor:
        shape = (batch_size, self.flextok.config.latent_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape} for {batch_size} images of {height}x{width}, "
                                 f"got {tuple(latents.shape)}")
            return latents.to(device=device, dtype=dtype)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch_size}")
        # One draw of [1,C,h,w] per sample in order, as the release does (same stream as its sampler).
        gens = generator if isinstance(generator, list) else [generator] * batch_size
        return torch.cat([randn_tensor((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in gens])

    @torch.no_grad()
    def detokenize(
        self,
        tokens,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        use_apg: bool = True,
        apg_momentum: float = -0.5,
        apg_norm_threshold: float = 2.5,
        apg_eta: float = 0.0,
        height: int | None = None,
        width: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        fast_decoding: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Decode token ids (any prefix length 1..N; ragged lists allowed) into images.

        ``latents`` is the initial noise x_1 ``[B,C,h,w]``. ``output_type="latent"`` returns the final
        tokenizer-space latents (the VAE decoder's input). Guidance runs only when ``guidance_scale != 1``:
        plain CFG ``v_u + s (v_c - v_u)``, or APG (``use_apg``) ``v_c + (s-1) * projected difference``.
        ``fast_decoding`` collapses the runs of identical mask / null registers (exact; see decoder.py).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        if latents is not None and latents.dim() == 4:  # the noise fixes the size
            height = height or latents.shape[2] * self.vae_scale_factor
            width = width or latents.shape[3] * self.vae_scale_factor
        height = height or self.default_image_size[0]
        width = width or self.default_image_size[1]
        self._check_image_size(height, width)
        device = self._execution_device
        ids, keep_k = self._tokens_to_batch(tokens)
        b = ids.shape[0]

        guided = guidance_scale != 1.0
        registers = self.flextok.prepare_registers(ids, keep_k, guidance=guided, fast=fast_decoding)
        x = self.prepare_latents(b, height, width, torch.float32, device, generator, latents)
        self.scheduler.set_timesteps(sigmas=flow_timesteps(num_inference_steps), device=device)
        momentum = MomentumBuffer(apg_momentum) if use_apg else None
        model_dtype = self.flextok.dtype

        with self.progress_bar(total=num_inference_steps) as progress:
            for i, step_t in enumerate(self.scheduler.timesteps):
                t = self.scheduler.sigmas[i].to(device).expand(b)
                velocity = self.flextok(x.to(model_dtype), t, registers).float()
                v_cond = v_uncond = None
                if guided:
                    v_cond, v_uncond = velocity.chunk(2)
                    velocity = (apg_velocity(v_cond, v_uncond, guidance_scale, momentum, apg_norm_threshold, apg_eta)
                                if use_apg else cfg_velocity(v_cond, v_uncond, guidance_scale))
                x = self.scheduler.step(velocity, step_t, x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = dict(latents=x, velocity=velocity, velocity_cond=v_cond, velocity_uncond=v_uncond)
                    out = callback_on_step_end(self, i, step_t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    x = (out or {}).get("latents", x)
                progress.update()

        if output_type == "latent":
            image = x
        else:
            image = vae_decode(self.vae, x)
            image = self.image_processor.postprocess(image.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # -- reconstruct --------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image=None, num_tokens: int | None = None, generator=None, **detokenize_kwargs):
        """Reconstruct ``image`` through its first ``num_tokens`` tokens (default: all)."""
        if image is None:
            raise ValueError("pass image=... to reconstruct (generation from classes or prompts needs an AR model)")
        images = self._images_to_tensor(image)
        ids = self.tokenize(images, num_tokens=num_tokens)
        detokenize_kwargs.setdefault("height", images.shape[2])
        detokenize_kwargs.setdefault("width", images.shape[3])
        return self.detokenize(ids, generator=generator, **detokenize_kwargs)
