"""ComfyUI-independent helpers behind the FlexTok nodes.

Nothing here imports ComfyUI, so it can be tested (and reused) outside a ComfyUI process:
model folders, model identity, the token container (its file format: token_files.py), image fitting, k lists,
labels.
"""
from __future__ import annotations

import dataclasses
import os
import re

import numpy as np
import torch

from .. import token_files
from ..images import FIT_ALIASES, FITS, fit_mode, fit_tensor
from ..token_files import TokenFile

FIT_MODES = FITS  # the Encode node's `fit` options: the one vocabulary of images.py
FIT_VALUES = FITS + tuple(FIT_ALIASES)  # what the node accepts: saved workflows may hold the old names


# ----------------------------------------------------------------------------------------------- model folders
def model_folder_kind(folder: str) -> str | None:
    """'diffusers' (model_index.json), 'official' (config.json + model.safetensors) or None."""
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        return "diffusers"
    if all(os.path.isfile(os.path.join(folder, f)) for f in ("config.json", "model.safetensors")):
        return "official"
    return None


def find_model_folders(roots, max_depth: int = 4) -> list[str]:
    """Folders under ``roots`` that hold a FlexTok checkpoint, as '/'-separated paths relative to their root.

    A model folder is not searched further (so a diffusers folder's ``vae/`` or ``flextok/`` never shows up).
    """
    found = set()
    for root in roots:
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            continue
        for current, dirs, _files in os.walk(root, followlinks=True):
            rel = os.path.relpath(current, root)
            depth = 0 if rel == "." else rel.count(os.sep) + 1
            if rel != "." and model_folder_kind(current):
                found.add(rel.replace(os.sep, "/"))
                dirs[:] = []
                continue
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < max_depth else []
    return sorted(found)


def resolve_model_folder(roots, name: str) -> tuple[str, str]:
    """Dropdown value -> (absolute folder, kind). Raises FileNotFoundError naming what is available."""
    parts = name.replace("\\", "/").split("/")
    if not name or any(p in ("", ".", "..") for p in parts):
        raise FileNotFoundError(f"invalid FlexTok model name {name!r}")
    for root in roots:
        folder = os.path.join(root, *parts)
        kind = model_folder_kind(folder) if os.path.isdir(folder) else None
        if kind:
            return folder, kind
    available = find_model_folders(roots)
    raise FileNotFoundError(
        f"FlexTok model {name!r} not found in {list(roots)}; available: {available or 'none'}. A model is a folder "
        "with model_index.json (diffusers format) or config.json + model.safetensors (official release format)")


# ----------------------------------------------------------------------------------------------- identity
def model_identity(pipe) -> str:
    """A stable id for 'which token space' (see ``FlexTokPipeline.fingerprint``)."""
    return pipe.fingerprint


# ----------------------------------------------------------------------------------------------- tokens
class FlexTokTokens(TokenFile):
    """What flows through a FLEXTOK_TOKENS socket: a token file in memory (:class:`token_files.TokenFile`: ids
    ``[B, k]`` on the CPU, per-row lengths for ragged rows, the producing model's fingerprint and name, sources)
    whose rows share one image size, since a ComfyUI IMAGE batch has one size.

    ``model_id`` is the fingerprint (:func:`model_identity`); ``image_size`` (height, width) is what Decode renders
    at (None: the model's default size, for files that did not record it); ``num_tokens`` is k (the longest row).
    """

    @classmethod
    def of(cls, ids, model_id: str, model_name: str, image_size, num_registers: int | None, vocab_size: int | None,
           extra: dict | None = None, lengths=None, sources=None) -> "FlexTokTokens":
        ids = torch.as_tensor(ids)
        rows = 1 if ids.dim() == 1 else int(ids.shape[0])
        return cls(ids, model_id, model_name, lengths, sources, [image_size] * rows, num_registers, vocab_size,
                   dict(extra or {}))

    @property
    def model_id(self) -> str:
        return self.model_fingerprint

    @property
    def image_size(self) -> tuple[int, int] | None:
        return self.image_sizes[0]

    @property
    def num_tokens(self) -> int:
        """The longest row's k (every row's k unless ragged)."""
        return self.max_tokens

    def decode_input(self):
        """What ``pipe.detokenize`` takes: the [B,k] tensor, or a list of 1-D tensors when rows are ragged."""
        return self.rows() if self.is_ragged else self.ids

    def truncate(self, k: int) -> "FlexTokTokens":
        """The first k tokens of every row; ragged rows shorter than k keep all theirs (k must not exceed the
        longest row: then truncating would do nothing, which is a mistake worth reporting)."""
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > self.num_tokens:
            n = f"N={self.num_registers}" if self.num_registers else "N"
            raise ValueError(
                f"k={k} is more than the {self.num_tokens} tokens in the input (model '{self.model_name}' makes "
                f"{n} tokens per image); use k in 1..{self.num_tokens}")
        return dataclasses.replace(self, ids=self.ids[:, :k], lengths=self.lengths.clamp(max=k))

    def check_model(self, model_id: str, model_name: str) -> None:
        if self.model_id != model_id:
            raise ValueError(
                f"these tokens come from another FlexTok model: they were made by '{self.model_name}' "
                f"(id {self.model_id[:12]}), but this node got '{model_name}' (id {model_id[:12]}). "
                "Token ids only mean something to the model that made them; decode them with that model")

    @classmethod
    def from_token_file(cls, tf: TokenFile) -> "FlexTokTokens":
        sizes = set(tf.image_sizes)
        if len(sizes) > 1:  # one IMAGE batch has one size
            shown = ", ".join("default" if s is None else f"{s[0]}x{s[1]}" for s in sorted(sizes, key=str))
            raise ValueError(f"the tokens describe images of several sizes ({shown}); a ComfyUI image batch has one "
                             "size: tokenize with `flextok tokenize --fit center-crop --size S`")
        fields = {f.name: getattr(tf, f.name) for f in dataclasses.fields(TokenFile)}
        return cls(**dict(fields, model_name=tf.model_name or "?"))

    def __repr__(self):
        k = f"k={self.num_tokens}" if not self.is_ragged else f"k={self.min_tokens}..{self.num_tokens}"
        size = "default size" if self.image_size is None else f"image={self.image_size[0]}x{self.image_size[1]}"
        return f"FlexTokTokens(batch={self.batch_size}, {k}, model='{self.model_name}' {self.model_id[:12]}, {size})"


def save_tokens(tokens: FlexTokTokens, path: str) -> None:
    """Write tokens as a FlexTok token file (see token_files.py), atomically."""
    tokens.save(path)


def read_safetensors_metadata(path: str) -> dict | None:
    """The ``__metadata__`` of a safetensors file (header only), or None if it is not one."""
    try:
        return token_files.read_header(path).get("__metadata__") or {}
    except (OSError, ValueError, TypeError, KeyError, IndexError):
        return None


is_tokens_file = token_files.is_token_file


def load_tokens(path: str) -> FlexTokTokens:
    """A token file of any version (the CLI's too) as FLEXTOK_TOKENS. ValueError naming the file and the problem."""
    tf = token_files.load(path)
    try:
        return FlexTokTokens.from_token_file(tf)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def list_token_files(folder: str, max_files: int = 2000) -> list[str]:
    """FlexTok token files under ``folder``, '/'-separated and relative to it."""
    out = []
    if not os.path.isdir(folder):
        return out
    for current, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(current, name)
            if name.endswith(".safetensors") and not name.startswith(".") and is_tokens_file(path):
                out.append(os.path.relpath(os.path.join(current, name), folder).replace(os.sep, "/"))
                if len(out) >= max_files:
                    return out
    return out


# ----------------------------------------------------------------------------------------------- inputs
def parse_k_list(text: str, n: int, available: int | None = None) -> list[int]:
    """'1,4,16, 64' -> [1, 4, 16, 64], checked against N (the model's tokens) and the tokens at hand."""
    available = n if available is None else available
    parts = [p for p in re.split(r"[,\s;]+", str(text).strip()) if p]
    if not parts:
        raise ValueError(f"k_values is empty; give token counts like '1,4,16' (each in 1..{available})")
    ks = []
    for p in parts:
        try:
            k = int(p)
        except ValueError:
            raise ValueError(f"k_values: {p!r} is not an integer; give token counts like '1,4,16'") from None
        if k < 1:
            raise ValueError(f"k_values: k={k} is too small; every k must be in 1..{available}")
        if k > n:
            raise ValueError(f"k_values: k={k} is more than this model's N={n} tokens; "
                             f"every k must be in 1..{available}")
        if k > available:
            raise ValueError(f"k_values: k={k} is more than the {available} tokens in the input; "
                             f"every k must be in 1..{available}")
        if k not in ks:
            ks.append(k)
    return ks


def fit_images(images: torch.Tensor, target: tuple[int, int], mode: str, check=None) -> torch.Tensor:
    """ComfyUI IMAGE [B,H,W,C] in [0,1] -> [B,3,h,w] in [0,1] at a size the model accepts.

    ``mode`` as :func:`..images.fit_tensor` (center-crop | resize | none; the old names center_crop / stretch are
    accepted); with none the size is kept and ``check(h, w)`` raises if the model cannot take it.
    """
    mode = fit_mode(mode)
    if images.dim() == 3:
        images = images[None]
    if images.dim() != 4:
        raise ValueError(f"IMAGE must have shape [B,H,W,C], got {tuple(images.shape)}")
    c = images.shape[-1]
    if c == 1:
        images = images.expand(*images.shape[:3], 3)
    elif c == 4:
        images = images[..., :3]
    elif c != 3:
        raise ValueError(f"IMAGE must have 1, 3 or 4 channels, got {c}")
    x = images.movedim(-1, 1).float().clamp(0, 1)
    if mode == "none" and check is not None:
        try:
            check(*x.shape[-2:])
        except ValueError as e:
            raise ValueError(f"{e} (set fit to 'center-crop' or 'resize' to resize automatically)") from None
    return fit_tensor(x, tuple(target), mode)


def draw_label(image: torch.Tensor, text: str) -> torch.Tensor:
    """Write ``text`` in a small box at the top-left of one IMAGE frame [H,W,3] in [0,1]."""
    import PIL.Image
    import PIL.ImageDraw
    import PIL.ImageFont

    arr = (image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    im = PIL.Image.fromarray(arr)
    size = max(10, min(im.size) // 10)
    try:
        font = PIL.ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        font = PIL.ImageFont.load_default()
    draw = PIL.ImageDraw.Draw(im)
    box = draw.textbbox((0, 0), text, font=font)
    pad = max(1, size // 5)
    draw.rectangle((0, 0, box[2] - box[0] + 2 * pad, box[3] - box[1] + 2 * pad), fill=(0, 0, 0))
    draw.text((pad - box[0], pad - box[1]), text, fill=(255, 255, 255), font=font)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).to(image.device)
