"""Automatic token budget on the demo sets: tokens saved by choosing k per image instead of one fixed k.

For each set, every image is tokenized once (posterior mean) and decoded from its first k tokens for every
candidate k (1, 2, 4, ..., N), image i always from the same initial noise (seed 0: ``torch.Generator`` seeded i),
and scored with PSNR, SSIM and ST-LPIPS (when its wheel is installed) against the input. Then, for a few targets
per metric:

* ``fixed k``: the smallest candidate at which *every* image reaches the target (the worst image decides; this is
  what a single token budget for the whole set needs to guarantee the target);
* ``auto``: the mean over images of each image's own smallest candidate that reaches it (the rule of
  ``FlexTokPipeline.choose_num_tokens``); with targets that the fixed k meets for every image, every image reaches
  the target in both cases, so the comparison is at equal worst-case quality;
* ``saved``: 1 - auto / fixed k;
* ``passes``: decoder runs per image that ``choose_num_tokens`` needs: ascending search (exact) and bisect, and
  whether bisect picks the same k for every image; the exhaustive table itself costs len(candidates) per image.

The targets are the worst image's score at each fixed k (floored to 0.5 dB / 0.01 SSIM, ceiled to 0.01 ST-LPIPS),
skipping repeats. The search itself (``choose_tokens``) is run for every target and checked against the table.

Sets: ``photos`` (the 3 sample photos, centre crop, 64 px), ``photo tiles`` (the 4 x 4 grid of 64-px tiles of the
same photos at 256 px: 48 images of varied content, in the demo tokenizer's training distribution of crops), both with
``demo_models/photo_tokenizer``; ``fashion`` (the 20 Fashion-MNIST test items of ``demo_models/fashion_samples``,
32 px) with ``demo_models/fashion_ar``. Decoder: 25 Euler steps, guidance 3 with APG (the model cards' settings).

Usage::

    python benchmarks/token_budget.py [--steps 25] [--json out.json] [--picture docs/token_budget.png] [--sets ...]
    python benchmarks/token_budget.py --quick        # 4 steps, no picture: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from flextok_kit.flextok_core.nested_dropout import pow2_token_counts
from flextok_kit.images import load_batch
from flextok_kit.pipelines import FlexTokPipeline
from flextok_kit.pipelines.image_grid import labelled_grid, save_image_atomic
from flextok_kit.pipelines.token_budget import METRICS, choose_tokens

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "demo_models"
STEP = {"psnr": 0.5, "ssim": 0.01, "lpips": 0.01}


def photo_tiles() -> torch.Tensor:
    full = load_batch(DEMO / "samples", 256, "center-crop")
    return torch.stack([im[:, 64 * r:64 * r + 64, 64 * c:64 * c + 64] for im in full for r in range(4)
                        for c in range(4)])


def sets():
    return [("photos", "photo_tokenizer", lambda: load_batch(DEMO / "samples", 64, "center-crop")),
            ("photo tiles", "photo_tokenizer", photo_tiles),
            ("fashion", "fashion_ar", lambda: load_batch(DEMO / "fashion_samples", 32, "center-crop"))]


def noise_for(pipe, x):
    h, w = x.shape[-2:]
    return pipe.prepare_latents(x.shape[0], h, w, torch.float32, "cpu",
                                [torch.Generator().manual_seed(i) for i in range(x.shape[0])])


def score_table(pipe, x, ids, noise, ks, metrics, decode_kw, batch=64) -> dict:
    """{metric: [B, len(ks)]} for every image at every candidate."""
    pairs = [(i, k) for i in range(x.shape[0]) for k in ks]
    out = {m: [] for m in metrics}
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        rows = [i for i, _ in chunk]
        images = pipe.detokenize([ids[i, :k] for i, k in chunk], latents=noise[rows], output_type="pt",
                                 **decode_kw).images * 2 - 1
        for m in metrics:
            out[m].append(METRICS[m].fn(images, x[rows]).reshape(-1).double())
    return {m: torch.cat(v).reshape(x.shape[0], len(ks)).numpy() for m, v in out.items()}


def rule(table, ks, target, higher):
    reach = table >= target if higher else table <= target
    return [ks[int(np.argmax(r))] if r.any() else ks[-1] for r in reach]


def targets_for(table, ks, metric) -> list[float]:
    """The worst image's score at each fixed k > 1, rounded towards easier, from easy to hard; targets that every
    image reaches at k = 1 are left out (nothing to save)."""
    higher, step = METRICS[metric].higher_is_better, STEP[metric]
    worst = table.min(0) if higher else table.max(0)
    rounding = math.floor if higher else math.ceil
    targets = {round(rounding(value / step) * step, 4) for value in worst[1:]}
    reached_at_1 = (lambda t: worst[0] >= t) if higher else (lambda t: worst[0] <= t)  # noqa: E731
    return sorted((t for t in targets if not reached_at_1(t)), reverse=not higher)


def evaluate(name, pipe, x, ks, metrics, decode_kw) -> dict:
    ids = pipe.tokenize(x, sample_posterior=False)
    noise = noise_for(pipe, x)
    t0 = time.perf_counter()
    tables = score_table(pipe, x, ids, noise, ks, metrics, decode_kw)
    seconds = time.perf_counter() - t0
    rows = []
    for metric in metrics:
        higher = METRICS[metric].higher_is_better
        for target in targets_for(tables[metric], ks, metric):
            expected = rule(tables[metric], ks, target, higher)
            worst_ok = [(tables[metric][:, j] >= target).all() if higher else (tables[metric][:, j] <= target).all()
                        for j in range(len(ks))]
            fixed = ks[worst_ok.index(True)] if any(worst_ok) else None
            found = {s: choose_tokens(pipe, x, target, metric, ks, ids=ids, latents=noise, search=s, **decode_kw)
                     for s in ("ascending", "bisect")}
            rows.append({
                "metric": metric, "target": target, "fixed_k": fixed, "auto_mean_k": float(np.mean(expected)),
                "saved": None if fixed is None else 1 - float(np.mean(expected)) / fixed,
                "histogram": {k: expected.count(k) for k in ks},
                "search_equals_rule": found["ascending"].num_tokens == expected,
                "search_differs_at": [i for i, (a, b) in enumerate(zip(found["ascending"].num_tokens, expected))
                                      if a != b],
                "passes_ascending": float(np.mean(found["ascending"].decoder_passes)),
                "passes_bisect": float(np.mean(found["bisect"].decoder_passes)),
                "bisect_same": sum(a == b for a, b in zip(found["bisect"].num_tokens, expected)),
                "chosen": expected})
    monotone = {m: int((np.diff(t, axis=1) >= 0).all(1).sum() if METRICS[m].higher_is_better
                       else (np.diff(t, axis=1) <= 0).all(1).sum()) for m, t in tables.items()}
    return {"set": name, "images": int(x.shape[0]), "size": int(x.shape[-1]), "candidates": ks, "rows": rows,
            "monotone_images": monotone, "table_seconds": seconds,
            "mean_scores": {m: t.mean(0).round(4).tolist() for m, t in tables.items()}, "ids": ids, "noise": noise}


def picture(pipe, x, res, metric, target, path: Path, decode_kw, per_row=7, tile=64):
    """Input | reconstruction at the chosen k, one row per chosen k (small to large; the first ``per_row`` images
    of each, in input order; the label counts them all)."""
    row = next(r for r in res["rows"] if r["metric"] == metric and r["target"] == target)
    chosen = row["chosen"]
    ids, noise = res["ids"], res["noise"]
    recon = pipe.detokenize([ids[i, :k] for i, k in enumerate(chosen)], latents=noise, output_type="pil",
                            **decode_kw).images
    to_pil = lambda t: PIL.Image.fromarray(((t.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())  # noqa: E731
    blank = PIL.Image.new("RGB", (tile, tile), "white")
    rows, labels = [], []
    for k in res["candidates"]:
        members = [i for i, c in enumerate(chosen) if c == k]
        if not members:
            continue
        part = members[:per_row]
        cells = [im.resize((tile, tile), PIL.Image.NEAREST) for i in part for im in (to_pil(x[i]), recon[i])]
        rows.append(cells + [blank] * (2 * per_row - len(cells)))
        labels.append(f"k={k}: {len(members)}")
    cols = [t for _ in range(per_row) for t in ("input", "decoded")]
    save_image_atomic(labelled_grid(rows, cols, row_labels=labels), path)
    return path


def markdown(res) -> str:
    lines = [f"**{res['set']}** ({res['images']} images, {res['size']} px; candidates {res['candidates']})", "",
             "| metric | target | fixed k (every image) | auto: mean k | tokens saved | chosen k: images at "
             + " / ".join(map(str, res["candidates"])) + " | decoder passes / image: ascending, bisect | "
             "bisect = rule |", "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        fixed = "-" if r["fixed_k"] is None else str(r["fixed_k"])
        saved = "-" if r["saved"] is None else f"{100 * r['saved']:.0f} %"
        op = "≥" if METRICS[r["metric"]].higher_is_better else "≤"
        lines.append(f"| {r['metric']} | {op} {r['target']:g} | {fixed} | {r['auto_mean_k']:.2f} | {saved} | "
                     f"{' / '.join(str(r['histogram'][k]) for k in res['candidates'])} | "
                     f"{r['passes_ascending']:.2f}, {r['passes_bisect']:.2f} | {r['bisect_same']}/{res['images']} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json")
    ap.add_argument("--picture", help="write the picture of the fashion set (images grouped by chosen k) here")
    ap.add_argument("--sets", nargs="+", choices=[name for name, _, _ in sets()], help="default: all")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = 4 if a.quick else a.steps
    decode_kw = dict(num_inference_steps=steps, guidance_scale=a.guidance, use_apg=True)
    try:
        METRICS["lpips"].fn(torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32))
        metrics = ["psnr", "ssim", "lpips"]
    except ImportError:
        metrics = ["psnr", "ssim"]
    print(f"# token budget on the demo sets: torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{a.threads} threads, {steps} steps, guidance {a.guidance} APG, metrics {metrics}\n")
    results, pipes = [], {}
    for name, model, images in sets():
        if a.sets and name not in a.sets:
            continue
        pipe = pipes.get(model) or FlexTokPipeline.from_pretrained(DEMO / model)
        pipe.set_progress_bar_config(disable=True)
        pipes[model] = pipe
        x = images()
        res = evaluate(name, pipe, x, pow2_token_counts(pipe.num_registers), metrics, decode_kw)
        results.append(res)
        print(markdown(res))
        print(f"\nimages whose score never gets worse with more tokens: {res['monotone_images']} of {res['images']}; "
              f"search == exhaustive rule for every target: {all(r['search_equals_rule'] for r in res['rows'])}; "
              f"table {res['table_seconds']:.1f} s\n")
        if a.picture and not a.quick and name == "fashion":  # the hardest PSNR target with a fixed k
            best = [r for r in res["rows"] if r["metric"] == "psnr" and r["fixed_k"]][-1]
            path = picture(pipe, x, res, "psnr", best["target"], Path(a.picture), decode_kw)
            print(f"wrote {path} (psnr >= {best['target']:g})\n")
    if a.json:
        drop = ("ids", "noise")
        Path(a.json).write_text(json.dumps([{k: v for k, v in r.items() if k not in drop} for r in results], indent=1))


if __name__ == "__main__":
    main()
