"""Losses and their small networks: perceptual distance (pluggable), PatchGAN discriminator with hinge loss and the
LDM adaptive weight, KL, rectified-flow pieces (timestep sampling, nested-dropout ``keep_k``) and the REPA loss."""
from __future__ import annotations

import importlib
import importlib.util
import math
import sys
import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

# -------------------------------------------------------------------------------------------------------------
# Perceptual distance: name -> factory() returning a module d(x, y) with x, y in [-1, 1] -> per-sample [B]


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


def import_object(spec: str):
    """``package.module:attr`` -> the object."""
    if ":" not in spec:
        raise ValueError(f"{spec!r} is neither a registered name nor of the form package.module:callable")
    mod, attr = spec.split(":", 1)
    obj = importlib.import_module(mod)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_perceptual(name: str | None) -> nn.Module | None:
    """``none`` | a name in :data:`PERCEPTUAL` | ``package.module:factory`` (called without arguments; must return a
    module computing per-sample distances of [-1,1] images)."""
    if name in (None, "none", "", False):
        return None
    factory = PERCEPTUAL.get(name) or import_object(name)
    net = factory()
    net.requires_grad_(False)
    return net.eval()


# -------------------------------------------------------------------------------------------------------------
# PatchGAN discriminator (pix2pix / taming-transformers NLayerDiscriminator)
class PatchDiscriminator(nn.Module):
    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()

        def norm_layer(c):
            if norm == "batch":
                return nn.BatchNorm2d(c)
            if norm == "group":
                return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c)
            return nn.Identity()

        layers = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, num_layers + 1):
            prev, mult = mult, min(2 ** n, 8)
            stride = 2 if n < num_layers else 1
            layers += [nn.Conv2d(channels * prev, channels * mult, 4, stride, 1, bias=norm == "none"),
                       norm_layer(channels * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(channels * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """LDM: ``||grad_last rec|| / (||grad_last g|| + 1e-4)``, clamped to ``[0, max_weight]``, detached."""
    rec_grads = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = torch.norm(rec_grads) / (torch.norm(g_grads) + 1e-4)
    return torch.clamp(w, 0.0, max_weight).detach()


def kl_loss(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over latent dims, averaged over the batch (as diffusers/LDM)."""
    logvar = torch.clamp(logvar, -30.0, 20.0)
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)
    return kl.flatten(1).sum(1).mean()


# -------------------------------------------------------------------------------------------------------------
# Rectified flow
def sample_timesteps(batch: int, mode: str = "logit_normal", device=None, generator=None, mean: float = 0.0,
                     std: float = 1.0) -> torch.Tensor:
    """t in (0, 1) (t = 1 is noise): ``uniform`` or ``logit_normal`` (sigmoid of N(mean, std))."""
    if mode == "uniform":
        return torch.rand(batch, device=device, generator=generator)
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(batch, device=device, generator=generator) * std + mean)
    raise ValueError(f"timestep sampling must be uniform or logit_normal, got {mode!r}")


def keep_k_choices(num_registers: int, mode: str = "pow2") -> torch.Tensor:
    if mode == "pow2":
        ks = [2 ** i for i in range(int(math.log2(num_registers)) + 1)]
        if ks[-1] != num_registers:
            ks.append(num_registers)
        return torch.tensor(ks)
    if mode == "uniform":
        return torch.arange(1, num_registers + 1)
    if mode == "none":
        return torch.tensor([num_registers])
    raise ValueError(f"nested dropout mode must be pow2, uniform or none, got {mode!r}")


def sample_keep_k(batch: int, num_registers: int, mode: str = "pow2", device=None, generator=None) -> torch.Tensor:
    """Nested dropout: number of kept registers per sample, uniform over ``{1, 2, 4, ..., N}`` (``pow2``, the paper)
    or ``{1..N}`` (``uniform``); ``none`` keeps all."""
    choices = keep_k_choices(num_registers, mode)
    idx = torch.randint(len(choices), (batch,), generator=generator, device="cpu" if generator is None else
                        generator.device)
    return choices[idx.cpu()].to(device)


def repa_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative cosine similarity between projected decoder tokens and target features ``[B, P, D]``; returns
    ``1 - cos`` averaged (0 when aligned)."""
    return 1.0 - F.cosine_similarity(projected.float(), target.float(), dim=-1).mean()


def build_mlp(in_dim: int, hidden: int, out_dim: int, layers: int = 3) -> nn.Sequential:
    """REPA projector: ``layers`` linear layers with SiLU in between."""
    mods, d = [], in_dim
    for _ in range(layers - 1):
        mods += [nn.Linear(d, hidden), nn.SiLU()]
        d = hidden
    mods.append(nn.Linear(d, out_dim))
    return nn.Sequential(*mods)
