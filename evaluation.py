"""Evaluation harness behind ``flextok eval``: quality versus the number of tokens.

* **Reconstruction** (a folder of images): PSNR, SSIM and a perceptual distance (ST-LPIPS from the
  ``stlpips-pytorch`` wheel when installed) per token budget, plus the VAE alone (the ceiling), and rFID / KID
  between the reconstructions and the inputs.
* **Generation** (a pipeline with an AR model + a reference folder): FID / KID of AR samples decoded from their
  first k tokens against the reference images, per token budget.

The metrics and the FID / KID feature networks are those of ``metrics.py`` (shared with the training scripts);
**numbers from any feature network other than the standard Inception are not comparable to published FID/KID**, and
every table and JSON says which network was used. Images are loaded and fitted by ``images.py``
(``images.load_batch``). ``training/eval_reconstruction.py`` (the config-driven evaluation of a training run)
calls :func:`evaluate_reconstruction`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .flextok_core.nested_dropout import pow2_token_counts
from .metrics import FeatureNet, fid, kid, psnr, resolve_perceptual, ssim, to_uint8


# -- reconstruction -----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_reconstruction(pipe, images: torch.Tensor, token_counts=None, num_inference_steps: int = 25,
                            guidance_scales=(1.0,), use_apg: bool = True, perceptual: str = "auto",
                            feature_net: FeatureNet | None = None, batch_size: int = 16, seed: int = 0,
                            kid_subset_size: int = 1000, progress: Callable[[str], None] | None = None) -> dict:
    """``images`` [N,3,H,W] in [-1,1] -> ``{"rows": [...], "perceptual": name, "features": name|None, ...}``.

    Each image is tokenized once (seeded); every prefix k of its tokens is decoded from the same initial noise.
    Rows: ``{"kind": "vae"|"tokens", "tokens", "guidance_scale", "psnr", "ssim", "perceptual", "fid", "kid",
    "kid_std"}`` (means over the images; FID/KID between the reconstructions and the inputs)."""
    device = pipe._execution_device
    n_reg = pipe.num_registers
    counts = sorted(set(token_counts or pow2_token_counts(n_reg)))
    if counts[0] < 1 or counts[-1] > n_reg:
        raise ValueError(f"token counts {counts}: this model decodes 1..{n_reg} tokens")
    net, pname = resolve_perceptual(perceptual)
    if net is not None:
        net.to(device)
    scales = [float(s) for s in (guidance_scales if isinstance(guidance_scales, (list, tuple)) else [guidance_scales])]
    acc: dict = {}
    recon_u8: dict = {}

    def add(key, recon, x):
        r = acc.setdefault(key, {"psnr": [], "ssim": [], "perceptual": []})
        r["psnr"].append(psnr(recon, x).cpu())
        r["ssim"].append(ssim(recon, x).cpu())
        if net is not None:
            r["perceptual"].append(net(recon.float(), x.float()).flatten().cpu())
        if feature_net is not None:
            recon_u8.setdefault(key, []).append(to_uint8(recon))

    n = len(images)
    for start in range(0, n, batch_size):
        x = images[start:start + batch_size].to(device).float()
        g = torch.Generator(device=device).manual_seed(seed + start)
        latents = pipe.vae.encode(x.to(pipe.vae.dtype)).latent_dist.mode()
        add(("vae", 0, None), pipe.vae.decode(latents).sample.float().clamp(-1, 1), x)
        ids = pipe.tokenize(x, generator=g)
        noise = torch.randn(x.shape[0], pipe.flextok.config.latent_channels, x.shape[2] // pipe.vae_scale_factor,
                            x.shape[3] // pipe.vae_scale_factor, generator=g, device=device)
        for s in scales:
            for k in counts:
                out = pipe.detokenize(ids[:, :k], num_inference_steps=num_inference_steps, guidance_scale=s,
                                      use_apg=use_apg, latents=noise, output_type="pt").images
                add(("tokens", k, s), out.to(device).float() * 2 - 1, x)
        if progress:
            progress(f"reconstructed {min(n, start + batch_size)} / {n} images")

    ref_feats = feature_net(to_uint8(images)) if feature_net is not None else None
    rows = []
    for (kind, k, s), r in acc.items():
        row = {"kind": kind, "tokens": k, "guidance_scale": s,
               "psnr": float(torch.cat(r["psnr"]).mean()), "ssim": float(torch.cat(r["ssim"]).mean()),
               "perceptual": float(torch.cat(r["perceptual"]).mean()) if r["perceptual"] else None,
               "fid": None, "kid": None, "kid_std": None}
        if feature_net is not None:
            f = feature_net(torch.cat(recon_u8[(kind, k, s)]))
            row["fid"] = fid(f, ref_feats)
            row["kid"], row["kid_std"] = kid(f, ref_feats, subset_size=kid_subset_size, seed=seed)
        rows.append(row)
    return {"task": "reconstruction", "num_images": n, "image_size": list(images.shape[2:]),
            "num_inference_steps": num_inference_steps, "use_apg": use_apg, "perceptual": pname,
            "features": feature_net.name if feature_net else None,
            "features_note": feature_net.note if feature_net else None, "rows": rows}


# -- generation -------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_generation(pipe, reference: torch.Tensor, feature_net: FeatureNet, token_counts=None,
                        num_samples: int = 100, class_labels=None, prompts=None, ar_guidance_scale: float = 4.0,
                        temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                        num_inference_steps: int = 25, guidance_scale: float = 7.5, use_apg: bool = True,
                        batch_size: int = 16, seed: int = 0, kid_subset_size: int = 1000,
                        progress: Callable[[str], None] | None = None) -> dict:
    """FID / KID of ``num_samples`` AR samples, decoded from their first k tokens, against ``reference`` images
    ([M,3,H,W] in [-1,1], generated at the same size). Conditions cycle through ``class_labels`` (default: every class
    of the AR model) or ``prompts``. Each sample's prefixes share one initial noise."""
    if pipe.ar_model is None:
        raise ValueError("this pipeline has no AR model: generation metrics need one")
    limit = min(pipe.ar_model.config.max_tokens, pipe.num_registers)
    counts = sorted(set(token_counts or pow2_token_counts(limit)))
    if counts[0] < 1 or counts[-1] > limit:
        raise ValueError(f"token counts {counts}: this AR model generates 1..{limit} tokens")
    if prompts is None and class_labels is None:
        if pipe.ar_model.is_text_conditional:
            raise ValueError("text-conditional AR model: pass prompts")
        class_labels = list(range(pipe.ar_model.config.num_classes))
    conditions = list(prompts if prompts is not None else class_labels)
    size_h, size_w = reference.shape[2:]
    device = pipe._execution_device
    g = torch.Generator().manual_seed(seed)
    feats: dict = {k: [] for k in counts}
    for start in range(0, num_samples, batch_size):
        m = min(batch_size, num_samples - start)
        cond = [conditions[(start + i) % len(conditions)] for i in range(m)]
        ids = pipe.generate_tokens(class_labels=cond if prompts is None else None,
                                   prompt=cond if prompts is not None else None, num_tokens=counts[-1],
                                   ar_guidance_scale=ar_guidance_scale, temperature=temperature, top_k=top_k,
                                   top_p=top_p, generator=g)
        noise = pipe.prepare_latents(m, size_h, size_w, torch.float32, device, g)
        for k in counts:
            out = pipe.detokenize(ids[:, :k], latents=noise, height=size_h, width=size_w,
                                  num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                  use_apg=use_apg, output_type="pt").images
            feats[k].append(feature_net(to_uint8(out.float() * 2 - 1)))
        if progress:
            progress(f"generated {start + m} / {num_samples} samples")
    ref = feature_net(to_uint8(reference))
    rows = []
    for k in counts:
        f = np.concatenate(feats[k])
        kv, ks = kid(f, ref, subset_size=kid_subset_size, seed=seed)
        rows.append({"kind": "generation", "tokens": k, "guidance_scale": guidance_scale, "psnr": None, "ssim": None,
                     "perceptual": None, "fid": fid(f, ref), "kid": kv, "kid_std": ks})
    return {"task": "generation", "num_samples": num_samples, "num_reference": len(reference),
            "image_size": [size_h, size_w], "num_inference_steps": num_inference_steps,
            "ar_guidance_scale": ar_guidance_scale, "features": feature_net.name, "features_note": feature_net.note,
            "rows": rows}


# -- table and plot ---------------------------------------------------------------------------------
METRICS = [("psnr", "PSNR (dB)", "higher is better", "{:.2f}"), ("ssim", "SSIM", "higher is better", "{:.4f}"),
           ("perceptual", "perceptual", "lower is better", "{:.4f}"), ("fid", "FID", "lower is better", "{:.2f}"),
           ("kid", "KID x1e3", "lower is better", "{:.2f}")]


def _value(row, key):
    v = row.get(key)
    return None if v is None else (v * 1e3 if key == "kid" else v)


def format_table(result: dict) -> str:
    """Markdown table of one :func:`evaluate_reconstruction` / :func:`evaluate_generation` result."""
    rows = result["rows"]
    metrics = [m for m in METRICS if any(r.get(m[0]) is not None for r in rows)]
    names = {"perceptual": result.get("perceptual") or "perceptual", "fid": f"FID ({result.get('features')})",
             "kid": f"KID x1e3 ({result.get('features')})"}
    head = ["tokens", "guidance"] + [names.get(m[0], m[1]) for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = ["VAE only" if r["kind"] == "vae" else str(r["tokens"]),
                 "-" if r.get("guidance_scale") is None else f"{r['guidance_scale']:g}"]
        for key, _, _, fmt in metrics:
            v = _value(r, key)
            cell = "-" if v is None else ("inf" if math.isinf(v) else fmt.format(v))
            if key == "kid" and r.get("kid_std") is not None:
                cell += f" ± {r['kid_std'] * 1e3:.2f}"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("features_note"):
        lines.append(f"\nFID/KID features: {result['features']}, {result['features_note']}.")
    return "\n".join(lines)


def plot_metrics(results: list[dict], path, title: str = "") -> Path:
    """One panel per metric (x: tokens, log2 axis; one line per guidance scale / task; the VAE-only value as a
    dashed line), drawn with PIL (no matplotlib needed). Returns the path written."""
    import PIL.Image
    import PIL.ImageDraw

    from .pipelines.image_grid import save_image_atomic

    series: dict = {}   # metric -> {label: [(k, v)]}
    ceilings: dict = {}
    for res in results:
        for r in res["rows"]:
            for key, *_ in METRICS:
                v = _value(r, key)
                if v is None or not math.isfinite(v):
                    continue
                if r["kind"] == "vae":
                    ceilings[key] = v
                    continue
                label = ("generation" if r["kind"] == "generation" else "reconstruction") + \
                    (f", guidance {r['guidance_scale']:g}" if r.get("guidance_scale") is not None else "")
                series.setdefault(key, {}).setdefault(label, []).append((r["tokens"], v))
    metrics = [m for m in METRICS if m[0] in series]
    if not metrics:
        raise ValueError("no finite metric values to plot")
    pw, ph, ml, mr, mt, mb = 300, 220, 52, 12, 34, 34
    cols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / cols)
    legend_labels = sorted({lab for s in series.values() for lab in s})
    top = 22 if title else 4
    legend_h = 16 * len(legend_labels) + 8
    img = PIL.Image.new("RGB", (cols * pw, top + nrows * ph + legend_h), "white")
    d = PIL.ImageDraw.Draw(img)
    if title:
        d.text((8, 5), title, fill="black")
    palette = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    color = {lab: palette[i % len(palette)] for i, lab in enumerate(legend_labels)}
    for idx, (key, label, better, fmt) in enumerate(metrics):
        ox, oy = (idx % cols) * pw, top + (idx // cols) * ph
        x0, y0, x1, y1 = ox + ml, oy + mt, ox + pw - mr, oy + ph - mb
        pts = [p for s in series[key].values() for p in s]
        ks = sorted({k for k, _ in pts})
        vals = [v for _, v in pts] + ([ceilings[key]] if key in ceilings else [])
        lo, hi = min(vals), max(vals)
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5 * (abs(lo) + 1e-3), hi + 0.5 * (abs(hi) + 1e-3)
        pad = 0.06 * (hi - lo)
        lo, hi = lo - pad, hi + pad
        lk, hk = math.log2(ks[0]), math.log2(ks[-1])
        fx = lambda k: x0 + (x1 - x0) * (0.5 if hk == lk else (math.log2(k) - lk) / (hk - lk))  # noqa: E731
        fy = lambda v: y1 - (y1 - y0) * (v - lo) / (hi - lo)  # noqa: E731
        d.text((x0, oy + 6), f"{label} ({better})", fill="black")
        d.rectangle((x0, y0, x1, y1), outline=(120, 120, 120))
        for t in range(5):
            v = lo + (hi - lo) * t / 4
            y = fy(v)
            d.line((x0 - 3, y, x0, y), fill="black")
            d.line((x0 + 1, y, x1 - 1, y), fill=(235, 235, 235))
            d.text((ox + 2, y - 6), fmt.format(v)[:7], fill="black")
        for k in ks:
            d.line((fx(k), y1, fx(k), y1 + 3), fill="black")
            d.text((fx(k) - 3 * len(str(k)), y1 + 5), str(k), fill="black")
        d.text(((x0 + x1) // 2 - 18, y1 + 18), "tokens", fill="black")
        if key in ceilings:
            y = fy(ceilings[key])
            for xs in range(int(x0), int(x1), 8):
                d.line((xs, y, min(xs + 4, x1), y), fill=(90, 90, 90))
            d.text((x1 - 56, y - 12), "VAE only", fill=(90, 90, 90))
        for lab, s in series[key].items():
            s = sorted(s)
            xy = [(fx(k), fy(v)) for k, v in s]
            if len(xy) > 1:
                d.line(xy, fill=color[lab], width=2)
            for x, y in xy:
                d.ellipse((x - 3, y - 3, x + 3, y + 3), fill=color[lab])
    ly = top + nrows * ph + 4
    for i, lab in enumerate(legend_labels):
        d.line((10, ly + 16 * i + 7, 34, ly + 16 * i + 7), fill=color[lab], width=3)
        d.text((40, ly + 16 * i), lab, fill="black")
    path = Path(path)
    save_image_atomic(img, path)
    return path


def write_json(results: list[dict], path) -> Path:
    from .flextok_core.fileio import atomic_write

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v

    path = Path(path)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(clean(results), indent=1) + "\n"))
    return path
