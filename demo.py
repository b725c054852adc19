"""Quick-start job: reconstruct a sample image through its first 1, 2, 4, ... N tokens into one grid.

    python -m flextok_kit.demo [--model FOLDER] [--out out/]

``--model`` takes an official-format folder or one of our diffusers-format folders. Without it the demo
uses the official-format tiny checkpoint in ``../shared/golden/flextok_tiny`` when present (random weights:
the pictures show the pipeline working, not a trained model), else a freshly initialised tiny model.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from .pipelines import FlexTokPipeline
from .pipelines.image_grid import labelled_grid, save_image_atomic

GOLDEN = Path(__file__).resolve().parent.parent / "shared" / "golden" / "flextok_tiny"


def load(model: str | None) -> tuple[FlexTokPipeline, str]:
    if model:
        folder = Path(model)
        if (folder / "model_index.json").is_file():
            return FlexTokPipeline.from_pretrained(folder), str(folder)
        return FlexTokPipeline.from_official(model), model
    if (GOLDEN / "model.safetensors").is_file():
        return FlexTokPipeline.from_official(GOLDEN), f"{GOLDEN} (random weights)"
    from diffusers import AutoencoderKL

    from .flextok_core import FlexTokModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=8)
    model = FlexTokModel(grid_size=(4, 4), num_registers=32, encoder_dim=64, encoder_depth=2, encoder_head_dim=32,
                         decoder_dim=64, decoder_depth=2, decoder_head_dim=32)
    return FlexTokPipeline(vae, model, FlexTokPipeline.default_scheduler()), "a fresh tiny model (random weights)"


def sample_image(size: int) -> torch.Tensor:
    """A smooth colour pattern with a disc, [1,3,size,size] in [-1,1]."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.25).float()
    return torch.stack([x, y, disc * 2 - 1]).clamp(-1, 1)[None]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="official-format or diffusers-format FlexTok folder")
    parser.add_argument("--out", default="out", help="output folder")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    pipe, source = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    height, width = pipe.default_image_size
    size = min(height, width, 64)
    image = sample_image(size)
    n = pipe.num_registers
    ks = [2**i for i in range(int(math.log2(n)) + 1)] + ([n] if n & (n - 1) else [])

    start = time.perf_counter()
    ids = pipe.tokenize(image, generator=torch.Generator().manual_seed(args.seed))
    out = pipe.detokenize([ids[0, :k] for k in ks], num_inference_steps=args.steps, guidance_scale=args.guidance,
                          height=size, width=size, generator=torch.Generator().manual_seed(args.seed))
    original = pipe.image_processor.postprocess(image, output_type="pil")[0]
    grid = labelled_grid([[original] + out.images], ["input"] + [f"{k} tok" for k in ks])
    path = Path(args.out) / "coarse_to_fine.png"
    save_image_atomic(grid, path)
    print(f"model: {source}")
    print(f"tokens: {ids[0, :8].tolist()} ... ({n} in all)")
    print(f"decoded {len(ks)} prefixes k={ks} in {time.perf_counter() - start:.1f}s ({args.steps} steps, "
          f"guidance {args.guidance} APG)")
    print(f"wrote {path.resolve()}")


if __name__ == "__main__":
    main()
