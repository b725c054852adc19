"""Reconstruction quality of a tokenizer pipeline versus the number of tokens: PSNR, SSIM and a perceptual
distance on a fixed set of images, plus the VAE alone (the ceiling). The config-driven form of ``flextok eval``
for training runs (the same :func:`flextok_kit.evaluation.evaluate_reconstruction`, images from a training-data
config).

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


@torch.no_grad()
def main(argv=None, cfg=None) -> dict:
    if cfg is None:
        path, overrides = parse_cli(argv, __doc__)
        cfg = load_config(path, overrides, DEFAULTS)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from ..evaluation import evaluate_reconstruction, format_table
    from ..pipelines import FlexTokPipeline

    if not cfg.pipeline or not cfg.data.path:
        raise ValueError("pipeline=... and data.path=... are required")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    load = FlexTokPipeline.from_official if cfg.official else FlexTokPipeline.from_pretrained
    pipe = load(cfg.pipeline)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    dataset = build_dataset(cfg.data, seed=int(cfg.seed))
    n = min(int(cfg.num_images), len(dataset))
    images = collate([dataset[(i, 0)] for i in range(n)])["pixels"].float() / 127.5 - 1  # [n,3,H,W] in [-1,1]
    scales = cfg.guidance_scale if isinstance(cfg.guidance_scale, (list, tuple)) else [cfg.guidance_scale]
    result = evaluate_reconstruction(pipe, images, token_counts=cfg.token_counts,
                                     num_inference_steps=int(cfg.num_inference_steps), guidance_scales=list(scales),
                                     use_apg=bool(cfg.use_apg), perceptual=cfg.perceptual,
                                     batch_size=int(cfg.batch_size), seed=int(cfg.seed), progress=logger.info)
    table = format_table(result)
    out = Path(cfg.output or Path(cfg.pipeline).parent / "eval")
    atomic_write_text(out / "results.json", json.dumps(result, indent=1))
    atomic_write_text(out / "results.md", f"{n} images, {cfg.num_inference_steps} Euler steps\n\n{table}\n")
    print(table)
    return {**result, "table": table}


if __name__ == "__main__":
    main()
