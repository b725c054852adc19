"""Training losses and their small networks: PatchGAN discriminator with hinge loss and the LDM adaptive weight, KL,
rectified-flow timestep sampling and the REPA loss (nested dropout's ``keep_k``: flextok_core/nested_dropout.py).
The perceptual distance networks are the evaluation's: metrics.py (``build_perceptual``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..flextok_core.rng import rand, randn

# the perceptual distance networks are the evaluation's (metrics.py); re-exported for repa.py


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
    """t in (0, 1) (t = 1 is noise): ``uniform`` or ``logit_normal`` (sigmoid of N(mean, std)), drawn on the
    generator's device (CPU or ``device``) and returned on ``device``."""
    if mode == "uniform":
        return rand((batch,), generator, device=device)
    if mode == "logit_normal":
        return torch.sigmoid(randn((batch,), generator, device=device) * std + mean)
    raise ValueError(f"timestep sampling must be uniform or logit_normal, got {mode!r}")


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
