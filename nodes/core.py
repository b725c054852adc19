"""ComfyUI-independent helpers behind the FlexTok nodes.

Nothing here imports ComfyUI, so it can be tested (and reused) outside a ComfyUI process:
model folders, model identity, the token container and its file format, image fitting, k lists, labels.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

TOKENS_FORMAT = "flextok_tokens"
TOKENS_FORMAT_VERSION = "1"
FIT_MODES = ("center_crop", "stretch", "none")
_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it) ...
os.umask(_UMASK)  # ... and put back at once


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
@dataclass
class FlexTokTokens:
    """What flows through a FLEXTOK_TOKENS socket: ids plus where they came from.

    ids: LongTensor [B, k] on the CPU (the first k of the model's N coarse-to-fine tokens, per image).
    model_id: :func:`model_identity` of the producing model; model_name: its dropdown name (for messages).
    image_size: (height, width) of the images the tokens describe (Decode renders at this size).
    """

    ids: torch.Tensor
    model_id: str
    model_name: str
    image_size: tuple[int, int]
    num_registers: int
    vocab_size: int
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        ids = torch.as_tensor(self.ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] < 1:
            raise ValueError(f"token ids must have shape [B,k] with k >= 1, got {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        self.ids = ids.detach().to("cpu", torch.long).contiguous()
        self.image_size = (int(self.image_size[0]), int(self.image_size[1]))

    @property
    def batch_size(self) -> int:
        return int(self.ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    def with_ids(self, ids: torch.Tensor) -> "FlexTokTokens":
        return FlexTokTokens(ids, self.model_id, self.model_name, self.image_size, self.num_registers,
                             self.vocab_size, dict(self.extra))

    def truncate(self, k: int) -> "FlexTokTokens":
        k = int(k)
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        if k > self.num_tokens:
            raise ValueError(
                f"k={k} is more than the {self.num_tokens} tokens in the input (model '{self.model_name}' makes "
                f"N={self.num_registers} tokens per image); use k in 1..{self.num_tokens}")
        return self.with_ids(self.ids[:, :k])

    def check_model(self, model_id: str, model_name: str) -> None:
        if self.model_id != model_id:
            raise ValueError(
                f"these tokens come from another FlexTok model: they were made by '{self.model_name}' "
                f"(id {self.model_id[:12]}), but this node got '{model_name}' (id {model_id[:12]}). "
                "Token ids only mean something to the model that made them; decode them with that model")

    def metadata(self) -> dict[str, str]:
        return {
            "format": TOKENS_FORMAT, "format_version": TOKENS_FORMAT_VERSION, "model_id": self.model_id,
            "model_name": self.model_name, "image_height": str(self.image_size[0]),
            "image_width": str(self.image_size[1]), "num_registers": str(self.num_registers),
            "vocab_size": str(self.vocab_size), "extra": json.dumps(self.extra, sort_keys=True),
        }

    def __repr__(self):
        return (f"FlexTokTokens(batch={self.batch_size}, k={self.num_tokens}, model='{self.model_name}' "
                f"{self.model_id[:12]}, image={self.image_size[0]}x{self.image_size[1]})")


def save_tokens(tokens: FlexTokTokens, path: str) -> None:
    """Write tokens as safetensors (tensor ``ids`` int64 [B,k], provenance in the metadata), atomically."""
    from safetensors.torch import save_file

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"ids": tokens.ids}, tmp, metadata=tokens.metadata())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_safetensors_metadata(path: str) -> dict | None:
    """The ``__metadata__`` of a safetensors file (header only), or None if it is not one."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                return None
            n = int.from_bytes(head, "little")
            if not 2 <= n <= 10_000_000:
                return None
            header = json.loads(f.read(n))
        return header.get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def is_tokens_file(path: str) -> bool:
    meta = read_safetensors_metadata(path) if path.endswith(".safetensors") else None
    return bool(meta) and meta.get("format") == TOKENS_FORMAT


def load_tokens(path: str) -> FlexTokTokens:
    from safetensors import safe_open

    meta = read_safetensors_metadata(path)
    if meta is None:
        raise ValueError(f"{path} is not a safetensors file")
    if meta.get("format") != TOKENS_FORMAT:
        raise ValueError(f"{path} is a safetensors file but not FlexTok tokens (metadata format="
                         f"{meta.get('format')!r}, expected {TOKENS_FORMAT!r}); write token files with "
                         "FlexTok Save Tokens")
    with safe_open(path, framework="pt") as f:
        if "ids" not in f.keys():
            raise ValueError(f"{path} holds no 'ids' tensor")
        ids = f.get_tensor("ids")
    try:
        return FlexTokTokens(
            ids, meta["model_id"], meta.get("model_name", "?"),
            (int(meta["image_height"]), int(meta["image_width"])), int(meta["num_registers"]),
            int(meta["vocab_size"]), json.loads(meta.get("extra") or "{}"))
    except KeyError as e:
        raise ValueError(f"{path}: FlexTok token metadata lacks {e}") from None


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

    center_crop: scale so the image covers ``target`` and cut the middle (aspect kept; what FlexTok was trained on);
    stretch: resize to ``target``; none: keep the size, and let ``check(h, w)`` raise if the model cannot take it.
    """
    if mode not in FIT_MODES:
        raise ValueError(f"fit must be one of {FIT_MODES}, got {mode!r}")
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
    h, w = x.shape[-2:]
    th, tw = target
    if mode == "none":
        if check is not None:
            try:
                check(h, w)
            except ValueError as e:
                raise ValueError(f"{e} (set fit to 'center_crop' or 'stretch' to resize automatically)") from None
        return x
    if (h, w) == (th, tw):
        return x
    if mode == "stretch":
        return F.interpolate(x, size=(th, tw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    scale = max(th / h, tw / w)
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[:, :, top:top + th, left:left + tw]


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
