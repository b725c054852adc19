"""Detokenize speed: plain decoder path vs the exact fast path (collapsed mask / null registers).

Builds a d12-d12-sized FlexTokModel and a real-size diffusers AutoencoderKL with random weights (no checkpoint
needed), then times ``FlexTokPipeline.detokenize`` at k = 256 and k = 16 tokens with ``fast_decoding=False``
(the official computation: P + N registers in both the conditional and the unconditional pass) and
``fast_decoding=True`` (P + k + 1 conditional, P + 1 unconditional), with the same token ids and the same initial
noise, checks that both paths give the same result, and times ``tokenize``.

Usage::

    python benchmarks/decode_speed.py            # full run: d12-d12, 256x256, 25 steps, 2 threads (minutes)
    python benchmarks/decode_speed.py --quick    # tiny model, few steps: checks the script runs (seconds)
    python benchmarks/decode_speed.py --dtype bfloat16      # + the bf16 fast path vs the float32 paths
    python benchmarks/decode_speed.py --dtype bfloat16 --batches 1,4,8 --steps 10 --ks 256
                                                 # cost per image vs batch size, both dtypes

With ``--dtype bfloat16`` (or float16) every k also runs the fast path in that dtype (``pipe.set_precision``, the
path of the CLI's ``--dtype`` and the ComfyUI Load node), from the same weights and noise, and tokenize runs in
both dtypes. The summary gives its speed-up over the float32 plain path (the issue-14 targets: >= 4.5x at k=256,
>= 6x at k=16, tokenize >= 2.5x) and over the float32 fast path, the image deviation from the float32 fast path
(max and mean |difference| in [0, 1]; targets <= 2e-2 and <= 2e-3), the share of token ids that agree, and the
machine's own bf16/fp32 matmul ratio and AMX / AVX512-BF16 flags (cpu_report.py), without which a ratio from a
CPU without AMX cannot be read.

What the numbers mean
---------------------
* ``total s``: wall time of one ``detokenize(..., output_type="pt")`` call after warm-up (a ``--warmup-steps``
  latent-only call with the same k and path, then one VAE decode). ``loop s`` is the part up to the end of the
  last denoising step (registers + all decoder forwards + guidance + scheduler), ``vae s`` the rest (VAE decode +
  postprocess); the split comes from the step-end callback's timestamp. With ``--repeats`` > 1 the fastest call
  is reported. ``GFLOP`` = analytic decoder FLOPs of all steps + the VAE decode's (counted on a meta-device
  copy); ``loop GFLOP/s`` = decoder FLOPs / ``loop s``.
* ``cpu s``, ``cpu/wall``: process CPU time of the timed call, and its ratio to the wall time. With
  ``--threads 2`` on an idle 2-core machine cpu/wall is close to 2; clearly lower means the process did not get
  its cores (other processes competing) and the row is unreliable. Under such contention multi-threaded runs
  degrade far more than proportionally (OpenMP threads wait for each other at every op), and CPU time then
  includes spin-waiting; ``--threads 1`` gives much more stable numbers on a shared machine.
* summary: ``ideal loop`` is the ratio of the loops' FLOPs (the block matmuls scale linearly with the token
  count); ``expected`` is the plain/fast ratio of ``total s`` if the fast loop ran at the plain loop's GFLOP/s,
  using the measured VAE times.
* memory: resident set size (RSS, from ``/proc/self/status``). Each configuration runs in a fresh process
  (``--isolate``, the default for full runs). ``peak RSS`` is the process's high-water RSS over the warm-up and
  timed calls; ``+loop`` is the high-water mark after the latent-only warm-up call minus the RSS just before it
  (model weights, ids and noise already resident): the extra memory of the denoising loop; ``+total`` is the
  same for the whole measurement, VAE decode included. The high-water mark is reset via
  ``/proc/self/clear_refs`` where the kernel allows it (otherwise ``ru_maxrss``, which then also covers model
  construction). Without isolation (``--no-isolate``, the default with ``--quick``) memory freed by earlier runs
  may be reused from the allocator's cache, so the ``+`` figures can understate.
* agreement: max |plain - fast| of the final latents (the VAE decoder's input, captured by the step-end callback
  of the timed calls) and of the ``pt`` images in [0, 1].
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import re
import resource
import sys
import time
from concurrent.futures import ProcessPoolExecutor

# ----------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------
FULL_MODEL = dict(
    latent_channels=16, patch_size=2, grid_size=(16, 16), num_registers=256,
    encoder_dim=768, encoder_depth=12, encoder_head_dim=64,
    decoder_dim=768, decoder_depth=12, decoder_head_dim=64,
)
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)

QUICK_MODEL = dict(
    latent_channels=16, patch_size=2, grid_size=(16, 16), num_registers=256,
    encoder_dim=64, encoder_depth=2, encoder_head_dim=32,
    decoder_dim=64, decoder_depth=2, decoder_head_dim=32,
)
QUICK_VAE = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="tiny model and VAE, 128x128, 3 steps, 1 thread, in-process: checks the script runs in seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default 2; 1 with --quick, whose ops are too small to share)")
    p.add_argument("--batch", type=int, default=1, help="detokenize batch size (default 1)")
    p.add_argument("--size", type=int, default=None, help="image height = width (default 256; 128 with --quick)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 25; 3 with --quick)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps of the warm-up call (default 2; 1 quick)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--no-apg", action="store_true", help="plain CFG instead of APG")
    p.add_argument("--ks", default="256,16", help="comma-separated token counts to decode (default 256,16)")
    p.add_argument("--repeats", type=int, default=1, help="timed detokenize calls per configuration, fastest reported (default 1)")
    p.add_argument("--tok-batch", type=int, default=None, help="tokenize batch size (default 4; 2 with --quick)")
    p.add_argument("--tok-ks", default="256,16", help="comma-separated num_tokens for tokenize, '' to skip (default 256,16)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, ids, noise and images (default 0)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="also run the fast path (and tokenize) in this dtype and compare it with float32")
    p.add_argument("--batches", default="",
                   help="comma-separated batch sizes: instead of the path comparison, the cost per image of the fast "
                        "path (detokenize at --ks, tokenize) at each batch size, in float32 and --dtype")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="run every configuration in a fresh spawned process (default: yes, no with --quick)")
    args = p.parse_args(argv)
    q = args.quick
    args.threads = args.threads or (1 if q else 2)
    args.size = args.size or (128 if q else 256)
    args.steps = args.steps or (3 if q else 25)
    args.warmup_steps = args.warmup_steps or (1 if q else 2)
    args.tok_batch = args.tok_batch or (2 if q else 4)
    args.isolate = (not q) if args.isolate is None else args.isolate
    args.ks = [int(k) for k in args.ks.split(",") if k.strip()]
    args.tok_ks = [int(k) for k in args.tok_ks.split(",") if k.strip()]
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.dtypes = ["float32"] + ([args.dtype] if args.dtype != "float32" else [])
    args.model = dict(QUICK_MODEL if q else FULL_MODEL)
    args.vae = dict(QUICK_VAE if q else FULL_VAE)
    return args


# ----------------------------------------------------------------------------------------------------------
# memory helpers (Linux /proc; ru_maxrss fallback)
# ----------------------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def rss_mib() -> float:
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS; False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    kib = _status_kib("VmHWM")
    if kib is None:  # ru_maxrss is KiB on Linux, bytes on macOS
        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        if sys.platform == "darwin":
            kib /= 1024
    return kib / 1024


# ----------------------------------------------------------------------------------------------------------
# model construction (deterministic in the seed, so every process builds the same weights)
# ----------------------------------------------------------------------------------------------------------
def build_pipeline(args, dtype: str = "float32"):
    import torch
    from diffusers import AutoencoderKL
    from flextok_kit.flextok_core import FlexTokModel
    from flextok_kit.pipelines import FlexTokPipeline

    torch.manual_seed(args.seed)
    vae_cfg = args.vae
    n_blocks = len(vae_cfg["block_out_channels"])
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n_blocks, up_block_types=("UpDecoderBlock2D",) * n_blocks,
        block_out_channels=vae_cfg["block_out_channels"], layers_per_block=vae_cfg["layers_per_block"],
        norm_num_groups=vae_cfg["norm_num_groups"], latent_channels=args.model["latent_channels"],
        sample_size=args.size,
    )
    model = FlexTokModel(**args.model)
    # Default nn.Linear init everywhere (the decoder's adaLN / final_adaLN / proj_out are plain nn.Linear, so not
    # zero). The learned tables that start as zeros get small random values so that registers, mask token and
    # null condition are distinct vectors, as in a trained model.
    with torch.no_grad():
        for name in ("encoder.registers", "decoder.register_pos_embed", "decoder.mask_token", "decoder.null_cond"):
            param = model.get_parameter(name)
            torch.nn.init.trunc_normal_(param, std=0.02)
    for name, m in model.named_modules():
        if name.endswith("adaLN") and isinstance(m, torch.nn.Linear):
            assert m.weight.abs().sum() > 0, f"{name} is all-zero"
    pipe = FlexTokPipeline(vae=vae.eval(), flextok=model.eval(), scheduler=FlexTokPipeline.default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe.set_precision(getattr(torch, dtype))  # the CLI's --dtype path (float32: unchanged)


def decode_inputs(args, pipe, k):
    """Token ids ``[B, k]`` (uniform random, fixed by the seed) and the initial noise ``[B, C, h, w]``."""
    import torch

    g = torch.Generator().manual_seed(args.seed + 1)
    ids_full = torch.randint(0, pipe.flextok.vocab_size, (args.batch, pipe.num_registers), generator=g)
    lat = args.size // pipe.vae_scale_factor
    noise = torch.randn(args.batch, args.model["latent_channels"], lat, lat, generator=g)
    return ids_full[:, :k], noise


def seq_lengths(args, k: int, fast: bool) -> list[int]:
    """Decoder tokens per sample and pass: ``[cond]`` or ``[cond, uncond]`` (patches + registers)."""
    lat = args.size // 2 ** (len(args.vae["block_out_channels"]) - 1)
    p = (lat // args.model["patch_size"]) ** 2
    n = args.model["num_registers"]
    cond = p + (min(n, k + 1) if fast else n)
    return [cond] if args.guidance == 1.0 else [cond, p + (1 if fast else n)]


def decoder_gflop(args, k: int, fast: bool) -> float:
    """Analytic GFLOP of one decoder forward (all passes): block matmuls + attention (QK^T, AV) + adaLN + head."""
    m = args.model
    d, depth, ps = m["decoder_dim"], m["decoder_depth"], m["patch_size"]
    hidden = int(2 * m.get("decoder_mlp_ratio", 4.0) * d / 3)
    lat = args.size // 2 ** (len(args.vae["block_out_channels"]) - 1)
    p = (lat // ps) ** 2
    macs = 0
    for length in seq_lengths(args, k, fast):
        macs += depth * length * d * (4 * d + 3 * hidden)  # qkv, proj, gate_up, down
        macs += depth * 2 * length * length * d  # attention scores and weighted values
        macs += p * d * m["latent_channels"] * ps * ps  # proj_out (patches only)
    macs += depth * d * 12 * d  # adaLN (per sample, shared by the passes)
    return 2 * macs * args.batch / 1e9


def vae_decode_gflop(args) -> float:
    """GFLOP of one VAE decode, counted by torch's FlopCounterMode on a meta-device copy (no real compute)."""
    import torch
    from diffusers import AutoencoderKL
    from torch.utils.flop_counter import FlopCounterMode

    n_blocks = len(args.vae["block_out_channels"])
    lat = args.size // 2 ** (n_blocks - 1)
    with torch.device("meta"), torch.no_grad():
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * n_blocks, up_block_types=("UpDecoderBlock2D",) * n_blocks,
            block_out_channels=args.vae["block_out_channels"], layers_per_block=args.vae["layers_per_block"],
            norm_num_groups=args.vae["norm_num_groups"], latent_channels=args.model["latent_channels"])
        counter = FlopCounterMode(display=False)
        with counter:
            vae.decode(torch.zeros(args.batch, args.model["latent_channels"], lat, lat))
    return counter.get_total_flops() / 1e9


# ----------------------------------------------------------------------------------------------------------
# one decode configuration
# ----------------------------------------------------------------------------------------------------------
def run_decode_config(args, k: int, fast: bool, pipe=None, dtype: str = "float32") -> dict:
    import torch
    from flextok_kit.flextok_core import vae_decode

    torch.set_num_threads(args.threads)
    if pipe is None:
        pipe = build_pipeline(args, dtype)
    ids, noise = decode_inputs(args, pipe, k)
    common = dict(guidance_scale=args.guidance, use_apg=not args.no_apg, latents=noise, fast_decoding=fast)

    # Warm-up: a short latent-only call first, so the high-water mark after it is the denoising loop's alone;
    # then one VAE decode so the timed call's VAE part is warm too.
    rss_before = rss_mib()
    peak_reset = reset_peak_rss()
    t0 = time.perf_counter()
    warm = pipe.detokenize(ids, num_inference_steps=args.warmup_steps, output_type="latent", **common).images
    loop_peak = peak_rss_mib()
    with torch.no_grad():
        vae_decode(pipe.vae, warm)
    warmup_s = time.perf_counter() - t0

    runs = []
    for _ in range(args.repeats):
        marks = {}

        def on_step_end(_pipe, i, _t, tensors, marks=marks):
            if i == args.steps - 1:
                marks["loop_end"] = time.perf_counter()
                marks["latents"] = tensors["latents"].detach().clone()
            return tensors

        c0, t0 = time.process_time(), time.perf_counter()
        image = pipe.detokenize(ids, num_inference_steps=args.steps, callback_on_step_end=on_step_end,
                                output_type="pt", **common).images
        t1, c1 = time.perf_counter(), time.process_time()
        runs.append(dict(total_s=t1 - t0, loop_s=marks["loop_end"] - t0, vae_s=t1 - marks["loop_end"],
                         cpu_s=c1 - c0, latents=marks["latents"], image=image))
    best = min(runs, key=lambda r: r["total_s"])
    peak = peak_rss_mib()
    lat = best["latents"]
    return dict(
        k=k, fast=fast, dtype=dtype, warmup_s=warmup_s, all_total_s=[r["total_s"] for r in runs],
        total_s=best["total_s"], loop_s=best["loop_s"], vae_s=best["vae_s"], cpu_s=best["cpu_s"],
        rss_before_mib=rss_before, peak_mib=peak, work_mib=peak - rss_before, loop_work_mib=loop_peak - rss_before,
        peak_reset=peak_reset, finite=bool(torch.isfinite(lat).all()), latent_std=float(lat.std()),
        latents=lat.numpy(), image=best["image"].float().numpy(),
    )


# ----------------------------------------------------------------------------------------------------------
# tokenize throughput
# ----------------------------------------------------------------------------------------------------------
def run_tokenize(args, pipe=None, dtype: str = "float32") -> list[dict]:
    import torch
    from flextok_kit.flextok_core import vae_encode

    torch.set_num_threads(args.threads)
    if pipe is None:
        pipe = build_pipeline(args, dtype)
    g = torch.Generator().manual_seed(args.seed + 2)
    images = torch.rand(args.tok_batch, 3, args.size, args.size, generator=g) * 2 - 1
    warm_k = min(args.tok_ks)
    pipe.tokenize(images, num_tokens=warm_k, generator=torch.Generator().manual_seed(0))  # warm-up
    out = []
    for k in args.tok_ks:
        t0 = time.perf_counter()
        ids = pipe.tokenize(images, num_tokens=k, generator=torch.Generator().manual_seed(0))
        total = time.perf_counter() - t0
        assert ids.shape == (args.tok_batch, k)
        out.append(dict(k=k, total_s=total, ids=ids.numpy()))
    # split: VAE encode vs FlexTok encoder (+FSQ), timed separately on the same inputs
    with torch.no_grad():
        t0 = time.perf_counter()
        latents = vae_encode(pipe.vae, images, True, torch.Generator().manual_seed(0))
        vae_s = time.perf_counter() - t0
        for row in out:
            t0 = time.perf_counter()
            pipe.flextok.encode(latents.to(pipe.flextok.dtype), num_tokens=row["k"])
            row["encoder_s"] = time.perf_counter() - t0
            row["vae_s"] = vae_s
    return out


# ----------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------
def _in_fresh_process(fn, *fn_args):
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *fn_args).result()


def header(args) -> str:
    import diffusers
    import torch
    from cpu_report import describe

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    lines = [
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | "
        f"cpu_count={os.cpu_count()} | threads={args.threads} | loadavg(1/5/15m)="
        + "/".join(f"{x:.2f}" if isinstance(x, float) else x for x in load),
        describe(args.threads, args.dtype),
        f"python {platform.python_version()} | torch {torch.__version__} | diffusers {diffusers.__version__}",
        (f"model: {'QUICK tiny' if args.quick else 'd12-d12'} "
         f"enc {args.model['encoder_dim']}x{args.model['encoder_depth']} / dec {args.model['decoder_dim']}x"
         f"{args.model['decoder_depth']} (head_dim {args.model['decoder_head_dim']}), "
         f"{args.model['num_registers']} registers, grid {args.model['grid_size']}, "
         f"VAE {list(args.vae['block_out_channels'])} x{args.vae['layers_per_block']}, random weights, "
         f"dtypes {' and '.join(args.dtypes)}"),
        (f"decode: batch {args.batch}, {args.size}x{args.size}, {args.steps} steps (warm-up {args.warmup_steps}), "
         f"guidance {args.guidance} {'CFG' if args.no_apg else 'APG'}, repeats {args.repeats}, "
         f"{'fresh process per configuration' if args.isolate else 'in-process'}"),
    ]
    return "\n".join(lines)


class Runner:
    """Runs a configuration in a fresh process (``--isolate``) or in-process on one pipeline per dtype."""

    def __init__(self, args):
        self.args = args
        self.pipes = {}

    def __call__(self, fn, *fn_args, dtype: str = "float32"):
        if self.args.isolate:
            return _in_fresh_process(fn, self.args, *fn_args, None, dtype)
        if dtype not in self.pipes:
            self.pipes[dtype] = build_pipeline(self.args, dtype)
        return fn(self.args, *fn_args, self.pipes[dtype], dtype)


def decode_all(args, run: Runner) -> dict:
    """(k, fast, dtype) -> run_decode_config result: both float32 paths, and the fast path in ``--dtype``."""
    results = {}
    for k in args.ks:
        for fast, dtype in [(False, "float32"), (True, "float32")] + [(True, d) for d in args.dtypes[1:]]:
            r = results[k, fast, dtype] = run(run_decode_config, k, fast, dtype=dtype)
            print(f"  done k={k:<3d} {'fast ' if fast else 'plain'} {dtype}: {r['total_s']:.2f} s "
                  f"(warm-up {r['warmup_s']:.2f} s, cpu/wall {r['cpu_s'] / r['total_s']:.2f})", flush=True)
    return results


def report_rows(args, results: dict):
    vae_gf = vae_decode_gflop(args)
    print()
    print("detokenize, one call each (seq = decoder tokens per sample, cond+uncond; GFLOP = analytic decoder FLOPs of "
          "all steps + VAE decode)")
    print(f"{'k':>4} {'path':>5} {'dtype':>8} {'seq':>9} {'GFLOP':>7} {'total s':>8} {'loop s':>8} {'vae s':>7} "
          f"{'cpu s':>7} {'cpu/wall':>8} {'loop GFLOP/s':>12}  peak RSS MiB (+loop, +total over loaded model)")
    for (k, fast, dtype), r in results.items():
        gf = args.steps * decoder_gflop(args, k, fast)
        seq = "+".join(str(x) for x in seq_lengths(args, k, fast))
        print(f"{k:>4} {'fast' if fast else 'plain':>5} {dtype:>8} {seq:>9} {gf + vae_gf:7.4g} {r['total_s']:8.2f} "
              f"{r['loop_s']:8.2f} {r['vae_s']:7.2f} {r['cpu_s']:7.1f} {r['cpu_s'] / r['total_s']:8.2f} "
              f"{gf / r['loop_s']:12.1f}  {r['peak_mib']:7.0f} (+{r['loop_work_mib']:.0f}, +{r['work_mib']:.0f})")
    print(f"  VAE decode: {vae_gf:.0f} GFLOP per call (FlopCounterMode)")
    if not all(r["peak_reset"] for r in results.values()):
        print("  note: /proc/self/clear_refs not writable; peak is ru_maxrss (includes model construction)")
    contended = [f"k={k} {'fast' if f else 'plain'} {d}" for (k, f, d), r in results.items()
                 if r["cpu_s"] / r["total_s"] < 0.8 * min(args.threads, os.cpu_count() or 1)]
    if contended:
        print(f"  WARNING: cpu/wall well below {args.threads} for {', '.join(contended)}: the process did not get its "
              "cores (other load on the machine); those timings and the ratios built on them are unreliable")
    if not all(r["finite"] for r in results.values()):
        print("  WARNING: non-finite latents in " + ", ".join(f"k={k} {d}" for (k, _, d), r in results.items()
                                                           if not r["finite"]))


def report_paths(args, results: dict) -> list[str]:
    """float32 plain vs fast: the exact fast path's speed-up and agreement."""
    import numpy as np

    n = args.model["num_registers"]
    print()
    print("float32 plain vs fast. ideal loop = FLOP ratio of the denoising loops (their matmuls scale linearly with "
          "the token count); expected = the total ratio if the fast loop ran at the plain loop's GFLOP/s, with the "
          "measured VAE times")
    print(f"{'k':>4} {'plain s':>8} {'fast s':>8} {'plain/fast':>10} {'expected':>8} {'loop ratio':>10} "
          f"{'ideal loop':>10} {'plain MiB':>9} {'fast MiB':>9} {'max|dlat|':>10} {'max|dimg|':>10}")
    verdicts = []
    for k in args.ks:
        a, b = results[k, False, "float32"], results[k, True, "float32"]
        ratio = a["total_s"] / b["total_s"]
        ideal_loop = decoder_gflop(args, k, False) / decoder_gflop(args, k, True)
        expected = a["total_s"] / (a["loop_s"] / ideal_loop + b["vae_s"])
        dlat = float(np.abs(a["latents"] - b["latents"]).max())
        dimg = float(np.abs(a["image"] - b["image"]).max())
        print(f"{k:>4} {a['total_s']:8.2f} {b['total_s']:8.2f} {ratio:10.2f} {expected:8.2f} "
              f"{a['loop_s'] / b['loop_s']:10.2f} {ideal_loop:10.2f} {a['peak_mib']:9.0f} {b['peak_mib']:9.0f} "
              f"{dlat:10.2e} {dimg:10.2e}")
        target = 1.8 if k <= 16 else 1.25 if k >= n else None
        if target is not None:
            verdicts.append(f"k={k}: float32 plain/fast {ratio:.2f} (target >= {target}) -> "
                            f"{'MET' if ratio >= target else 'MISSED'}"
                            + (" (--quick: tiny model, not meaningful)" if args.quick else ""))
    return verdicts


DTYPE_TARGETS = {256: 4.5, 16: 6.0}  # issue 14: reduced-precision fast path vs the float32 plain path, per k
TOKENIZE_TARGET, MAX_DEV, MEAN_DEV = 2.5, 2e-2, 2e-3


def report_dtype(args, results: dict) -> list[str]:
    """The reduced-precision fast path vs both float32 paths: speed-ups and image deviations."""
    import numpy as np

    dtype = args.dtype
    print()
    print(f"{dtype} fast path vs float32 (same weights, ids and noise; deviation = |{dtype} fast - float32 fast| of "
          "the images in [0, 1])")
    print(f"{'k':>4} {'fp32 plain s':>12} {'fp32 fast s':>11} {dtype + ' s':>10} {'vs plain':>8} {'vs fast':>8} "
          f"{'loop vs fast':>12} {'vae vs fast':>11} {'max|dimg|':>10} {'mean|dimg|':>10}")
    verdicts = []
    for k in args.ks:
        plain, fast, low = (results[k, False, "float32"], results[k, True, "float32"], results[k, True, dtype])
        vs_plain, vs_fast = plain["total_s"] / low["total_s"], fast["total_s"] / low["total_s"]
        diff = np.abs(low["image"] - fast["image"])
        print(f"{k:>4} {plain['total_s']:12.2f} {fast['total_s']:11.2f} {low['total_s']:10.2f} {vs_plain:8.2f} "
              f"{vs_fast:8.2f} {fast['loop_s'] / low['loop_s']:12.2f} {fast['vae_s'] / low['vae_s']:11.2f} "
              f"{diff.max():10.2e} {diff.mean():10.2e}")
        target = DTYPE_TARGETS.get(k)
        quick = " (--quick: tiny model, not meaningful)" if args.quick else ""
        if target is not None:
            verdicts.append(f"k={k}: {dtype} fast vs float32 plain {vs_plain:.2f}x (target >= {target}) -> "
                            f"{'MET' if vs_plain >= target else 'MISSED'}{quick}")
        ok = diff.max() <= MAX_DEV and diff.mean() <= MEAN_DEV
        verdicts.append(f"k={k}: image deviation max {diff.max():.2e} (<= {MAX_DEV:g}), mean {diff.mean():.2e} "
                        f"(<= {MEAN_DEV:g}) -> {'MET' if ok else 'MISSED'}{quick}")
    return verdicts


def report_tokenize(args, tok: dict) -> list[str]:
    import numpy as np

    print()
    print(f"tokenize (batch {args.tok_batch} x {args.size}x{args.size}; VAE encode + encoder + FSQ)")
    print(f"{'dtype':>8} {'tokens':>6} {'total s':>8} {'images/s':>9} {'vae enc s':>9} {'encoder s':>9} "
          f"{'vs fp32':>7} {'same ids':>8}")
    verdicts = []
    for dtype, rows in tok.items():
        for row, ref in zip(rows, tok["float32"]):
            ratio = ref["total_s"] / row["total_s"]
            same = float(np.mean(row["ids"] == ref["ids"]))
            print(f"{dtype:>8} {row['k']:>6} {row['total_s']:8.2f} {args.tok_batch / row['total_s']:9.2f} "
                  f"{row['vae_s']:9.2f} {row['encoder_s']:9.2f} {ratio:7.2f} {same:8.1%}")
            if dtype != "float32":
                verdicts.append(f"tokenize k={row['k']}: {dtype} vs float32 {ratio:.2f}x (target >= "
                                f"{TOKENIZE_TARGET}) -> {'MET' if ratio >= TOKENIZE_TARGET else 'MISSED'}"
                                + (" (--quick: not meaningful)" if args.quick else ""))
    return verdicts


def run_batch_cost(args, batch: int, pipe=None, dtype: str = "float32") -> dict:
    """Cost per image of the fast path at one batch size: detokenize at every k of --ks, and tokenize."""
    import copy

    args = copy.copy(args)
    args.batch, args.tok_batch, args.repeats = batch, batch, 1
    pipe = pipe or build_pipeline(args, dtype)
    reset_peak_rss()
    out = {f"detok k={k}": run_decode_config(args, k, True, pipe, dtype)["total_s"] / batch for k in args.ks}
    if args.tok_ks:
        out["tokenize"] = run_tokenize(args, pipe, dtype)[0]["total_s"] / batch
    out["peak_mib"] = peak_rss_mib()
    return out


def report_batches(args, run: Runner):
    print()
    print(f"cost per image vs batch size (fast path, {args.steps} steps; tokenize at {args.tok_ks[:1]} tokens)"
          + ("; each row a fresh process" if args.isolate else ""))
    for dtype in args.dtypes:
        rows = {b: run(run_batch_cost, b, dtype=dtype) for b in args.batches}
        first = rows[args.batches[0]]
        for b, row in rows.items():
            cells = " | ".join(f"{name} {sec:.2f} s/image (speed-up over batch {args.batches[0]}: {first[name] / sec:.2f}x)"
                               for name, sec in row.items() if name != "peak_mib")
            print(f"  {dtype:>8} batch {b:>2}: {cells} | peak RSS {row['peak_mib']:.0f} MiB", flush=True)


def main(argv=None):
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(header(args), flush=True)
    t_start = time.perf_counter()
    run = Runner(args)
    if args.batches:
        report_batches(args, run)
    else:
        results = decode_all(args, run)
        tok = {d: run(run_tokenize, dtype=d) for d in args.dtypes} if args.tok_ks else {}
        report_rows(args, results)
        verdicts = report_paths(args, results)
        if args.dtype != "float32":
            verdicts += report_dtype(args, results)
        if tok:
            verdicts += report_tokenize(args, tok)
        print()
        for v in verdicts:
            print("  " + v)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(f"wall time {time.perf_counter() - t_start:.0f} s"
          + (f"; loadavg at end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}" if load else "")
          + f" (with --threads {args.threads} on {os.cpu_count()} cores, load above {args.threads} means other "
            "processes competed for the CPU; see cpu/wall)")


if __name__ == "__main__":
    main()
