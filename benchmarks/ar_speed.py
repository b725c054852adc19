"""AR sampling speed: FlexTokAR.generate with the static KV cache vs recomputing the sequence every step.

Builds a class-conditional FlexTokAR at LlamaGen-B scale (depth 12, dim 768, head_dim 64, vocabulary 64000,
untied head; random weights, float32) and times ``generate`` with classifier-free guidance (one doubled batch)
at batch 1 and 8, 32 and 256 tokens, ``use_cache=True`` and ``use_cache=False``, all in one process.

Usage::

    python benchmarks/ar_speed.py            # full run (several minutes on 2 cores)
    python benchmarks/ar_speed.py --quick    # tiny model, batch 1/2, 16/256 tokens: checks the script runs
    python benchmarks/ar_speed.py --dtype bfloat16   # cached sampling in bfloat16 vs float32 (same weights)

With ``--dtype bfloat16`` (or float16) only the cached path runs, in float32 and in that dtype (``model.to(dtype)``,
what the CLI's ``--dtype`` and the ComfyUI Load node do), and the summary gives the speed-up, the share of sampled
tokens equal to float32's (sampling diverges after the first token whose logits round differently) and the
machine's own matmul ratio and CPU flags (cpu_report.py).

What the numbers mean
---------------------
* ``s/call``: wall time of one ``generate`` call after a short warm-up call (min over ``--repeats``, the
  least disturbed by other processes on a shared machine);
  ``s/image`` = s/call / batch; ``tok/s`` = batch * tokens / s/call (image tokens; the guided null rows are
  not counted although they cost as much). ``cpu/wall``: process CPU time / wall time; well under
  ``--threads`` means other processes took the cores and the row is pessimistic.
* no-cache rows marked ``est``: recomputing the sequence makes step ``i`` run ``P + i`` rows through the model
  instead of one, so a 256-token no-cache call at batch 8 takes a quarter of an hour or more on 2 cores (90 TFLOP
  with guidance). Rows longer than
  ``--full-no-cache-up-to`` tokens time ``--no-cache-steps`` evenly spaced steps (``FlexTokAR._reference_step``,
  the exact step ``use_cache=False`` runs, plus guidance and sampling) and sum a linear interpolation over all
  steps. Rows run in full are estimated the same way too, which shows how good the estimate is
  (``est/meas``). ``--no-cache-steps 0`` runs every no-cache configuration in full.
* ``same tokens``: the cached and the full no-cache call, same seed, gave identical tokens.
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import torch

from flextok_kit.flextok_core.ar import FlexTokAR, cfg_logits, sample_logits

FULL_MODEL = dict(vocab_size=64000, max_tokens=256, dim=768, depth=12, head_dim=64, num_classes=1000)
QUICK_MODEL = dict(vocab_size=64000, max_tokens=256, dim=64, depth=2, head_dim=32, num_classes=1000)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model (dim 64, depth 2): checks the script runs")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8; 1,2 with --quick)")
    p.add_argument("--tokens", default=None, help="comma-separated num_tokens (default 32,256; 16,256 with --quick)")
    p.add_argument("--guidance", type=float, default=4.0, help="CFG scale (1 = no guidance, no doubled batch)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed calls per configuration, and per step of an estimate (min reported: the least "
                        "disturbed by other processes)")
    p.add_argument("--full-no-cache-up-to", type=int, default=None,
                   help="no-cache rows with at most this many tokens run in full, longer ones are estimated "
                        "(default 32; 16 with --quick)")
    p.add_argument("--no-cache-steps", type=int, default=6,
                   help="steps timed for a no-cache estimate (also computed for full rows, to check it; 0 = none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="compare cached sampling in this dtype with float32 (skips the no-cache rows)")
    args = p.parse_args(argv)
    q = args.quick
    args.batches = [int(b) for b in (args.batches or ("1,2" if q else "1,8")).split(",") if b.strip()]
    args.tokens = [int(n) for n in (args.tokens or ("16,256" if q else "32,256")).split(",") if n.strip()]
    if args.full_no_cache_up_to is None:
        args.full_no_cache_up_to = 16 if q else 32
    if args.no_cache_steps < 2:
        args.no_cache_steps = 0
        args.full_no_cache_up_to = max(args.tokens)
    args.model = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    return args


def build_model(args) -> FlexTokAR:
    torch.manual_seed(args.seed)
    return FlexTokAR(**args.model).eval()


def labels_for(batch: int) -> torch.Tensor:
    return torch.arange(batch) * 37 % 1000


def timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    t1, c1 = time.perf_counter(), time.process_time()
    return out, t1 - t0, (c1 - c0) / (t1 - t0)


def run_generate(model, args, batch: int, num_tokens: int, use_cache: bool) -> dict:
    kw = dict(guidance_scale=args.guidance, use_cache=use_cache)
    model.generate(labels_for(batch), num_tokens=min(num_tokens, 4), generator=torch.Generator().manual_seed(1), **kw)
    runs = []
    for _ in range(args.repeats):
        gen = torch.Generator().manual_seed(args.seed)
        tokens, wall, cpu = timed(lambda: model.generate(labels_for(batch), num_tokens=num_tokens, generator=gen, **kw))
        runs.append(dict(s=wall, cpu_per_wall=cpu, tokens=tokens))
    return dict(min(runs, key=lambda r: r["s"]), estimated=False)


@torch.no_grad()
def estimate_uncached(model, args, batch: int, num_tokens: int, num_steps: int) -> dict:
    """Sum over all steps of a linear interpolation of the timed cost of ``num_steps`` evenly spaced steps."""
    guided = args.guidance != 1.0
    groups = 2 if guided else 1
    labels = labels_for(batch).repeat(groups)
    null = torch.arange(groups * batch) >= batch if guided else None
    prefix, valid = model.embed_prefix(labels, null_condition_mask=null)
    gen = torch.Generator().manual_seed(args.seed)
    tokens = torch.randint(0, model.config.vocab_size, (groups * batch, num_tokens), generator=gen)

    def step(i):
        logits = model._reference_step(prefix, valid, tokens[:, :i])
        return sample_logits(cfg_logits(logits, args.guidance) if guided else logits, generator=gen)

    step(0)  # warm-up
    steps = np.unique(np.linspace(0, num_tokens - 1, num_steps).round().astype(int))
    cost, cpu = [], []
    for i in steps:
        wall, c = min(timed(lambda: step(int(i)))[1:] for _ in range(args.repeats))
        cost.append(wall)
        cpu.append(c)
    total = float(np.interp(np.arange(num_tokens), steps, cost).sum())
    return dict(s=total, cpu_per_wall=float(np.mean(cpu)), tokens=None, estimated=True, steps=len(steps))


def header(args, model) -> str:
    import diffusers

    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    total = sum(p.numel() for p in model.parameters())
    blocks = sum(p.numel() for p in model.blocks.parameters())
    m = args.model
    return "\n".join([
        f"machine: {platform.platform()} | {platform.processor() or platform.machine()} | cpu_count={os.cpu_count()} "
        f"| threads={torch.get_num_threads()} | loadavg(1/5/15m)="
        + "/".join(f"{x:.2f}" if isinstance(x, float) else x for x in load),
        f"python {platform.python_version()} | torch {torch.__version__} | diffusers {diffusers.__version__}",
        f"model: {'QUICK tiny' if args.quick else 'LlamaGen-B scale'} FlexTokAR depth {m['depth']} dim {m['dim']} "
        f"head_dim {m['head_dim']} vocab {m['vocab_size']} untied head, {m['num_classes']} classes: "
        f"{total / 1e6:.1f}M params ({blocks / 1e6:.1f}M in blocks), random weights, float32",
        f"sampling: CFG scale {args.guidance} (doubled batch), temperature 1, no top-k/top-p, repeats {args.repeats}, "
        f"no-cache: run in full up to {args.full_no_cache_up_to} tokens, "
        + (f"estimated from {args.no_cache_steps} timed steps above" if args.no_cache_steps else "no estimates"),
    ])


def compare_dtypes(args, model):
    """Cached sampling, float32 vs ``--dtype``: speed-up and agreement of the sampled tokens."""
    low = build_model(args).to(getattr(torch, args.dtype))
    for m in (model, low):
        m.generate(labels_for(1), num_tokens=8, guidance_scale=args.guidance)
    print()
    print(f"{'batch':>5} {'tokens':>6} {'float32 s':>9} {args.dtype + ' s':>10} {'speed-up':>8} {'same tokens':>11}")
    for batch in args.batches:
        for n in args.tokens:
            ref, other = (run_generate(m, args, batch, n, True) for m in (model, low))
            same = float((ref["tokens"] == other["tokens"]).float().mean())
            print(f"{batch:>5} {n:>6} {ref['s']:9.2f} {other['s']:10.2f} {ref['s'] / other['s']:8.2f} {same:11.1%}",
                  flush=True)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build_model(args)
    print(header(args, model), flush=True)
    t_start = time.perf_counter()
    if args.dtype != "float32":
        from cpu_report import describe

        print(describe(args.threads, args.dtype))
        compare_dtypes(args, model)
        print(f"\nwall time {time.perf_counter() - t_start:.0f} s")
        return
    for use_cache in (True, False):  # first calls pay one-off allocation and thread-pool start-up
        model.generate(labels_for(1), num_tokens=8, guidance_scale=args.guidance, use_cache=use_cache)

    results = {}
    for batch in args.batches:
        for n in args.tokens:
            for use_cache in (True, False):
                if not use_cache and n > args.full_no_cache_up_to:
                    r = estimate_uncached(model, args, batch, n, args.no_cache_steps)
                else:
                    r = run_generate(model, args, batch, n, use_cache)
                    if not use_cache and args.no_cache_steps > 0:
                        r["est_s"] = estimate_uncached(model, args, batch, n, args.no_cache_steps)["s"]
                results[batch, n, use_cache] = r
                print(f"  done batch {batch} tokens {n:>3} {'cache   ' if use_cache else 'no-cache'}: {r['s']:.2f} s"
                      f"{' (est)' if r['estimated'] else ''}, cpu/wall {r['cpu_per_wall']:.2f}", flush=True)

    print()
    print(f"{'batch':>5} {'tokens':>6} {'path':>8} {'s/call':>9} {'s/image':>8} {'tok/s':>8} {'cpu/wall':>8}  note")
    for (batch, n, use_cache), r in results.items():
        note = f"est. from {r['steps']} steps" if r["estimated"] else ""
        if "est_s" in r:
            note = f"est/meas {r['est_s'] / r['s']:.2f}"
        print(f"{batch:>5} {n:>6} {'cache' if use_cache else 'no-cache':>8} {r['s']:9.2f} {r['s'] / batch:8.3f} "
              f"{batch * n / r['s']:8.1f} {r['cpu_per_wall']:8.2f}  {note}")
    print()
    print("summary: no-cache time / cache time")
    print(f"{'batch':>5} {'tokens':>6} {'cache s':>8} {'no-cache s':>10} {'ratio':>7}  same tokens")
    verdicts = []
    for batch in args.batches:
        for n in args.tokens:
            c, u = results[batch, n, True], results[batch, n, False]
            ratio = u["s"] / c["s"]
            same = "n/a (est.)" if u["tokens"] is None else str(torch.equal(c["tokens"], u["tokens"]))
            star = "*" if u["estimated"] else " "
            print(f"{batch:>5} {n:>6} {c['s']:8.2f} {u['s']:10.2f}{star} {ratio:7.2f}  {same}")
            if n == 256:
                verdicts.append(f"batch {batch}, 256 tokens: no-cache/cache {ratio:.1f}x (target >= 3) -> "
                                f"{'MET' if ratio >= 3 else 'MISSED'}"
                                + (" (--quick: tiny model, not meaningful)" if args.quick else ""))
    if any(r["estimated"] for r in results.values()):
        print("  * estimated (see the module docstring)")
    for v in verdicts:
        print("  " + v)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print()
    print(f"wall time {time.perf_counter() - t_start:.0f} s"
          + (f"; loadavg at end {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}" if load else "")
          + f" (threads {args.threads} on {os.cpu_count()} cores; load above that means other processes competed)")


if __name__ == "__main__":
    main()
