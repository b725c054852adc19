"""Reconstruction quality of a tokenizer pipeline versus the number of tokens: PSNR, SSIM and a perceptual
distance on a fixed set of images, plus the VAE alone (the ceiling).

    python -m flextok_kit.training.eval_reconstruction pipeline=runs/tokenizer/export data.path=/data/val \
        data.resolution=256 num_images=256 token_counts=[1,4,16,64,256] output=runs/tokenizer/eval

Writes ``results.json`` and a Markdown table ``results.md`` to ``output`` and prints the table.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from .config import load_config, parse_cli
from .data import DATA_DEFAULTS, build_dataset, collate
from .losses import build_perceptual
from .models import psnr, ssim
from .utils import atomic_write_text

logger = logging.getLogger("flextok_kit.training")

DEFAULTS = {
    "pipeline": None,
    "official": False,
    "output": None,                  # default: <pipeline>/../eval
    "data": {**DATA_DEFAULTS, "crop": "center", "hflip": 0.0},
    "num_images": 64,
    "batch_size": 16,
    "token_counts": None,            # default: 1, 2, 4, ..., N
    "num_inference_steps": 25,
    "guidance_scale": [1.0],         # one table row group per value
    "use_apg": True,
    "perceptual": "auto",            # auto (stlpips-alex if installed, else none) | none | a registry name
    "seed": 0,
    "device": None,
}


def _perceptual(name):
    if name == "auto":
        try:
            return build_perceptual("stlpips-alex"), "stlpips-alex"
        except ImportError:
            return None, "none"
    net = build_perceptual(name)
    return net, name if net is not None else "none"


@torch.no_grad()
def main(argv=None, cfg=None) -> dict:
    if cfg is None:
        path, overrides = parse_cli(argv, __doc__)
        cfg = load_config(path, overrides, DEFAULTS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ..pipelines import FlexTokPipeline

    if not cfg.pipeline or not cfg.data.path:
        raise ValueError("pipeline=... and data.path=... are required")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = FlexTokPipeline.from_official if cfg.official else FlexTokPipeline.from_pretrained
    pipe = load(cfg.pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    n_reg = pipe.num_registers
    counts = list(cfg.token_counts or [2 ** i for i in range(n_reg.bit_length()) if 2 ** i <= n_reg])
    if n_reg not in counts and not cfg.token_counts:
        counts.append(n_reg)
    dataset = build_dataset(cfg.data, seed=int(cfg.seed))
    n = min(int(cfg.num_images), len(dataset))
    net, pname = _perceptual(cfg.perceptual)
    if net is not None:
        net.to(device)
    rows: dict = {}

    def add(key, recon, x):
        r = rows.setdefault(key, {"psnr": [], "ssim": [], "perceptual": []})
        r["psnr"].append(psnr(recon, x).cpu())
        r["ssim"].append(ssim(recon, x).cpu())
        if net is not None:
            r["perceptual"].append(net(recon.float(), x.float()).flatten().cpu())

    scales = cfg.guidance_scale if isinstance(cfg.guidance_scale, (list, tuple)) else [cfg.guidance_scale]
    for start in range(0, n, int(cfg.batch_size)):
        batch = collate([dataset[(i, 0)] for i in range(start, min(n, start + int(cfg.batch_size)))])
        x = batch["pixels"].to(device).float() / 127.5 - 1
        g = torch.Generator(device=device).manual_seed(int(cfg.seed) + start)
        latents = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mode()
        add(("vae", 0, 0.0), pipe.vae.decode(latents).sample.float().clamp(-1, 1), x)
        ids = pipe.tokenize(x, generator=g)
        noise = torch.randn(x.shape[0], pipe.flextok.config.latent_channels, x.shape[2] // pipe.vae_scale_factor,
                            x.shape[3] // pipe.vae_scale_factor, generator=g, device=device)
        for s in scales:
            for k in counts:
                out = pipe.detokenize(ids[:, :k], num_inference_steps=int(cfg.num_inference_steps),
                                      guidance_scale=float(s), use_apg=bool(cfg.use_apg), latents=noise,
                                      output_type="pt").images
                add(("tokens", k, float(s)), out.to(device).float() * 2 - 1, x)
        logger.info("evaluated %d / %d images", min(n, start + int(cfg.batch_size)), n)

    results = []
    for (kind, k, s), r in rows.items():
        results.append({"kind": kind, "tokens": k, "guidance_scale": s,
                        "psnr": float(torch.cat(r["psnr"]).mean()), "ssim": float(torch.cat(r["ssim"]).mean()),
                        "perceptual": float(torch.cat(r["perceptual"]).mean()) if r["perceptual"] else None})
    lines = [f"| tokens | guidance | PSNR (dB) | SSIM | {pname} |", "|---|---|---|---|---|"]
    for r in results:
        label = "VAE only" if r["kind"] == "vae" else str(r["tokens"])
        perc = f"{r['perceptual']:.4f}" if r["perceptual"] is not None else "-"
        lines.append(f"| {label} | {r['guidance_scale'] if r['kind'] != 'vae' else '-'} | {r['psnr']:.2f} | "
                     f"{r['ssim']:.4f} | {perc} |")
    table = "\n".join(lines)
    out = Path(cfg.output or Path(cfg.pipeline).parent / "eval")
    atomic_write_text(out / "results.json", json.dumps({"num_images": n, "perceptual": pname,
                                                        "steps": int(cfg.num_inference_steps), "rows": results},
                                                       indent=1))
    atomic_write_text(out / "results.md", f"{n} images, {cfg.num_inference_steps} Euler steps\n\n{table}\n")
    print(table)
    return {"rows": results, "table": table}


if __name__ == "__main__":
    main()
