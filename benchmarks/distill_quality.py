"""Few-step distilled decoders vs their teacher, measured in one run: quality per token budget, decoder passes per
image and wall time.

For each demo set, every held-out image is tokenized once (seeded; the student shares the teacher's encoder, so the
tokens are the same) and decoded from its first k tokens (k = 1, 2, 4, 8, 16) from the same initial noise by:

* the teacher at its recommended sampler (25 Euler steps, guidance 3 with APG: the model cards' settings),
* the teacher at 4 and 8 steps (same guidance; and at 4 steps without guidance: the same 4 passes as the student),
* the 4-step and the 8-step students at their recorded defaults (guidance 1: one pass per step).

Metrics are ``evaluation.evaluate_reconstruction``'s (PSNR, SSIM, ST-LPIPS against the input; FID/KID between the
reconstructions and the inputs on EfficientNet-Lite0 features: NOT comparable to published Inception numbers).
Passes per image are counted on the decoder's forward calls (rows decoded / images); wall time is the best of 3
timed ``detokenize`` runs of a batch at k = 16 (decoder only, ``output_type="latent"``, the VAE excluded: it is the
same for all), at the torch thread count of the run. The fashion set adds the AR demo: class-conditional samples
(AR guidance 3) decoded by the teacher and by the student, FID/KID against the held-out items
(``evaluation.evaluate_generation``), and a picture of them.

    python benchmarks/distill_quality.py [--sets photo fashion] [--json out.json] [--picture docs/distilled_vs_teacher.png]
    python benchmarks/distill_quality.py --quick     # a few images: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import PIL.Image
import torch

from flextok_kit import evaluation as ev
from flextok_kit.images import load_batch
from flextok_kit.metrics import build_feature_net, psnr
from flextok_kit.pipelines import FlexTokPipeline
from flextok_kit.pipelines.image_grid import labelled_grid, save_image_atomic
from cpu_report import cpu_model  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_models"
KS = [1, 2, 4, 8, 16]
TEACHER_GUIDANCE = 3.0  # the demo model cards' decoder guidance (APG)

# name, model folder, held-out images, size, fit, KID subset size, students (name -> folder)
SETS = {
    "photo": dict(teacher=DEMO / "photo_tokenizer", images=ROOT / "runs/demo_photo/data/eval", size=64, fit="resize",
                  kid_subset=100, students={4: DEMO / "photo_tokenizer_distilled",
                                            8: ROOT / "runs/distill_photo_s8/packaged"}),
    "fashion": dict(teacher=DEMO / "fashion_ar", images=ROOT / "runs/fashion_demo/data/eval", size=32, fit="resize",
                    kid_subset=500, students={4: DEMO / "fashion_ar_distilled",
                                              8: ROOT / "runs/distill_fashion_s8/packaged"}),
}


def decoders(spec: dict) -> list[dict]:
    """The decoders compared: (label, pipeline folder, steps, guidance); None = the model's recorded default."""
    out = [dict(label="teacher 25 steps (reference)", folder=spec["teacher"], steps=25, guidance=TEACHER_GUIDANCE),
           dict(label="teacher 8 steps", folder=spec["teacher"], steps=8, guidance=TEACHER_GUIDANCE),
           dict(label="teacher 4 steps", folder=spec["teacher"], steps=4, guidance=TEACHER_GUIDANCE),
           dict(label="teacher 4 steps, no guidance", folder=spec["teacher"], steps=4, guidance=1.0)]
    for s, folder in sorted(spec["students"].items(), reverse=True):
        if (Path(folder) / "model_index.json").is_file():
            out.append(dict(label=f"student {s} steps", folder=folder, steps=None, guidance=None))
        else:
            print(f"(no {s}-step student at {folder}: skipped)")
    return out


def count_passes(pipe, ids, noise, steps, guidance) -> float:
    """Decoder passes per image of one ``detokenize`` (rows through the decoder's forward / images)."""
    rows = []
    forward = pipe.flextok.decoder.forward

    def counted(x_t, *args, **kwargs):
        out = forward(x_t, *args, **kwargs)
        rows.append(out.shape[0])  # B rows per conditional pass; 2B when the unconditional pass is packed in
        return out

    pipe.flextok.decoder.forward = counted
    try:
        pipe.detokenize(ids, latents=noise, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
    finally:
        pipe.flextok.decoder.forward = forward
    return sum(rows) / ids.shape[0]


def time_decode(pipe, ids, noise, steps, guidance, repeats: int = 3) -> float:
    """Best-of-``repeats`` seconds per image of the decoder's sampling loop (no VAE)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        pipe.detokenize(ids, latents=noise, num_inference_steps=steps, guidance_scale=guidance, output_type="latent")
        best = min(best, time.perf_counter() - t0)
    return best / ids.shape[0]


@torch.no_grad()
def decode_all(pipe, images, steps, guidance, batch_size: int, seed: int = 0) -> dict:
    """{k: reconstructions [N,3,H,W] in [-1,1]}, tokens and noise drawn exactly as evaluate_reconstruction does (so
    every decoder sees the same tokens and the same initial noise)."""
    out = {k: [] for k in KS}
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size].float()
        g = torch.Generator().manual_seed(seed + start)
        ids = pipe.tokenize(x, generator=g)
        noise = torch.randn(x.shape[0], pipe.flextok.config.latent_channels, x.shape[2] // pipe.vae_scale_factor,
                            x.shape[3] // pipe.vae_scale_factor, generator=g)
        for k in KS:
            out[k].append(pipe.detokenize(ids[:, :k], num_inference_steps=steps, guidance_scale=guidance,
                                          latents=noise, output_type="pt").images.float() * 2 - 1)
    return {k: torch.cat(v) for k, v in out.items()}


def measure_decoder(d: dict, images, spec, features, args, reference=None) -> dict:
    pipe = FlexTokPipeline.from_pretrained(d["folder"])
    pipe.set_progress_bar_config(disable=True)
    steps, guidance = pipe.resolve_decoder_sampling(d["steps"], d["guidance"])
    t0 = time.perf_counter()
    res = ev.evaluate_reconstruction(pipe, images, KS, steps, [guidance], True, "auto", features, args.batch_size,
                                     0, min(spec["kid_subset"], len(images)))
    x = images[: args.timing_batch]
    g = torch.Generator().manual_seed(0)
    ids = pipe.tokenize(x, generator=g)
    noise = pipe.prepare_latents(x.shape[0], x.shape[2], x.shape[3], torch.float32, "cpu", g)
    rows = {r["tokens"]: r for r in res["rows"] if r["kind"] == "tokens"}
    # fidelity to the reference sampler: PSNR against the 25-step teacher's own reconstruction (same tokens, noise)
    sub = images[: args.agreement_images]
    outs = decode_all(pipe, sub, steps, guidance, args.batch_size)
    agreement = None if reference is None else {k: float(psnr(outs[k], reference[k]).mean()) for k in KS}
    return dict(label=d["label"], folder=str(d["folder"]), steps=steps, guidance=guidance, outputs=outs,
                agreement=agreement,
                passes=count_passes(pipe, ids, noise, steps, guidance),
                ms_per_image=1e3 * time_decode(pipe, ids, noise, steps, guidance),
                eval_seconds=time.perf_counter() - t0, per_k={k: rows[k] for k in KS},
                vae=next(r for r in res["rows"] if r["kind"] == "vae"), perceptual=res["perceptual"])


def generation(spec, decs, features, args) -> list[dict]:
    """The AR demo: the same class-conditional token samples decoded by the teacher (25 steps) and the students."""
    reference = load_batch([spec["images"]], spec["size"], spec["fit"], None)
    out = []
    for d in decs:
        if not (d["label"].startswith("student") or "reference" in d["label"]):
            continue
        pipe = FlexTokPipeline.from_pretrained(d["folder"])
        pipe.set_progress_bar_config(disable=True)
        steps, guidance = pipe.resolve_decoder_sampling(d["steps"], d["guidance"])
        res = ev.evaluate_generation(pipe, reference, features, KS, args.num_samples, None, None, 3.0, 1.0, 0, 1.0,
                                     steps, guidance, True, args.batch_size, 0, min(args.num_samples, 250))
        out.append(dict(label=d["label"], steps=steps, guidance=guidance,
                        per_k={r["tokens"]: r for r in res["rows"]}))
    return out


def table(results: list[dict], ref: dict) -> str:
    """Markdown: per decoder, passes / wall time (and ratios to the reference), PSNR at every k, and SSIM,
    ST-LPIPS and KID (x1e3) at every k as k=1 / 2 / 4 / 8 / 16."""
    head = ["decoder", "passes / image", "decode ms / image", "speed-up"] + [f"PSNR k={k}" for k in KS] + [
        "SSIM (k=1/2/4/8/16)", "ST-LPIPS (k=1/2/4/8/16)", "KID x1e3 (k=1/2/4/8/16)",
        "PSNR vs teacher-25 output (k=1/2/4/8/16)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        pk = r["per_k"]
        series = lambda key, fmt, scale=1.0: " / ".join(  # noqa: E731
            "-" if pk[k][key] is None else fmt.format(pk[k][key] * scale) for k in KS)
        lines.append("| " + " | ".join([
            r["label"], f"{r['passes']:g}", f"{r['ms_per_image']:.2f}", f"{ref['ms_per_image'] / r['ms_per_image']:.1f}x",
            *[f"{pk[k]['psnr']:.2f}" for k in KS], series("ssim", "{:.3f}"), series("perceptual", "{:.3f}"),
            series("kid", "{:.1f}", 1e3),
            "-" if r["agreement"] is None else " / ".join(f"{r['agreement'][k]:.1f}" for k in KS)]) + " |")
    return "\n".join(lines)


def targets(results: list[dict], ref: dict) -> list[str]:
    """The issue's acceptance targets, checked on the measured numbers."""
    lines = []
    for r in results:
        if not r["label"].startswith("student"):
            continue
        d_psnr = [r["per_k"][k]["psnr"] - ref["per_k"][k]["psnr"] for k in KS]
        kid_ratio = [r["per_k"][k]["kid"] / max(ref["per_k"][k]["kid"], 1e-12) for k in KS]
        lines.append(f"{r['label']}: PSNR - reference at k={KS}: {', '.join(f'{x:+.2f}' for x in d_psnr)} dB "
                     f"(worst {min(d_psnr):+.2f}); KID / reference: {', '.join(f'{x:.2f}' for x in kid_ratio)} "
                     f"(worst {max(kid_ratio):.2f}); {ref['passes'] / r['passes']:.1f}x fewer decoder passes, "
                     f"{ref['ms_per_image'] / r['ms_per_image']:.1f}x faster decoding")
        same = next((t for t in results if t["label"] == f"teacher {r['steps']} steps"), None)
        if same is not None and r["agreement"] and same["agreement"]:
            lines.append(f"  vs the teacher at {r['steps']} steps: PSNR to the 25-step output "
                         + ", ".join(f"{r['agreement'][k]:.1f} vs {same['agreement'][k]:.1f}" for k in KS)
                         + " dB; KID x1e3 " + ", ".join(f"{r['per_k'][k]['kid'] * 1e3:.1f} vs "
                                                        f"{same['per_k'][k]['kid'] * 1e3:.1f}" for k in KS))
    return lines


def picture_rows(spec, results, n: int, scale: int, ar: bool = False) -> tuple[list, list]:
    """Per image: a row decoded by the 25-step teacher and one by the 4-step student, across k. ``ar``: the images
    are AR samples (classes spread over the AR model's, AR guidance 3) instead of held-out reconstructions."""
    images = load_batch([spec["images"]], spec["size"], spec["fit"], None)
    images = images[torch.linspace(0, len(images) - 1, n).long()]  # spread over the set (its classes / photos)
    sampled = None
    rows = []
    for label in ("teacher 25 steps (reference)", "student 4 steps"):
        d = next((r for r in results if r["label"] == label), None)
        if d is None:
            continue
        pipe = FlexTokPipeline.from_pretrained(d["folder"])
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        if ar:  # the AR model is the same in both pipelines: the same samples
            classes = torch.linspace(0, pipe.ar_model.config.num_classes - 1, n).long().tolist()
            sampled = pipe.generate_tokens(class_labels=classes, num_tokens=KS[-1], ar_guidance_scale=3.0, generator=g)
        ids = sampled if ar else pipe.tokenize(images, generator=g)
        noise = pipe.prepare_latents(n, spec["size"], spec["size"], torch.float32, "cpu", g)
        outs = [pipe.detokenize(ids[:, :k], latents=noise, num_inference_steps=d["steps"],
                                guidance_scale=d["guidance"]).images for k in KS]
        for i in range(n):
            rows.append((i, label, [im[i].resize((spec["size"] * scale,) * 2, PIL.Image.NEAREST) for im in outs]))
    rows.sort(key=lambda r: r[0])
    what = " (AR)" if ar else ""
    return [r[2] for r in rows], [("teacher 25" if "teacher" in r[1] else "student 4") + what for r in rows]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", nargs="+", default=list(SETS), choices=list(SETS))
    ap.add_argument("--num-images", type=int, help="use N held-out images spread over the set (default: all)")
    ap.add_argument("--num-samples", type=int, default=500, help="AR samples per decoder (fashion)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--timing-batch", type=int, default=32)
    ap.add_argument("--agreement-images", type=int, default=256,
                    help="images on which PSNR against the 25-step teacher's reconstruction is measured")
    ap.add_argument("--json", help="write all results here")
    ap.add_argument("--picture", help="teacher 25 steps vs student 4 steps per k (PNG)")
    ap.add_argument("--quick", action="store_true", help="8 images, 20 AR samples, no picture")
    args = ap.parse_args(argv)
    if args.quick:
        args.num_images, args.num_samples, args.picture, args.timing_batch = 8, 20, None, 8
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    machine = (f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}; "
               f"torch {torch.__version__}, python {platform.python_version()}")
    print(machine)
    features = build_feature_net("effnet-lite0")
    report = {"machine": machine, "sets": {}}
    grid_rows, grid_labels = [], []
    for name in args.sets:
        spec = SETS[name]
        images = load_batch([spec["images"]], spec["size"], spec["fit"], None)
        if args.num_images and args.num_images < len(images):  # every (N/n)-th: all classes / photos stay in
            images = images[torch.linspace(0, len(images) - 1, args.num_images).long()]
        decs = decoders(spec)
        results = []
        for d in decs:
            ref_out = results[0]["outputs"] if results else None
            results.append(measure_decoder(d, images, spec, features, args, ref_out))
            print(f"  {name}: {d['label']} measured ({results[-1]['eval_seconds']:.0f} s)", flush=True)
        ref = results[0]
        print(f"\n## {name}: {len(images)} held-out images, {spec['size']} px; reference = teacher 25 steps, "
              f"guidance {TEACHER_GUIDANCE} APG\n")
        print(table(results, ref) + "\n")
        print("\n".join(targets(results, ref)) + "\n")
        entry = {"num_images": len(images), "agreement_images": min(len(images), args.agreement_images),
                 "results": [{k: v for k, v in r.items() if k != "outputs"} for r in results],
                 "targets": targets(results, ref)}
        if name == "fashion":
            entry["generation"] = generation(spec, decs, features, args)
            for gres in entry["generation"]:
                print(f"AR samples ({args.num_samples}, AR guidance 3) decoded by {gres['label']}: KID x1e3 at "
                      f"k={KS}: " + ", ".join(f"{gres['per_k'][k]['kid'] * 1e3:.1f}" for k in KS) + "; FID: "
                      + ", ".join(f"{gres['per_k'][k]['fid']:.1f}" for k in KS))
        report["sets"][name] = entry
        if args.picture:
            for ar in ([False, True] if name == "fashion" else [False]):
                rows, labels = picture_rows(spec, results, 3, 2 if spec["size"] >= 64 else 4, ar)
                grid_rows += rows
                grid_labels += [f"{name} {lab}" for lab in labels]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    if args.picture and grid_rows:
        width = max(r[0].size[0] for r in grid_rows)
        grid_rows = [[im if im.size[0] == width else im.resize((width, width), PIL.Image.NEAREST) for im in r]
                     for r in grid_rows]
        save_image_atomic(labelled_grid(grid_rows, [f"k={k}" for k in KS], row_labels=grid_labels), args.picture)
        print(f"wrote {args.picture}")


if __name__ == "__main__":
    main()
