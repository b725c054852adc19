"""Quick-start job: (1) reconstruct sample photos through their first 1, 2, 4, ... N tokens into one labelled
coarse-to-fine grid; (2) generate one row per class with the class-conditional AR demo model, each sample decoded
from its first 1, 2, 4, ... tokens, plus more samples at the full budget.

    python -m flextok_kit.demo [--model FOLDER] [--images FILES/FOLDERS] [--ar-model FOLDER | --no-ar]
                               [--out out/] [--steps 25] [--distilled]

By default it uses the embedded demo tokenizer ``demo_models/photo_tokenizer`` (a tiny FlexTok + VAE trained on
CPU with our training scripts on natural photos from Debian packages, see its README.md) and the three held-out
sample photos in ``demo_models/samples`` (never seen in training). ``--model`` takes one of our diffusers-format
folders, an official-format folder or a hub id. Without the demo model it falls back to a freshly initialised tiny
model (random weights: the pictures then show the pipeline working, not a trained model). The generation part uses
``demo_models/fashion_ar`` (a FlexTok tokenizer + class-conditional AR model trained on Fashion-MNIST, see its
README.md); ``--ar-model`` takes any pipeline folder with a class-conditional ``ar_model``. ``--distilled`` uses the
few-step distilled decoders of both (``demo_models/*_distilled``: 4 decoder passes per image instead of 50).
Decoder steps and guidance default to each model's own settings (a distilled model records its sampler).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .flextok_core.nested_dropout import pow2_token_counts
from .pipelines import FlexTokPipeline
from .pipelines.image_grid import labelled_grid, save_image_atomic

HERE = Path(__file__).resolve().parent
DEMO_MODEL = HERE / "demo_models" / "photo_tokenizer"
AR_DEMO_MODEL = HERE / "demo_models" / "fashion_ar"
DISTILLED = {DEMO_MODEL: HERE / "demo_models" / "photo_tokenizer_distilled",
             AR_DEMO_MODEL: HERE / "demo_models" / "fashion_ar_distilled"}
SAMPLES = HERE / "demo_models" / "samples"                  # held-out photos
FASHION_SAMPLES = HERE / "demo_models" / "fashion_samples"  # held-out Fashion-MNIST test items, 2 per class


def load(model: str | None) -> tuple[FlexTokPipeline, str, bool]:
    """-> (pipeline, description, trained?)"""
    if model:
        folder = Path(model)
        if (folder / "model_index.json").is_file():
            return FlexTokPipeline.from_pretrained(folder), str(folder), True
        return FlexTokPipeline.load(model), model, True
    if (DEMO_MODEL / "model_index.json").is_file():
        return FlexTokPipeline.from_pretrained(DEMO_MODEL), f"{DEMO_MODEL} (demo photo tokenizer)", True
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
    """Images (files / folders; default: the sample photos) centre-cropped to ``size``, [N,3,size,size] in [-1,1]."""
    from .images import find_images, load_batch

    if inputs:
        paths = find_images(inputs)
        return load_batch(paths, size, "center-crop"), [p.stem for p in paths]
    photos = sorted(SAMPLES.glob("*.jpg")) if SAMPLES.is_dir() else []
    if photos:
        return load_batch(photos, size, "center-crop"), [p.stem for p in photos]
    return sample_image(size), ["synthetic pattern"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="diffusers-format or official-format FlexTok folder (default: the demo model)")
    parser.add_argument("--images", nargs="+", help="image files/folders (default: demo_models/samples)")
    parser.add_argument("--out", default="out", help="output folder")
    parser.add_argument("--size", type=int, help="image size (default: 64, or the model's largest if smaller)")
    parser.add_argument("--steps", type=int, default=None,
                        help="decoder Euler steps (default: the model's: 25, or a distilled decoder's few steps)")
    parser.add_argument("--distilled", action="store_true",
                        help="use the few-step distilled demo models (demo_models/*_distilled)")
    parser.add_argument("--guidance", type=float, default=None,
                        help="decoder guidance (default: 3 for the demo model, else the model's own: 7.5, "
                             "1 for a distilled decoder)")
    parser.add_argument("--scale", type=int, default=2, help="upscale factor of the tiles in the grid (nearest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ar-model", help="pipeline folder with a class-conditional AR model "
                        "(default: demo_models/fashion_ar)")
    parser.add_argument("--no-ar", action="store_true", help="skip the generation part")
    parser.add_argument("--samples", type=int, default=4, help="samples per class in the generation grid")
    parser.add_argument("--ar-guidance", type=float, default=None,
                        help="AR classifier-free guidance (default 3: the demo model's best, see its model card)")
    args = parser.parse_args(argv)

    if args.distilled:
        args.model = args.model or str(DISTILLED[DEMO_MODEL])
        args.ar_model = args.ar_model or str(DISTILLED[AR_DEMO_MODEL])
    ar_path = Path(args.ar_model) if args.ar_model else AR_DEMO_MODEL
    if args.ar_model and not args.no_ar and not (ar_path / "model_index.json").is_file():
        raise FileNotFoundError(f"--ar-model {ar_path}: no model_index.json (not a pipeline folder)")
    start = time.perf_counter()
    pipe, source, trained = load(args.model)
    pipe.set_progress_bar_config(disable=True)
    guidance = args.guidance if args.guidance is not None else (3.0 if "demo photo tokenizer" in source else None)
    steps, guidance = pipe.resolve_decoder_sampling(args.steps, guidance)  # None: the model's own settings
    size = args.size or min(*pipe.default_image_size, 64)
    images, names = load_images(args.images, size)
    ks = pow2_token_counts(pipe.num_registers)

    from .metrics import psnr

    out = pipe(image=images, num_tokens=ks, generator=torch.Generator().manual_seed(args.seed),
               num_inference_steps=steps, guidance_scale=guidance, output_type="pt").images
    out = out.float() * 2 - 1                                                    # [B*len(ks),3,H,W], image-major
    recon = out.view(len(images), len(ks), *out.shape[1:])
    to_pil = lambda t: pipe.image_processor.postprocess(t[None].clamp(-1, 1), output_type="pil")[0]  # noqa: E731
    big = lambda im: im.resize((im.size[0] * args.scale, im.size[1] * args.scale), 0)  # noqa: E731  (NEAREST)
    rows = [[big(to_pil(images[i]))] + [big(to_pil(recon[i, j])) for j in range(len(ks))] for i in range(len(images))]
    grid = labelled_grid(rows, ["input"] + [f"{k} token" + ("s" if k > 1 else "") for k in ks])
    path = Path(args.out) / "coarse_to_fine.png"
    save_image_atomic(grid, path)
    print(f"model: {source}" + ("" if trained else "  -- untrained: shows the pipeline, not image quality"))
    print(f"images: {', '.join(names)} ({size}x{size}); {steps} Euler steps, guidance {guidance}"
          + (" (APG)" if guidance != 1 else " (one decoder pass per step)"))
    print("PSNR (dB) by number of tokens: " + ", ".join(
        f"{k}: {float(psnr(recon[:, j], images).mean()):.2f}" for j, k in enumerate(ks)))
    print(f"decoded {len(images)} image(s) x {len(ks)} prefixes k={ks} in {time.perf_counter() - start:.1f}s")
    print(f"wrote {path.resolve()}")
    if not args.no_ar:
        if (ar_path / "model_index.json").is_file():
            generate_class_grid(ar_path, args)
        else:
            print(f"no AR demo model at {ar_path}: generation part skipped")
    return path


# Sampling settings of the embedded AR demo (chosen on its validation samples; see its model card).
AR_DEMO_SETTINGS = {"ar_guidance_scale": 3.0, "guidance_scale": 3.0, "top_k": 0, "temperature": 1.0}


def generate_class_grid(folder: Path, args) -> Path:
    """One row per class: sample 1 decoded from its first 1, 2, 4, ... tokens, then more samples at all tokens."""
    start = time.perf_counter()
    pipe = FlexTokPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    ar = pipe.ar_model
    if ar is None or ar.is_text_conditional:
        raise ValueError(f"{folder}: the generation demo needs a class-conditional ar_model")
    settings = dict(AR_DEMO_SETTINGS)
    if args.ar_guidance is not None:
        settings["ar_guidance_scale"] = args.ar_guidance
    names = {int(i): str(c) for i, c in (ar.config.id2label or {}).items()}
    classes = list(range(ar.config.num_classes))
    n = min(ar.config.max_tokens, pipe.num_registers)
    ks = pow2_token_counts(n)
    s = max(1, args.samples)
    g = torch.Generator().manual_seed(args.seed)
    labels = [c for c in classes for _ in range(s)]                                   # class-major
    ids = pipe.generate_tokens(class_labels=labels, num_tokens=n, ar_guidance_scale=settings["ar_guidance_scale"],
                               temperature=settings["temperature"], top_k=settings["top_k"], generator=g)  # [C*s, n]
    h, w = pipe.default_image_size
    first = ids[::s]                                                                   # sample 1 of each class
    noise = pipe.prepare_latents(len(first), h, w, torch.float32, pipe._execution_device, g)
    if pipe.config.get("decoder_sampling"):  # a distilled decoder: its own sampler (no guidance pass)
        settings["guidance_scale"] = None
    decode = dict(num_inference_steps=args.steps, guidance_scale=settings["guidance_scale"], output_type="pt")
    prefixes = [pipe.detokenize(first[:, :k], latents=noise, **decode).images for k in ks]  # len(ks) x [C,3,h,w]
    more = ids.view(len(classes), s, n)[:, 1:].reshape(-1, n)                         # samples 2..s
    full = pipe.detokenize(more, generator=g, **decode).images.view(len(classes), s - 1, 3, h, w) if s > 1 else None
    to_pil = lambda t: pipe.image_processor.postprocess(t[None] * 2 - 1, output_type="pil")[0]  # noqa: E731
    scale = max(args.scale, 64 // max(h, 1))
    big = lambda im: im.resize((im.size[0] * scale, im.size[1] * scale), 0)  # noqa: E731  (NEAREST)
    rows = [[big(to_pil(p[c])) for p in prefixes] + [big(to_pil(full[c, j])) for j in range(s - 1)]
            for c in range(len(classes))]
    cols = [f"{k} token" + ("s" if k > 1 else "") for k in ks] + [f"sample {j + 1}" for j in range(1, s)]
    grid = labelled_grid(rows, cols, row_labels=[names.get(c, str(c)) for c in classes])
    path = Path(args.out) / "generated_by_class.png"
    save_image_atomic(grid, path)
    print(f"AR model: {folder} ({ar.config.num_classes} classes, {n} tokens, vocabulary {ar.config.vocab_size})")
    print(f"generated {len(ids)} sequences (AR guidance {settings['ar_guidance_scale']}), decoded sample 1 of each "
          f"class at k={ks} and {s - 1} more at k={n} in {time.perf_counter() - start:.1f}s")
    print(f"wrote {path.resolve()}")
    return path


if __name__ == "__main__":
    main()
