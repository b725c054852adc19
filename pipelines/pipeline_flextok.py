"""FlexTokPipeline: images <-> 1..256 coarse-to-fine tokens, as a diffusers ``DiffusionPipeline``."""
from __future__ import annotations

import hashlib
import inspect
import json
import logging
import numbers
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.image_processor import VaeImageProcessor
from dataclasses import dataclass

from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..flextok_core import LICENSE_NOTICE, FlexTokModel, load_official, vae_decode, vae_encode
from ..flextok_core.ar import check_ar_sampling
from ..flextok_core.checks import check_int
from ..flextok_core.fileio import read_json_object, replace_dir
from ..flextok_core.guidance import MomentumBuffer, apg_velocity, cfg_velocity, decoder_guidance_scales
from ..flextok_core.official import non_floating_weights
from ..flextok_core.sampling import check_decoder_sampling
from ..images import to_rgb8
from .scheduling_flextok import FlexTokFlowScheduler, flextok_sigmas

logger = logging.getLogger(__name__)
_license_shown = False

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# model_index.json names our classes under the installed package name, whatever name this package was imported
# under (pip installs it as flextok_kit; ComfyUI imports the folder by path under another name).
PACKAGE = "flextok_kit"
_ROOT = __name__.rsplit(".", 2)[0]
HUB_SHIM = (
    "# Lets diffusers load this folder without knowing FlexTok:\n"
    "#   DiffusionPipeline.from_pretrained(folder, custom_pipeline=folder, trust_remote_code=True)\n"
    "# (needs `pip install flextok-kit`).\n"
    "from flextok_kit.pipelines import FlexTokPipeline  # noqa: F401\n"
)


@dataclass
class FlexTokPipelineOutput(ImagePipelineOutput):
    """Images (``None`` for ``output_type="tokens"``) and the token ids they were decoded from ``[B, k]``
    (or a list of ragged sequences)."""

    tokens: torch.Tensor | list | None = None


@dataclass
class _DecodeRun:
    """What every sampling step of one :meth:`FlexTokPipeline.detokenize` run reads (built once, before step 0)."""

    chunks: list            # slices of the batch run through the decoder together (decode_batch_size)
    registers: list         # RegisterSequences per chunk (they do not change over the steps)
    momentum: list          # APG MomentumBuffer per chunk
    scales: list            # guidance scale per step
    guided: bool            # any step guided (scale != 1): the register sequences hold the unconditional pass
    modulations: list       # the decoder's adaLN modulation of every step (row i = step i)
    model_dtype: torch.dtype
    device: torch.device
    use_apg: bool
    apg_norm_threshold: float
    apg_eta: float


def _ensure_importable_as_package():
    """Make ``flextok_kit.*`` resolve to this (already imported) package when it was imported under another name
    (ComfyUI), so model_index.json entries load without a second copy of our modules."""
    if _ROOT == PACKAGE:
        return
    for name, module in list(sys.modules.items()):
        if name == _ROOT or name.startswith(_ROOT + "."):
            sys.modules.setdefault(PACKAGE + name[len(_ROOT):], module)


# Components whose weights are ours or diffusers' (all floating point); a transformers text encoder may keep
# integer buffers of its own and is left to transformers.
_FLOAT_COMPONENTS = ("flextok", "vae", "ar_model")


def _check_float_weights(folder: Path):
    """Refuse a diffusers-format folder whose FlexTok / VAE / AR weights hold integer or bool tensors: diffusers
    would cast them silently into nonsense weights. Reads the safetensors headers only."""
    for component in _FLOAT_COMPONENTS:
        for weights in sorted((folder / component).glob("*.safetensors")):
            try:
                bad = non_floating_weights(weights)
            except Exception as e:
                raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupted?): {e}") from e
            if bad:
                more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
                raise ValueError(f"{weights}: weight {bad[0][0]!r} has dtype {bad[0][1]}; {component} weights must be "
                                 f"floating point (a corrupted or mis-converted checkpoint?){more}")


_CONFIG_FILES = {"flextok": "config.json", "vae": "config.json", "ar_model": "config.json",
                 "scheduler": "scheduler_config.json"}


def _check_folder_configs(folder: Path) -> dict:
    """model_index.json and the component configs of our format are JSON objects (the file named if not)."""
    index = read_json_object(folder / "model_index.json")
    for name, entry in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2):
            raise ValueError(f"{folder / 'model_index.json'}: entry {name!r} must be [library, class name], got "
                             f"{entry!r}")
        config = folder / name / _CONFIG_FILES.get(name, "config.json")
        if entry[0] is not None and name in _CONFIG_FILES and config.is_file():
            read_json_object(config)
    return index


def _component_class(library: str, name: str):
    import importlib

    if library == PACKAGE or library.startswith(PACKAGE + "."):
        library = _ROOT + library[len(PACKAGE):]
    return getattr(importlib.import_module(library), name)


def _diagnose_components(folder: Path, index: dict):
    """After diffusers failed to load ``folder``: build each component from its config to name the file whose
    values are wrong (wrong types deep inside a config surface as bare TypeErrors otherwise)."""
    for name, config_name in _CONFIG_FILES.items():
        entry, path = index.get(name), folder / name / config_name
        if not (isinstance(entry, (list, tuple)) and entry[0] and path.is_file()):
            continue
        try:
            cls = _component_class(*entry)
        except Exception:  # unknown class: diffusers' own message is the clearer one
            continue
        config = {k: v for k, v in read_json_object(path).items() if not k.startswith("_")}
        try:
            cls.from_config(config)
        except Exception as e:
            raise ValueError(f"{path}: cannot build {entry[1]} from it ({type(e).__name__}: {e})") from e


def _show_license_once():
    global _license_shown
    if not _license_shown:
        logger.warning(LICENSE_NOTICE)
        _license_shown = True


class FlexTokPipeline(DiffusionPipeline):
    """Tokenize images into 1-D coarse-to-fine token sequences and decode any prefix back into an image.

    Components: ``vae`` (AutoencoderKL), ``flextok`` (:class:`FlexTokModel`), ``scheduler``
    (:class:`FlexTokFlowScheduler`, a FlowMatchEulerDiscreteScheduler on t = 1, (T-1)/T, ..., 1/T with the
    release's exact Euler step; any flow-matching diffusers scheduler that accepts ``sigmas`` works), and the optional ``ar_model``,
    ``text_encoder`` and ``tokenizer`` for generation.
    """

    model_cpu_offload_seq = "text_encoder->ar_model->flextok->vae"
    _optional_components = ["ar_model", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "velocity", "velocity_cond", "velocity_uncond"]

    def __init__(self, vae: AutoencoderKL, flextok: FlexTokModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 ar_model=None, text_encoder=None, tokenizer=None):
        super().__init__()
        self.register_modules(vae=vae, flextok=flextok, scheduler=scheduler, ar_model=ar_model,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor, do_resize=False)

    def register_modules(self, **kwargs):
        super().register_modules(**kwargs)
        for name, module in kwargs.items():
            library = type(module).__module__
            if module is not None and library.startswith(_ROOT + "."):
                self.register_to_config(**{name: (PACKAGE + library[len(_ROOT):], type(module).__name__)})

    # -- construction -------------------------------------------------------------------------------
    @staticmethod
    def default_scheduler() -> FlexTokFlowScheduler:
        return FlexTokFlowScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)

    @classmethod
    def from_official(cls, path_or_repo, vae=None, sample_posterior: bool | None = None,
                      torch_dtype: torch.dtype | None = None) -> "FlexTokPipeline":
        """Load the official release format (``config.json`` + ``model.safetensors``; folder or hub id)."""
        ckpt = load_official(path_or_repo, vae=vae, sample_posterior=sample_posterior)
        _show_license_once()  # after a successful load: a refused checkpoint gets one error line, nothing else
        for note in ckpt.notes:
            logger.info("from_official(%s): %s", path_or_repo, note)
        pipe = cls(vae=ckpt.vae, flextok=ckpt.model, scheduler=cls.default_scheduler())
        return pipe.to(dtype=torch_dtype) if torch_dtype is not None else pipe

    @classmethod
    def load(cls, path_or_repo, **kwargs) -> "FlexTokPipeline":
        """Load either format: our diffusers folder (``model_index.json``) or the official release
        (``config.json`` + ``model.safetensors``); a hub id is tried as ours first, then as official."""
        folder = Path(path_or_repo)
        if (folder / "model_index.json").is_file():
            return cls.from_pretrained(folder, **kwargs)
        if (folder / "model.safetensors").is_file():
            return cls.from_official(folder, **kwargs)
        if folder.is_file():
            raise ValueError(f"{folder} is a file; pass the model folder (model_index.json, or the official "
                             f"config.json + model.safetensors)")
        if folder.exists():
            raise ValueError(f"{folder} holds neither model_index.json (diffusers format) nor model.safetensors "
                             f"(official FlexTok format)")
        text = str(path_or_repo)
        if text.count("/") != 1 or text.startswith((".", "/", "~")) or folder.is_absolute():
            raise ValueError(f"model path {text!r} does not exist (and is not a Hugging Face repo id owner/name)")
        try:
            return cls.from_pretrained(str(path_or_repo), **kwargs)
        except Exception as ours:  # not a diffusers-format repo (or offline): try the release format
            try:
                return cls.from_official(str(path_or_repo), **kwargs)
            except Exception as official:
                raise ValueError(f"could not load {path_or_repo!r} as a diffusers-format FlexTok pipeline ({ours}) "
                                 f"nor as an official FlexTok checkpoint ({official})") from official

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs) -> "FlexTokPipeline":
        _ensure_importable_as_package()
        if not os.path.isdir(pretrained_model_name_or_path):  # a hub id: download() checks the weights
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        folder = Path(pretrained_model_name_or_path)
        if not (folder / "model_index.json").is_file():
            raise ValueError(f"{folder} has no model_index.json: not a diffusers-format pipeline folder "
                             f"(an official FlexTok checkpoint loads with from_official or load)")
        index = _check_folder_configs(folder)
        _check_float_weights(folder)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except (TypeError, ValueError, AttributeError, KeyError):
            _diagnose_components(folder, index)
            raise

    @classmethod
    def download(cls, pretrained_model_name, **kwargs):
        """diffusers' ``download``, then the same weight-dtype check as for a local folder."""
        folder = super().download(pretrained_model_name, **kwargs)
        _check_float_weights(Path(folder))
        return folder

    def save_pretrained(self, save_directory, **kwargs):
        """diffusers ``save_pretrained`` (safetensors), written to a temporary folder and then renamed into place,
        plus a ``pipeline.py`` shim so ``DiffusionPipeline.from_pretrained(custom_pipeline=...)`` finds us."""
        target = Path(save_directory)
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"save_pretrained: {target} is an existing file, not a folder; refusing to "
                                  f"replace it (pass a folder path)")
        if kwargs.get("push_to_hub"):
            return super().save_pretrained(save_directory, **kwargs)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            kwargs["safe_serialization"] = True  # safetensors only, never pickle
            super().save_pretrained(tmp, **kwargs)
            (tmp / "pipeline.py").write_text(HUB_SHIM)
            replace_dir(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def enable_vae_slicing(self):
        """Decode the VAE one image at a time (lower peak memory)."""
        self.vae.enable_slicing()

    def disable_vae_slicing(self):
        self.vae.disable_slicing()

    def enable_vae_tiling(self):
        """Decode/encode the VAE in overlapping tiles (large images with bounded memory)."""
        self.vae.enable_tiling()

    def disable_vae_tiling(self):
        self.vae.disable_tiling()

    @property
    def fingerprint(self) -> str:
        """Identity of this token space: the tokenizer and VAE configs plus a strided sample of every weight
        (rounded to bfloat16). The same weights give the same id in either format, any dtype or device; another
        release or a fine-tune gives another. Token files and ComfyUI tokens carry it, so decoding can refuse
        tokens made by another model."""
        h = hashlib.sha256()
        for part in ("flextok", "vae"):
            module = getattr(self, part)
            config = {k: v for k, v in dict(module.config).items() if not str(k).startswith("_")}
            h.update(json.dumps({part: config}, sort_keys=True, default=str).encode())
            for name, tensor in sorted(module.state_dict().items()):
                h.update(f"{name}:{tuple(tensor.shape)};".encode())
                flat = tensor.detach().reshape(-1)
                if flat.numel() and flat.is_floating_point():
                    idx = torch.linspace(0, flat.numel() - 1, min(64, flat.numel()), device=flat.device).long()
                    h.update(flat[idx].to(torch.bfloat16).float().cpu().numpy().tobytes())
        return h.hexdigest()[:32]

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
                raise ValueError("images is an empty list: pass at least one image")
            kinds = {type(im).__name__ for im in images}
            if len({isinstance(im, PIL.Image.Image) for im in images}) > 1:
                raise TypeError(f"images mixes PIL images and other types ({sorted(kinds)}): pass one kind")
            if isinstance(images[0], PIL.Image.Image):
                # one function decides how any mode (16-bit, float, alpha, palette) becomes 8-bit RGB
                arrays = [np.asarray(to_rgb8(im), dtype=np.float32) / 255.0 for im in images]
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
        if images.shape[0] == 0:
            raise ValueError(f"images is an empty batch (tensor of shape {tuple(images.shape)}): pass at least one "
                             f"image")
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
            if tokens.shape[0] == 0:
                raise ValueError(f"tokens is an empty batch (shape {tuple(tokens.shape)}): pass at least one "
                                 f"sequence")
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
        elif isinstance(tokens, (list, tuple)):
            raise ValueError("tokens is an empty list: pass a LongTensor [B,k] or a non-empty list of 1-D token "
                             "tensors")
        else:
            raise TypeError(f"tokens must be a LongTensor [B,k] or a non-empty list of 1-D token tensors, got "
                            f"{type(tokens).__name__}")
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
        k = n if num_tokens is None else check_int("num_tokens", num_tokens, 1, n)
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

    def _prepare_decoding(self, ids, keep_k, num_inference_steps, guidance_scale, guidance_schedule, use_apg,
                          apg_momentum, apg_norm_threshold, apg_eta, fast_decoding, decode_batch_size,
                          device) -> _DecodeRun:
        """Set the scheduler's grid and build what the sampling steps reuse: the guidance scale of every step, the
        register sequences and APG buffers of every chunk of at most ``decode_batch_size`` images, and the
        decoder's timestep modulation of every step."""
        b = ids.shape[0]
        self.scheduler.set_timesteps(sigmas=flextok_sigmas(num_inference_steps), device=device)
        scales = decoder_guidance_scales(guidance_scale, guidance_schedule, self.scheduler.sigmas[:-1].tolist())
        guided = any(s != 1.0 for s in scales)
        chunk = decode_batch_size or b
        chunks = [slice(i, min(i + chunk, b)) for i in range(0, b, chunk)]
        # Register sequences do not change over the steps: build them once per chunk.
        registers = [self.flextok.prepare_registers(ids[c], keep_k[c], guidance=guided, fast=fast_decoding)
                     for c in chunks]
        momentum = [MomentumBuffer(apg_momentum) for _ in chunks]
        model_dtype = self.flextok.dtype
        # timestep conditioning of every step at once (it depends on t alone); computed where the weights are
        # now (offload hooks move them only on forward), then moved to the execution device
        sigmas = self.scheduler.sigmas[:-1].to(self.flextok.device)
        modulations = [m.to(device) for m in self.flextok.timestep_modulation(sigmas)]
        return _DecodeRun(chunks, registers, momentum, scales, guided, modulations, model_dtype, device, use_apg,
                          apg_norm_threshold, apg_eta)

    def _step_velocity(self, run: _DecodeRun, i: int, x: torch.Tensor):
        """One sampling step's velocity at step ``i`` for latents ``x`` ``[B,C,h,w]``: the decoder on every chunk
        (the conditional pass and, when step ``i`` is guided, the unconditional one), combined by APG or CFG.
        Returns (velocity, v_cond, v_uncond); ``v_uncond`` is None for an unguided run and NaN at a step that
        skips the unconditional pass."""
        scale = run.scales[i]
        t = self.scheduler.sigmas[i].to(run.device)
        velocity, v_cond, v_uncond = torch.empty_like(x), torch.empty_like(x), None
        if run.guided:
            v_uncond = torch.empty_like(x)
        for j, c in enumerate(run.chunks):
            regs = run.registers[j]
            if scale == 1.0 and regs.guided:  # this step needs no unconditional pass
                regs = regs.conditional()
            v = self.flextok(x[c].to(run.model_dtype), t.expand(x[c].shape[0]), regs,
                             modulation=[m[i : i + 1] for m in run.modulations]).float()
            if not regs.guided:
                v_cond[c] = velocity[c] = v
                if v_uncond is not None:
                    v_uncond[c] = float("nan")  # not computed at this step
                continue
            v_cond[c], v_uncond[c] = v.chunk(2)
            velocity[c] = (apg_velocity(v_cond[c], v_uncond[c], scale, run.momentum[j], run.apg_norm_threshold,
                                        run.apg_eta) if run.use_apg else cfg_velocity(v_cond[c], v_uncond[c], scale))
        return velocity, v_cond, v_uncond

    def _latents_to_images(self, x: torch.Tensor, chunks: list, output_type: str):
        """Final tokenizer-space latents -> images of ``output_type`` (the VAE decodes chunk by chunk)."""
        if output_type == "latent":
            return x
        image = torch.cat([vae_decode(self.vae, x[c]).float() for c in chunks])
        return self.image_processor.postprocess(image, output_type=output_type)

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
        guidance_schedule: Callable[[float], float] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        fast_decoding: bool = True,
        decode_batch_size: int | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
    ):
        """Decode token ids (any prefix length 1..N; ragged lists allowed) into images.

        tokens: LongTensor ``[B,k]``, or a list of 1-D (or ``[1,k]``) id tensors / lists of different lengths.
        guidance: none when the scale is 1 (the unconditional pass is skipped); plain CFG ``v_u + s (v_c - v_u)``
            or APG (``use_apg``; ``v_c + (s-1) * projected difference`` with ``apg_momentum``,
            ``apg_norm_threshold``, ``apg_eta``). ``guidance_schedule(t) -> scale`` overrides the constant scale
            per step (t runs from 1 to 1/T).
        num_images_per_prompt: images per token sequence (different noise); outputs are sequence-major.
        latents: the initial noise x_1 ``[B*num_images_per_prompt, C, h, w]``; ``output_type="latent"`` returns
            the final tokenizer-space latents (the VAE decoder's input).
        decode_batch_size: run the decoder (and the VAE) on at most this many images at once (bounded memory;
            results do not depend on it).
        fast_decoding: collapse runs of identical mask / null registers (exact; see flextok_core/registers.py).
        callback_on_step_end(pipe, step, timestep, tensors): called after every step with the tensors named in
            ``callback_on_step_end_tensor_inputs`` (``latents`` after the step, ``velocity`` (guided),
            ``velocity_cond``, ``velocity_uncond``); a returned ``{"latents": ...}`` replaces the latents.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        num_inference_steps, guidance_scale, apg_momentum, apg_norm_threshold, apg_eta = check_decoder_sampling(
            num_inference_steps, guidance_scale, apg_momentum, apg_norm_threshold, apg_eta)
        num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
        if decode_batch_size is not None:
            decode_batch_size = check_int("decode_batch_size", decode_batch_size, minimum=1)
        if latents is not None and latents.dim() == 4:  # the noise fixes the size
            height = height or latents.shape[2] * self.vae_scale_factor
            width = width or latents.shape[3] * self.vae_scale_factor
        height = height or self.default_image_size[0]
        width = width or self.default_image_size[1]
        self._check_image_size(height, width)
        device = self._execution_device
        ids, keep_k = self._tokens_to_batch(tokens)
        ids = ids.repeat_interleave(num_images_per_prompt, dim=0)
        keep_k = keep_k.repeat_interleave(num_images_per_prompt, dim=0)
        x = self.prepare_latents(ids.shape[0], height, width, torch.float32, device, generator, latents)
        run = self._prepare_decoding(ids, keep_k, num_inference_steps, guidance_scale, guidance_schedule, use_apg,
                                     apg_momentum, apg_norm_threshold, apg_eta, fast_decoding, decode_batch_size,
                                     device)

        with self.progress_bar(total=num_inference_steps) as progress:
            for i, step_t in enumerate(self.scheduler.timesteps):
                velocity, v_cond, v_uncond = self._step_velocity(run, i, x)
                x = self.scheduler.step(velocity, step_t, x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = dict(latents=x, velocity=velocity, velocity_cond=v_cond, velocity_uncond=v_uncond)
                    out = callback_on_step_end(self, i, step_t, {k: local[k] for k in callback_on_step_end_tensor_inputs})
                    x = (out or {}).get("latents", x)
                progress.update()

        image = self._latents_to_images(x, run.chunks, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    # -- generation (AR) ----------------------------------------------------------------------------
    def encode_prompt(self, prompt: list[str], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (text encoder hidden states ``[B,S,D_text]``, attention mask ``[B,S]``)."""
        if self.text_encoder is None or self.tokenizer is None:
            raise ValueError("this pipeline has no text_encoder/tokenizer: pass class_labels, or load a text model")
        device = device or self._execution_device
        batch = self.tokenizer(list(prompt), padding=True, truncation=True, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        states = self.text_encoder(**batch).last_hidden_state
        return states, batch["attention_mask"]

    def _class_label_ids(self, class_labels) -> torch.Tensor:
        if isinstance(class_labels, (torch.Tensor, np.ndarray)):
            if class_labels.ndim > 1:
                raise ValueError(f"class_labels must be 1-D, got shape {tuple(class_labels.shape)}")
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (str, numbers.Integral)):
            labels = [class_labels]
        elif isinstance(class_labels, (list, tuple)):
            labels = list(class_labels)
        else:
            raise TypeError(f"class_labels must be a class id, a class name or a list of them, got "
                            f"{type(class_labels).__name__}")
        if not labels:
            raise ValueError("class_labels is empty: pass at least one class id or name")
        labels = [c if isinstance(c, str) else check_int(f"class_labels[{i}]", c) for i, c in enumerate(labels)]
        names = [c for c in labels if isinstance(c, str)]
        name_ids = iter(self.ar_model.class_ids(names).tolist()) if names else iter(())
        return torch.as_tensor([next(name_ids) if isinstance(c, str) else c for c in labels], dtype=torch.long)

    @torch.no_grad()
    def generate_tokens(
        self,
        class_labels=None,
        prompt: str | list[str] | None = None,
        num_tokens: int | None = None,
        ar_guidance_scale: float = 4.0,
        ar_guidance_schedule: str = "constant",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | None = None,
        use_cache: bool = True,
    ) -> torch.LongTensor:
        """Sample token ids ``[B * num_images_per_prompt, num_tokens]`` with the AR model, from class ids or
        names (via the AR config's ``id2label``) or from prompts (text encoder hidden states)."""
        if self.ar_model is None:
            raise ValueError("this pipeline has no AR model (ar_model=None): it can reconstruct images, not "
                             "generate them")
        if (class_labels is None) == (prompt is None):
            raise ValueError("pass exactly one of class_labels or prompt")
        num_images_per_prompt = check_int("num_images_per_prompt", num_images_per_prompt, minimum=1)
        limit = min(self.ar_model.config.max_tokens, self.num_registers)
        num_tokens = limit if num_tokens is None else check_int("num_tokens", num_tokens, 1, limit)
        # checked here (before the text encoder runs) with the pipeline's argument names
        check_ar_sampling(ar_guidance_scale, ar_guidance_schedule, temperature, top_k, top_p,
                          guidance_name="ar_guidance_scale")
        kwargs = dict(num_tokens=num_tokens, guidance_scale=ar_guidance_scale, guidance_schedule=ar_guidance_schedule,
                      temperature=temperature, top_k=top_k, top_p=top_p, generator=generator, use_cache=use_cache)
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or any(not isinstance(p, str) for p in prompts):
                raise ValueError("prompt must be a string or a non-empty list of strings")
            if not self.ar_model.is_text_conditional:
                raise ValueError("this AR model is class-conditional: pass class_labels, not prompt")
            states, mask = self.encode_prompt(prompts)
            states = states.repeat_interleave(num_images_per_prompt, dim=0)
            mask = mask.repeat_interleave(num_images_per_prompt, dim=0)
            ids = self.ar_model.generate(text_states=states.to(self.ar_model.dtype), text_mask=mask, **kwargs)
        else:
            if self.ar_model.is_text_conditional:
                raise ValueError("this AR model is text-conditional: pass prompt, not class_labels")
            labels = self._class_label_ids(class_labels).repeat_interleave(num_images_per_prompt)
            ids = self.ar_model.generate(class_labels=labels, **kwargs)
        self.maybe_free_model_hooks()
        return ids

    # -- one entry point ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, image=None, class_labels=None, prompt=None, num_tokens: int | list[int] | None = None,
                 generator=None, sample_posterior: bool | None = None, num_images_per_prompt: int = 1,
                 output_type: str = "pil", return_dict: bool = True, ar_guidance_scale: float = 4.0,
                 ar_guidance_schedule: str = "constant", temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, **detokenize_kwargs):
        """Reconstruct ``image`` through its first ``num_tokens`` tokens, or generate from ``class_labels`` /
        ``prompt`` with the AR model (``num_tokens`` tokens, then decode). ``output_type="tokens"`` returns only
        the ids. Decoder options (steps, guidance, APG, ...) are those of :meth:`detokenize`.

        Reconstruction with a list ``num_tokens=[k1, k2, ...]`` tokenizes each image once and decodes every k
        in one batched run; outputs are image-major (image 0 at k1, k2, ..., then image 1 ...), and each image's
        series shares one initial noise, so the differences come from the tokens alone.
        """
        if sum(x is not None for x in (image, class_labels, prompt)) != 1:
            raise ValueError("pass exactly one of image= (reconstruct), class_labels= or prompt= (generate)")
        if output_type not in OUTPUT_TYPES + ("tokens",):
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES + ('tokens',)}, got {output_type!r}")
        self._check_decoder_options(detokenize_kwargs)  # before any tokenizing or sampling
        if image is None:
            if isinstance(num_tokens, (list, tuple)):
                raise ValueError("generation takes one num_tokens; decode prefixes of the result for a series")
            sequences = self.generate_tokens(class_labels, prompt, num_tokens, ar_guidance_scale,
                                             ar_guidance_schedule, temperature, top_k, top_p,
                                             num_images_per_prompt, generator)
            num_images_per_prompt = 1  # already expanded
        else:
            sequences = self._reconstruction_sequences(image, num_tokens, generator, sample_posterior,
                                                       num_images_per_prompt, detokenize_kwargs)
        if output_type == "tokens":
            out = FlexTokPipelineOutput(images=None, tokens=sequences)
            return out if return_dict else (None, sequences)
        images = self.detokenize(sequences, generator=generator, num_images_per_prompt=num_images_per_prompt,
                                 output_type=output_type, return_dict=False, **detokenize_kwargs)[0]
        if not return_dict:
            return (images, sequences)
        return FlexTokPipelineOutput(images=images, tokens=sequences)

    def _check_decoder_options(self, detokenize_kwargs: dict):
        """``__call__``'s decoder options: known names of :meth:`detokenize`, valid sampling settings."""
        params = inspect.signature(self.detokenize).parameters
        own = {"tokens", "generator", "num_images_per_prompt", "output_type", "return_dict"}  # __call__ passes these
        unknown = sorted(set(detokenize_kwargs) - (set(params) - own))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; decoder options are those of detokenize(): "
                            f"{sorted(set(params) - own)}")
        value = lambda name: detokenize_kwargs.get(name, params[name].default)  # noqa: E731
        check_decoder_sampling(value("num_inference_steps"), value("guidance_scale"), value("apg_momentum"),
                               value("apg_norm_threshold"), value("apg_eta"))

    def _reconstruction_sequences(self, image, num_tokens, generator, sample_posterior, num_images_per_prompt,
                                  detokenize_kwargs) -> list:
        n = self.num_registers
        if isinstance(num_tokens, (list, tuple)):
            if not num_tokens:
                raise ValueError("num_tokens is an empty list: pass at least one token count")
            ks = [check_int(f"num_tokens[{i}]", k, 1, n) for i, k in enumerate(num_tokens)]
        else:
            ks = [n if num_tokens is None else check_int("num_tokens", num_tokens, 1, n)]
        images = self._images_to_tensor(image)
        ids = self.tokenize(images, num_tokens=max(ks), generator=generator, sample_posterior=sample_posterior)
        b, n_k = ids.shape[0], len(ks)
        height, width = images.shape[2:]
        detokenize_kwargs.setdefault("height", height)
        detokenize_kwargs.setdefault("width", width)
        if detokenize_kwargs.get("latents") is None and n_k > 1:
            noise = self.prepare_latents(b * num_images_per_prompt, height, width, torch.float32,
                                         self._execution_device, generator)
            noise = noise.view(b, num_images_per_prompt, *noise.shape[1:])
            detokenize_kwargs["latents"] = noise[:, None].expand(b, n_k, *noise.shape[1:]).flatten(0, 2)
        return [ids[i, :k] for i in range(b) for k in ks]  # image-major
