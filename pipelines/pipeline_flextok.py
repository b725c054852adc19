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

from ..flextok_core import LICENSE_NOTICE, FlexTokModel, load_official, vae_decode, vae_encode
from ..flextok_core.ar import check_ar_sampling
from ..flextok_core.checks import check_int
from ..flextok_core.fileio import read_json_object, replace_dir
from ..flextok_core.precision import quiet_fp32_cast_warning
from ..flextok_core.guidance import (MomentumBuffer, apg_velocity, cfg_velocity, check_guidance_scale,
                                     decoder_guidance_scales)
from ..flextok_core.official import non_floating_weights
from ..flextok_core.rng import randn
from ..flextok_core.sampling import check_decoder_sampling
from ..images import to_rgb8
from .scheduling_flextok import FlexTokFlowScheduler, flextok_sigmas

logger = logging.getLogger(__name__)
_license_shown = False

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Decoder tokens per forward on the CPU when decode_batch_size is not given (d12-d12 at 256x256, 2 threads: per
# image, a batch of 4 guided images (4 x 1026 tokens) decodes 1.3x faster than one image in bf16, a batch of 8 1.2x
# slower than 4 in both dtypes -- the [tokens, 4 x dim] MLP activations outgrow the caches).
CPU_DECODER_TOKENS = 4096
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
    scales: list            # guidance scale per step (a callback may change the remaining ones)
    guided: bool            # any step guided (scale != 1): the register sequences hold the unconditional pass
    modulations: list       # the decoder's adaLN modulation of every step (row i = step i)
    sigmas: torch.Tensor    # t of every step, on the execution device
    model_dtype: torch.dtype
    device: torch.device
    use_apg: bool
    apg_norm_threshold: float
    apg_eta: float
    ids: torch.Tensor       # the token ids and host lengths, to add the unconditional pass when a callback turns
    keep_k: list            # guidance on in an unguided run
    fast: bool


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


# model_index.json entries that are pipeline settings, not components (FlexTokPipeline.__init__ keywords)
_PIPELINE_SETTINGS = ("decoder_sampling",)
# The decoder's sampling defaults of a checkpoint without ``decoder_sampling`` (the release's: 25 Euler steps, guided)
TEACHER_SAMPLING = {"num_inference_steps": 25, "guidance_scale": 7.5}

_CONFIG_FILES = {"flextok": "config.json", "vae": "config.json", "ar_model": "config.json",
                 "scheduler": "scheduler_config.json"}


def _check_folder_configs(folder: Path) -> dict:
    """model_index.json and the component configs of our format are JSON objects (the file named if not)."""
    index = read_json_object(folder / "model_index.json")
    for name, entry in index.items():
        if name.startswith("_") or name in _PIPELINE_SETTINGS:
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


def _check_sampling_entry(entry) -> dict:
    """``decoder_sampling`` (``model_index.json``): a dict whose ``num_inference_steps`` / ``guidance_scale`` (both
    optional) are valid decoder settings; other keys (``distilled_from``, ...) are provenance, kept as they are."""
    if not isinstance(entry, dict):
        raise ValueError(f"decoder_sampling must be a dict such as {{'num_inference_steps': 4, 'guidance_scale': 1.0}}, "
                         f"got {type(entry).__name__}")
    if "num_inference_steps" in entry:
        check_int("decoder_sampling.num_inference_steps", entry["num_inference_steps"], minimum=1)
    if "guidance_scale" in entry:
        check_guidance_scale("decoder_sampling.guidance_scale", entry["guidance_scale"])
    return dict(entry)


class FlexTokPipeline(DiffusionPipeline):
    """Tokenize images into 1-D coarse-to-fine token sequences and decode any prefix back into an image.

    Components: ``vae`` (AutoencoderKL), ``flextok`` (:class:`FlexTokModel`), ``scheduler``
    (:class:`FlexTokFlowScheduler`, a FlowMatchEulerDiscreteScheduler on t = 1, (T-1)/T, ..., 1/T with the
    release's exact Euler step; any flow-matching diffusers scheduler that accepts ``sigmas`` works), and the optional ``ar_model``,
    ``text_encoder`` and ``tokenizer`` for generation.

    ``vae`` may be None (as in Stable Diffusion / Flux pipelines): ``tokenize`` then takes VAE latents
    ``[B, C, h, w]`` (the scaled latents that ``output_type="latent"`` returns) and ``detokenize`` returns
    ``output_type="latent"`` only; the latent grid is taken to be /8 of the image.
    """

    model_cpu_offload_seq = "text_encoder->ar_model->flextok->vae"
    _optional_components = ["vae", "ar_model", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "velocity", "velocity_cond", "velocity_uncond"]

    def __init__(self, vae: AutoencoderKL | None, flextok: FlexTokModel, scheduler: FlowMatchEulerDiscreteScheduler,
                 ar_model=None, text_encoder=None, tokenizer=None, decoder_sampling: dict | None = None):
        super().__init__()
        self.register_modules(vae=vae, flextok=flextok, scheduler=scheduler, ar_model=ar_model,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        if decoder_sampling is not None:  # a distilled decoder's sampler (model_index.json); teachers keep none
            self.register_to_config(decoder_sampling=_check_sampling_entry(decoder_sampling))
        vae = getattr(self, "vae", None)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
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
                      torch_dtype: torch.dtype | None = None, dtype: torch.dtype | None = None) -> "FlexTokPipeline":
        """Load the official release format (``config.json`` + ``model.safetensors``; folder or hub id). ``dtype``
        (diffusers' new name of ``torch_dtype``; either works) gives the model ``from_pretrained(..., dtype=)``
        gives: ``.to(dtype)`` of every component, the float32 modules kept."""
        if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
            raise ValueError(f"from_official got torch_dtype={torch_dtype} and dtype={dtype}; pass one")
        torch_dtype = dtype or torch_dtype
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

    def _require_vae(self, what: str):
        if self.vae is None:
            raise ValueError(f"this pipeline has no VAE (vae=None): {what} needs one; without a VAE, tokenize VAE "
                             f"latents [B, {self.flextok.config.latent_channels}, h, w] and decode with "
                             f"output_type='latent'")
        return self.vae

    def enable_vae_slicing(self):
        """Decode the VAE one image at a time (lower peak memory)."""
        self._require_vae("enable_vae_slicing").enable_slicing()

    def disable_vae_slicing(self):
        self._require_vae("disable_vae_slicing").disable_slicing()

    def enable_vae_tiling(self):
        """Decode/encode the VAE in overlapping tiles (large images with bounded memory)."""
        self._require_vae("enable_vae_tiling").enable_tiling()

    def disable_vae_tiling(self):
        self._require_vae("disable_vae_tiling").disable_tiling()

    # -- precision ----------------------------------------------------------------------------------
    def to(self, *args, **kwargs):
        """diffusers' ``to``. FlexTokModel keeps its float32 modules through any cast (``_keep_in_fp32_modules``),
        so ``from_pretrained(..., torch_dtype=d)`` and ``.to(d)`` give the same model; diffusers' warning that a
        cast "can lead to inconsistent results" is therefore silenced here."""
        with quiet_fp32_cast_warning():
            return super().to(*args, **kwargs)

    def set_precision(self, dtype: torch.dtype) -> "FlexTokPipeline":
        """The inference dtype of the CLI's ``--dtype`` and the ComfyUI Load node: ``self.to(dtype)``, except that
        under float16 the VAE stays in float32 when its config says ``force_upcast`` (diffusers' flag for VAEs
        whose decoder overflows float16, the default). bfloat16 has float32's range: everything runs in it."""
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
        self.to(dtype=dtype)
        if dtype == torch.float16 and self.vae is not None and getattr(self.vae.config, "force_upcast", True):
            with quiet_fp32_cast_warning():
                self.vae.to(dtype=torch.float32)
        return self

    # -- diffusers' run state (read by callbacks) -----------------------------------------------------
    @property
    def guidance_scale(self) -> float | None:
        """The decoder's guidance scale at the current step (None before a run). A ``callback_on_step_end`` may set
        ``pipe._guidance_scale``: the new scale holds for the remaining steps (1 turns guidance off)."""
        return getattr(self, "_guidance_scale", None)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the current step runs the unconditional pass (scale != 1)."""
        return self.guidance_scale is not None and self.guidance_scale != 1.0

    @property
    def num_timesteps(self) -> int | None:
        """The number of sampling steps of the current (or last) run."""
        return getattr(self, "_num_timesteps", None)

    @property
    def fingerprint(self) -> str:
        """Identity of this token space: the tokenizer and VAE configs plus a strided sample of every weight
        (rounded to bfloat16). The same weights give the same id in either format, any dtype or device; another
        release or a fine-tune gives another. Token files and ComfyUI tokens carry it, so decoding can refuse
        tokens made by another model."""
        h = hashlib.sha256()
        for part in ("flextok", "vae"):
            module = getattr(self, part)
            if module is None:  # a pipeline without a VAE: the tokenizer alone
                continue
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

    def _tokens_to_batch(self, tokens) -> tuple[torch.Tensor, list[int]]:
        """LongTensor [B,k] or a list of 1-D / [1,k] tensors (ragged) -> (ids [B,k_max] right-padded on the execution
        device, lengths: host ints, which size the decoder's sequences without a device read). The ids are checked
        on the host: one read per sequence."""
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
        rows = []
        for i, s in enumerate(seqs):
            if s.is_floating_point() or s.dtype == torch.bool:
                raise ValueError(f"token ids must be integers, sequence {i} has dtype {s.dtype}")
            if not 1 <= len(s) <= n:
                raise ValueError(f"sequence {i} has {len(s)} tokens; this model decodes 1..{n} tokens")
            row = s.tolist()
            j = next((j for j, v in enumerate(row) if not 0 <= v < vocab), None)
            if j is not None:
                raise ValueError(f"token id {row[j]} at position {j} of sequence {i} is outside [0, {vocab})")
            rows.append(row)
        lengths = [len(row) for row in rows]
        ids = torch.tensor([row + [0] * (max(lengths) - len(row)) for row in rows], dtype=torch.long)
        return ids.to(self._execution_device), lengths

    # -- tokenize -----------------------------------------------------------------------------------
    @torch.no_grad()
    def tokenize(self, images, num_tokens: int | str | None = None, generator: torch.Generator | None = None,
                 sample_posterior: bool | None = None, **auto_kwargs) -> torch.LongTensor | list:
        """Images ([B,3,H,W] in [-1,1], or PIL images) -> token ids ``[B, num_tokens]`` (default: all N).
        A tensor ``[B,C,h,w]`` with the VAE's latent channel count is taken as scaled VAE latents (the VAE is
        skipped; a pipeline built with ``vae=None`` tokenizes only these). ``generator`` (CPU or the execution
        device, or one per image) seeds the posterior sample.

        The first k tokens do not depend on later ones, so ``num_tokens=k`` runs only k registers and returns
        exactly the first k ids of the full sequence. ``sample_posterior`` defaults to the checkpoint's setting.
        ``num_tokens="auto"`` with ``target=`` (and ``metric=``, ``candidates=``, decoder options: those of
        :meth:`choose_num_tokens`) returns each image's shortest prefix that reaches the target, as a list of 1-D
        tensors (ragged).
        """
        if (isinstance(num_tokens, str) and num_tokens == "auto") or auto_kwargs:
            if not isinstance(num_tokens, str):
                raise TypeError(f"tokenize() got unexpected keyword argument(s) {sorted(auto_kwargs)}; they are "
                                f"options of num_tokens='auto'")
            from .token_budget import auto_tokenize

            return auto_tokenize(self, images, num_tokens, generator, sample_posterior, **auto_kwargs)
        n = self.num_registers
        k = n if num_tokens is None else check_int("num_tokens", num_tokens, 1, n)
        latents = self._tokenizer_latents(images, generator, sample_posterior)
        _, ids = self.flextok.encode(latents.to(self.flextok.dtype), num_tokens=k)
        self.maybe_free_model_hooks()
        return ids

    def _is_latents(self, images) -> bool:
        c = self.flextok.config.latent_channels
        return isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == c != 3

    def _tokenizer_latents(self, images, generator, sample_posterior) -> torch.Tensor:
        """Images -> the VAE's scaled latents on the execution device. A tensor ``[B, C, h, w]`` with the latent
        channel count is taken as those latents already (diffusers' img2img convention); that is how a pipeline
        without a VAE tokenizes."""
        if self._is_latents(images):
            if not images.is_floating_point() or not torch.isfinite(images).all():
                raise ValueError(f"latents must be finite floating point, got dtype {images.dtype}")
            self._check_image_size(images.shape[2] * self.vae_scale_factor, images.shape[3] * self.vae_scale_factor)
            return images.to(self._execution_device)
        vae = self._require_vae("tokenizing images")
        images = self._images_to_tensor(images).to(self._execution_device)
        sample = self.flextok.config.sample_posterior if sample_posterior is None else sample_posterior
        return vae_encode(vae, images, sample, generator)

    @torch.no_grad()
    def choose_num_tokens(self, images, target: float, metric="psnr", candidates=None, **decode_kwargs) -> list[int]:
        """Per image, the smallest candidate k whose reconstruction from the first k tokens reaches ``target`` on
        ``metric`` against the input image; the largest candidate when none does.

        metric: ``"psnr"``, ``"ssim"`` (higher is better), ``"lpips"`` (ST-LPIPS, lower is better) or a callable
            ``(reconstructions, references) -> scores`` (``[B,3,H,W]`` in [-1,1] -> ``[B]``) with
            ``higher_is_better=``. candidates: token counts (default: the powers of two up to N, and N).
        decode_kwargs: options of :meth:`detokenize` (``num_inference_steps``, ``guidance_scale``, ``use_apg``,
            ``decode_batch_size``, ``latents`` ``[B,C,h,w]``: every candidate of image i starts from ``latents[i]``,
            so decoding ``ids[i, :k_i]`` with it again gives the scored image), ``generator`` (the posterior sample,
            then one noise draw per image), ``sample_posterior``, and ``search`` (``"ascending"``, the rule itself,
            or ``"bisect"``). The tokenizer runs once; see :mod:`.token_budget` for the decoder passes per image.
        """
        from .token_budget import choose_tokens

        return choose_tokens(self, images, target, metric, candidates, **decode_kwargs).num_tokens

    # -- detokenize ---------------------------------------------------------------------------------
    @property
    def decoder_sampling(self) -> dict:
        """The decoder's default sampling settings: ``num_inference_steps`` and ``guidance_scale`` from the
        checkpoint's ``decoder_sampling`` entry (a distilled decoder: e.g. 4 steps, guidance 1), else the teacher's
        (25 steps, guidance 7.5); other keys of the entry (``distilled_from``) are kept."""
        entry = dict(getattr(self.config, "decoder_sampling", None) or {})
        return {**TEACHER_SAMPLING, **entry}

    def resolve_decoder_sampling(self, num_inference_steps=None, guidance_scale=None) -> tuple:
        """``None`` -> this checkpoint's default (:attr:`decoder_sampling`); given values are kept (checked later)."""
        defaults = self.decoder_sampling
        return (defaults["num_inference_steps"] if num_inference_steps is None else num_inference_steps,
                defaults["guidance_scale"] if guidance_scale is None else guidance_scale)

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
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in gens])

    def _default_decode_batch(self, batch: int, guided: bool, device) -> int:
        """Images per decoder forward when ``decode_batch_size`` is not given: the whole batch on accelerators; on
        the CPU as many as fit :data:`CPU_DECODER_TOKENS` tokens (at the largest image size, all N registers), so
        the activations stay cache-sized and the cost per image does not grow with the batch."""
        if torch.device(device).type != "cpu":
            return batch
        gh, gw = self.flextok.config.grid_size
        per_image = (gh * gw + self.num_registers) * (2 if guided else 1)
        return max(1, min(batch, CPU_DECODER_TOKENS // per_image))

    def _prepare_decoding(self, ids, keep_k, num_inference_steps, guidance_scale, guidance_schedule, use_apg,
                          apg_momentum, apg_norm_threshold, apg_eta, fast_decoding, decode_batch_size,
                          device) -> _DecodeRun:
        """Set the scheduler's grid and build what the sampling steps reuse: the guidance scale of every step, the
        register sequences and APG buffers of every chunk of at most ``decode_batch_size`` images, and the
        decoder's timestep modulation of every step."""
        b = ids.shape[0]
        self.scheduler.set_timesteps(sigmas=flextok_sigmas(num_inference_steps), device=device)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)  # the step index needs no lookup of the timestep (a device read)
        sigmas = self.scheduler.sigmas  # host values for FlexTokFlowScheduler (t of each step, then 0)
        scales = decoder_guidance_scales(guidance_scale, guidance_schedule, sigmas.tolist()[:-1])
        guided = any(s != 1.0 for s in scales)
        chunk = decode_batch_size or self._default_decode_batch(b, guided, device)
        chunks = [slice(i, min(i + chunk, b)) for i in range(0, b, chunk)]
        # Register sequences do not change over the steps: build them once per chunk (host lengths keep_k).
        registers = [self.flextok.prepare_registers(ids[c], keep_k[c], guidance=guided, fast=fast_decoding)
                     for c in chunks]
        momentum = [MomentumBuffer(apg_momentum) for _ in chunks]
        # timestep conditioning of every step at once (it depends on t alone); timestep_modulation fires the
        # offload hook, so the weights are on the execution device
        sigmas = sigmas[:-1].to(device)
        modulations = self.flextok.timestep_modulation(sigmas)
        return _DecodeRun(chunks, registers, momentum, list(scales), guided, modulations, sigmas, self.flextok.dtype,
                          device, use_apg, apg_norm_threshold, apg_eta, ids, keep_k, fast_decoding)

    def _guidance_changed(self, run: _DecodeRun, i: int):
        """After step ``i``'s callback: a new ``pipe._guidance_scale`` holds for the remaining steps; turning
        guidance on in an unguided run adds the unconditional pass to the register sequences."""
        if self._guidance_scale == run.scales[i]:
            return
        scale = check_guidance_scale("guidance_scale (set by callback_on_step_end)", self._guidance_scale)
        run.scales[i + 1:] = [scale] * (len(run.scales) - i - 1)
        if scale != 1.0 and not run.guided:
            run.registers = [self.flextok.prepare_registers(run.ids[c], run.keep_k[c], guidance=True, fast=run.fast)
                             for c in run.chunks]
            run.guided = True

    def _step_velocity(self, run: _DecodeRun, i: int, x: torch.Tensor):
        """One sampling step's velocity at step ``i`` for latents ``x`` ``[B,C,h,w]``: the decoder on every chunk
        (the conditional pass and, when step ``i`` is guided, the unconditional one), combined by APG or CFG.
        Returns (velocity, v_cond, v_uncond); ``v_uncond`` is None for an unguided run and NaN at a step that
        skips the unconditional pass."""
        scale = run.scales[i]
        t = run.sigmas[i]
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
        vae = self._require_vae(f"output_type={output_type!r}")
        image = torch.cat([vae_decode(vae, x[c]).float() for c in chunks])  # (by image on the CPU: vae_chunks)
        return self.image_processor.postprocess(image, output_type=output_type)

    @torch.no_grad()
    def detokenize(
        self,
        tokens,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
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
        num_inference_steps, guidance_scale: ``None`` = the checkpoint's defaults (:attr:`decoder_sampling`: a
            distilled decoder's few steps without guidance, else 25 steps at guidance 7.5).
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
        if output_type != "latent":
            self._require_vae(f"output_type={output_type!r}")
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback tensor inputs {bad} not in {self._callback_tensor_inputs}")
        num_inference_steps, guidance_scale = self.resolve_decoder_sampling(num_inference_steps, guidance_scale)
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
        keep_k = [k for k in keep_k for _ in range(num_images_per_prompt)]
        x = self.prepare_latents(ids.shape[0], height, width, torch.float32, device, generator, latents)
        run = self._prepare_decoding(ids, keep_k, num_inference_steps, guidance_scale, guidance_schedule, use_apg,
                                     apg_momentum, apg_norm_threshold, apg_eta, fast_decoding, decode_batch_size,
                                     device)

        x = self._denoise(run, x, callback_on_step_end, callback_on_step_end_tensor_inputs)
        image = self._latents_to_images(x, run.chunks, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)

    def _denoise(self, run: _DecodeRun, x: torch.Tensor, callback_on_step_end, tensor_inputs) -> torch.Tensor:
        """The sampling loop: Euler steps from the initial noise ``x`` to the final latents. ``guidance_scale``,
        ``do_classifier_free_guidance`` and ``num_timesteps`` describe the current step to the callback."""
        self._num_timesteps = len(self.scheduler.timesteps)
        with self.progress_bar(total=self._num_timesteps) as progress:
            for i, step_t in enumerate(self.scheduler.timesteps):
                self._guidance_scale = run.scales[i]
                velocity, v_cond, v_uncond = self._step_velocity(run, i, x)
                x = self.scheduler.step(velocity, step_t, x, return_dict=False)[0]
                if callback_on_step_end is not None:
                    local = dict(latents=x, velocity=velocity, velocity_cond=v_cond, velocity_uncond=v_uncond)
                    out = callback_on_step_end(self, i, step_t, {k: local[k] for k in tensor_inputs})
                    x = (out or {}).get("latents", x)
                    self._guidance_changed(run, i)
                progress.update()
        return x

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
                 top_p: float = 1.0, num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 latents: torch.Tensor | None = None, callback_on_step_end: Callable | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), **detokenize_kwargs):
        """Reconstruct ``image`` through its first ``num_tokens`` tokens, or generate from ``class_labels`` /
        ``prompt`` with the AR model (``num_tokens`` tokens, then decode). ``output_type="tokens"`` returns only
        the ids. ``num_inference_steps``, ``guidance_scale`` (the decoder's), ``latents`` (the initial noise) and
        the callback arguments are :meth:`detokenize`'s, as are the other decoder options (``use_apg``, ...) in
        ``detokenize_kwargs``. ``image`` may be VAE latents ``[B, C, h, w]`` (see :meth:`tokenize`).

        Reconstruction with a list ``num_tokens=[k1, k2, ...]`` tokenizes each image once and decodes every k
        in one batched run; outputs are image-major (image 0 at k1, k2, ..., then image 1 ...), and each image's
        series shares one initial noise, so the differences come from the tokens alone.
        """
        if sum(x is not None for x in (image, class_labels, prompt)) != 1:
            raise ValueError("pass exactly one of image= (reconstruct), class_labels= or prompt= (generate)")
        if output_type not in OUTPUT_TYPES + ("tokens",):
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES + ('tokens',)}, got {output_type!r}")
        if output_type not in ("tokens", "latent"):
            self._require_vae(f"output_type={output_type!r}")
        detokenize_kwargs.update(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 latents=latents, callback_on_step_end=callback_on_step_end,
                                 callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs)
        self.check_decoder_options(detokenize_kwargs)  # before any tokenizing or sampling
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

    def check_decoder_options(self, options: dict, taken=("tokens", "generator", "num_images_per_prompt",
                                                          "output_type", "return_dict"), also: str = "") -> None:
        """Options a caller passes on to :meth:`detokenize`, checked before any work: unknown names (a TypeError
        listing the known ones, except the ``taken`` ones the caller sets itself; ``also`` names what else it
        accepts) and the sampling settings (a ValueError naming the setting)."""
        params = inspect.signature(self.detokenize).parameters
        allowed = sorted(set(params) - set(taken))
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {unknown}; {also}decoder options are those of "
                            f"detokenize(): {allowed}")
        value = lambda name: options.get(name, params[name].default)  # noqa: E731
        steps, scale = self.resolve_decoder_sampling(value("num_inference_steps"), value("guidance_scale"))
        check_decoder_sampling(steps, scale, value("apg_momentum"), value("apg_norm_threshold"), value("apg_eta"))

    def _reconstruction_sequences(self, image, num_tokens, generator, sample_posterior, num_images_per_prompt,
                                  detokenize_kwargs) -> list:
        n = self.num_registers
        if isinstance(num_tokens, (list, tuple)):
            if not num_tokens:
                raise ValueError("num_tokens is an empty list: pass at least one token count")
            ks = [check_int(f"num_tokens[{i}]", k, 1, n) for i, k in enumerate(num_tokens)]
        else:
            ks = [n if num_tokens is None else check_int("num_tokens", num_tokens, 1, n)]
        if self._is_latents(image):
            images, scale = image, self.vae_scale_factor
        else:
            images, scale = self._images_to_tensor(image), 1
        ids = self.tokenize(images, num_tokens=max(ks), generator=generator, sample_posterior=sample_posterior)
        b, n_k = ids.shape[0], len(ks)
        height, width = (s * scale for s in images.shape[2:])
        detokenize_kwargs.setdefault("height", height)
        detokenize_kwargs.setdefault("width", width)
        if detokenize_kwargs.get("latents") is None and n_k > 1:
            noise = self.prepare_latents(b * num_images_per_prompt, height, width, torch.float32,
                                         self._execution_device, generator)
            noise = noise.view(b, num_images_per_prompt, *noise.shape[1:])
            detokenize_kwargs["latents"] = noise[:, None].expand(b, n_k, *noise.shape[1:]).flatten(0, 2)
        return [ids[i, :k] for i in range(b) for k in ks]  # image-major
