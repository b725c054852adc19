"""Quick-start job: reconstruct sample photos through their first 1, 2, 4, ... N tokens into one labelled
coarse-to-fine grid.

    python -m flextok_kit.demo [--model FOLDER] [--images FILES/FOLDERS] [--out out/] [--steps 25]

By default it uses the embedded demo tokenizer ``demo_models/photo_tokenizer`` (a tiny FlexTok + VAE trained on
CPU with our training scripts on natural photos from Debian packages, see its README.md) and the three held-out
sample photos in ``demo_models/samples`` (never seen in training). ``--model`` takes one of our diffusers-format
folders, an official-format folder or a hub id. Without the demo model it falls back to the official-format tiny
checkpoint in ``../shared/golden/flextok_tiny`` (random weights: the pictures then show the pipeline working, not a
trained model), else a freshly initialised tiny model.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .pipelines import FlexTokPipeline
from .pipelines.image_grid import labelled_grid, save_image_atomic

HERE = Path(__file__).resolve().parent
DEMO_MODEL = HERE / "demo_models" / "photo_tokenizer"
SAMPLES = HERE / "demo_models" / "samples"
GOLDEN = HERE.parent / "shared" / "golden" / "flextok_tiny"


def load(model: str | None) -> tuple[FlexTokPipeline, str, bool]:
    """-> (pipeline, description, trained?)"""
    if model:
        folder = Path(model)
        if (folder / "model_index.json").is_file():
            return FlexTokPipeline.from_pretrained(folder), str(folder), True
        return FlexTokPipeline.load(model), model, True
    if (DEMO_MODEL / "model_index.json").is_file():
        return FlexTokPipeline.from_pretrained(DEMO_MODEL), f"{DEMO_MODEL} (demo photo tokenizer)", True
    if (GOLDEN / "model.safetensors").is_file():
        return FlexTokPipeline.from_official(GOLDEN), f"{GOLDEN} (random weights)", False
    from diffusers import AutoencoderKL

    from .flextok_core import FlexTokModel

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=8)
    model = FlexTokModel(grid_size=(4, 4), num_registers=32, encoder_dim=64, encoder_depth=2, encoder_head_dim=32,
                         decoder_dim=64, decoder_depth=2, decoder_head_dim=32)
    return FlexTokPipeline(vae, model, FlexTokPipeline.default_scheduler()), "a fresh tiny model (random weights)", False


def sample_image(size: int) -> torch.Tensor:
    """A smooth colour pattern with a disc, [1,3,size,size] in [-1,1] (used when no sample photos are present)."""
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    disc = ((x - 0.2) ** 2 + (y + 0.1) ** 2 < 0.25).float()
    return torch.stack([x, y, disc * 2 - 1]).clamp(-1, 1)[None]


def load_images(inputs: list[str] | None, size: int) -> tuple[torch.Tensor, list[str]]:
    from .evaluation import load_folder

    if inputs:
        from .cli import find_images

        paths = find_images(inputs)
        return load_folder(paths, size), [p.stem for p in paths]
    photos = sorted(SAMPLES.glob("*.jpg")) if SAMPLES.is_dir() else []
    if photos:
        return load_folder(photos, size), [p.stem for p in photos]
    return sample_image(size), ["synthetic pattern"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers-format or official-format FlexTok folder (default: the demo model)")
    parser.add_argument("--images", nargs="+", help="image files/folders (default: demo_models/samples)")
    parser.add_argument("--out", default="out", help="output folder")
    parser.add_argument("--size", type=int, help="image size (default: 64, or the model's largest if smaller)")
    parser.add_argument("--steps", type=int, default=25, help="decoder Euler steps")
    parser.add_argument("--guidance", type=float, default=None,
                        help="decoder guidance (default: 3 for the demo model, 7.5 otherwise)")
    parser.add_argument("--scale", type=int, default=2, help="upscale factor of the tiles in the grid (nearest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    pipe, source, trained = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    guidance = args.guidance if args.guidance is not None else (3.0 if "demo photo tokenizer" in source else 7.5)
    size = args.size or min(*pipe.default_image_size, 64)
    images, names = load_images(args.images, size)
    n = pipe.num_registers
    ks = [2 ** i for i in range(n.bit_length()) if 2 ** i <= n]
    ks += [n] if ks[-1] != n else []

    from .training.models import psnr

    out = pipe(image=images, num_tokens=ks, generator=torch.Generator().manual_seed(args.seed),
               num_inference_steps=args.steps, guidance_scale=guidance, output_type="pt").images
    out = out.float() * 2 - 1                                                    # [B*len(ks),3,H,W], image-major
    recon = out.view(len(images), len(ks), *out.shape[1:])
    to_pil = lambda t: pipe.image_processor.postprocess(t[None].clamp(-1, 1), output_type="pil")[0]  # noqa: E731
    big = lambda im: im.resize((im.size[0] * args.scale, im.size[1] * args.scale), 0)  # noqa: E731  (NEAREST)
    rows = [[big(to_pil(images[i]))] + [big(to_pil(recon[i, j])) for j in range(len(ks))] for i in range(len(images))]
    grid = labelled_grid(rows, ["input"] + [f"{k} token" + ("s" if k > 1 else "") for k in ks])
    path = Path(args.out) / "coarse_to_fine.png"
    save_image_atomic(grid, path)
    print(f"model: {source}" + ("" if trained else "  -- untrained: shows the pipeline, not image quality"))
    print(f"images: {', '.join(names)} ({size}x{size}); {args.steps} Euler steps, guidance {guidance} (APG)")
    print("PSNR (dB) by number of tokens: " + ", ".join(
        f"{k}: {float(psnr(recon[:, j], images).mean()):.2f}" for j, k in enumerate(ks)))
    print(f"decoded {len(images)} image(s) x {len(ks)} prefixes k={ks} in {time.perf_counter() - start:.1f}s")
    print(f"wrote {path.resolve()}")
    return path


if __name__ == "__main__":
    main()
