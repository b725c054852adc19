"""GPU check: the whole FlexTok path on an accelerator, in one run, one table.

    python benchmarks/gpu_check.py --device cuda --golden <shared>/golden/flextok_tiny    # at most ~8 min, one GPU
    python benchmarks/gpu_check.py --device cpu --quick --golden <...>                     # the same code, < 2 min

Sections (each row: what, value, note; ``FAIL`` rows make the exit status 1):

1. **golden parity**: the golden tiny checkpoint (official release format) in float32 on ``--device`` vs on the
   CPU: tokenize (posterior mean, and a posterior sample from a seeded CPU generator), detokenize (fast and plain,
   APG, noise from a seeded CPU generator), AR tokens from a seeded CPU generator. TF32 is switched off for these
   rows (true float32). Token ids should agree exactly; images to about 1e-5 (the devices' float arithmetic).
2. **dtype**: a d12-d12-sized random model on ``--device`` in bfloat16 and float16 (VAE in float32) against
   float32: token agreement of tokenize, mean / max |difference| of decoded images (same ids, same noise).
3. **speed**: tokenize and detokenize (25 steps, guidance 7.5 with APG, k = 256; fast and plain decoder path)
   images/s at batch 1 / 8 / 32 in ``--dtype`` (auto: bf16 on GPUs that have it), plus peak memory of each.
4. **AR**: tokens/s of a LlamaGen-B-sized FlexTokAR (depth 12, width 768; CFG 4 in one doubled batch, batch 8,
   256 tokens) with and without the KV cache; the two must give the same tokens.
5. **offloaded**: ``enable_model_cpu_offload`` on ``--device``: tokenize, detokenize and AR generation give the
   results of the resident pipeline; time and peak memory.
6. **SDPA**: which ``scaled_dot_product_attention`` kernel each attention path ran (encoder, decoder fast with
   its float key bias, decoder plain, AR prefill, AR cached step), read from the profiler's op names. On CUDA the
   math fallback is a ``FAIL``: every path must reach a fused kernel (flash, memory-efficient or cuDNN).

Peak memory: ``torch.cuda.max_memory_allocated`` on CUDA, the process's RSS high-water mark on the CPU.
``--max-minutes`` (default 8) skips the sections that would start after that time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import sys
import time

import torch
from cpu_report import cpu_model  # benchmarks/ is on sys.path when run as a script

ROWS: list[tuple[str, str, str, str]] = []  # (section, item, value, note)
FAILED: list[str] = []

D12 = dict(latent_channels=16, patch_size=2, grid_size=(16, 16), num_registers=256, encoder_dim=768, encoder_depth=12,
           encoder_head_dim=64, decoder_dim=768, decoder_depth=12, decoder_head_dim=64)
D12_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
TINY = dict(latent_channels=16, patch_size=2, grid_size=(4, 4), num_registers=32, encoder_dim=64, encoder_depth=2,
            encoder_head_dim=32, decoder_dim=64, decoder_depth=2, decoder_head_dim=32)
TINY_VAE = dict(block_out_channels=(16, 16, 16, 16), layers_per_block=1, norm_num_groups=8)
AR_B = dict(vocab_size=64000, max_tokens=256, dim=768, depth=12, head_dim=64, num_classes=1000)
AR_TINY = dict(vocab_size=64000, max_tokens=32, dim=64, depth=2, head_dim=32, num_classes=10)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="cuda, cuda:1, mps, cpu, or auto (cuda > mps > cpu)")
    p.add_argument("--dtype", default="auto", help="the speed rows' dtype: auto, float32, bfloat16, float16")
    p.add_argument("--golden", default=os.environ.get("FLEXTOK_GOLDEN"),
                   help="the golden tiny checkpoint folder (official format) for the parity rows ($FLEXTOK_GOLDEN)")
    p.add_argument("--quick", action="store_true", help="tiny models, small batches, 2 steps: the code path only")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for CPU work (default 2; 1 with --quick, whose ops are too small to "
                        "share and which must not stall on a busy machine)")
    p.add_argument("--max-minutes", type=float, default=8.0, help="skip sections that would start later than this")
    args = p.parse_args(argv)
    from flextok_kit.cli import resolve_device, resolve_dtype

    args.device = torch.device(resolve_device(args.device))
    if args.device.type == "cuda" and args.device.index is None:
        args.device = torch.device("cuda", torch.cuda.current_device())
    args.dtype = getattr(torch, resolve_dtype(args.dtype, str(args.device)))
    q = args.quick
    args.threads = args.threads or (1 if q else 2)
    args.model, args.vae = (TINY, TINY_VAE) if q else (D12, D12_VAE)
    args.ar = AR_TINY if q else AR_B
    args.size = 32 if q else 256
    args.steps = 2 if q else 25
    args.batches = [1, 2] if q else [1, 8, 32]
    args.ar_batch, args.ar_tokens = (2, 8) if q else (8, 256)
    return args


# -- machine, timing, memory ---------------------------------------------------------------------------------------
def machine(args) -> str:
    lines = [f"CPU: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
             f"python {platform.python_version()} | torch {torch.__version__} | "
             f"diffusers {__import__('diffusers').__version__} | {platform.platform()}"]
    if args.device.type == "cuda":
        prop = torch.cuda.get_device_properties(args.device)
        lines.append(f"GPU: {prop.name}, {prop.total_memory / 2**30:.0f} GiB, compute capability "
                     f"{prop.major}.{prop.minor}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
                     f"bf16 {torch.cuda.is_bf16_supported()}")
    elif args.device.type == "mps":
        lines.append("GPU: Apple silicon (MPS)")
    lines.append(f"device {args.device}, speed dtype {str(args.dtype).replace('torch.', '')}"
                 + (", quick (tiny models)" if args.quick else ""))
    return "\n".join(lines)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@contextlib.contextmanager
def peak_memory(device, out: dict):
    """``out["gib"]``: the peak memory of the block (CUDA allocator, else process RSS high-water mark)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    yield
    if device.type == "cuda":
        sync(device)
        out["gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        try:
            kib = int(re.search(r"VmHWM:\s+(\d+)", open("/proc/self/status").read()).group(1))
            out["gib"] = kib / 2**20
        except (OSError, AttributeError):
            out["gib"] = float("nan")


def timed(fn, device, repeats: int = 1):
    """(result of the last call, best wall seconds) after one untimed warm-up call."""
    fn()
    best, result = float("inf"), None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return result, best


def row(section, item, value, note=""):
    ROWS.append((section, item, value, note))


def fail(section, item, value, note):
    row(section, item, value, "FAIL: " + note)
    FAILED.append(f"{section} / {item}")


def gen(seed):
    return torch.Generator().manual_seed(seed)


@contextlib.contextmanager
def true_fp32():
    """TF32 off (cuDNN convolutions use it by default): float32 rows compare true float32 arithmetic."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


# -- models --------------------------------------------------------------------------------------------------------
def random_pipeline(args, seed=0):
    from diffusers import AutoencoderKL

    from flextok_kit.flextok_core import FlexTokModel
    from flextok_kit.pipelines import FlexTokPipeline

    torch.manual_seed(seed)
    n = len(args.vae["block_out_channels"])
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        latent_channels=16, **args.vae)
    model = FlexTokModel(**args.model)
    with torch.no_grad():  # the zero-initialised tables get values, so registers / mask / null differ as trained
        for name in ("encoder.registers", "decoder.register_pos_embed", "decoder.mask_token", "decoder.null_cond"):
            torch.nn.init.trunc_normal_(model.get_parameter(name), std=0.02)
    pipe = FlexTokPipeline(vae=vae.eval(), flextok=model.eval(), scheduler=FlexTokPipeline.default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_ar(config, seed=0):
    from flextok_kit.flextok_core import FlexTokAR

    torch.manual_seed(seed)
    return FlexTokAR(**config).eval()


def images_for(args, batch, seed=0):
    return torch.rand(batch, 3, args.size, args.size, generator=gen(seed)) * 2 - 1


# -- 1. golden parity ----------------------------------------------------------------------------------------------
def golden_parity(args):
    from safetensors.torch import load_file

    from flextok_kit.pipelines import FlexTokPipeline

    if not args.golden:
        row("golden parity", "all", "skipped", "pass --golden <shared>/golden/flextok_tiny")
        return
    vectors = load_file(os.path.join(args.golden, "vectors.safetensors"))
    images, ids = vectors["images"], vectors["token_ids"]
    cpu = FlexTokPipeline.from_official(args.golden)
    dev = FlexTokPipeline.from_official(args.golden).to(args.device)
    for p in (cpu, dev):
        p.set_progress_bar_config(disable=True)
    with true_fp32():
        for label, kw in (("tokenize (posterior mean)", lambda: dict(sample_posterior=False)),
                          ("tokenize (posterior, CPU generator)", lambda: dict(generator=gen(0)))):
            a, b = cpu.tokenize(images, **kw()), dev.tokenize(images, **kw()).cpu()
            same = (a == b).float().mean().item()  # an id may flip where a value sits on an FSQ rounding edge
            (row if same > 0.99 else fail)("golden parity", label, f"{same:.4f} ids equal", "device vs CPU")
        tokens = [ids[0, :1], ids[1, :16]] if ids.shape[0] > 1 else [ids[0, :16]]
        for fast in (True, False):
            kw = dict(num_inference_steps=25, guidance_scale=7.5, use_apg=True, fast_decoding=fast, output_type="pt")
            a = cpu.detokenize(tokens, generator=[gen(i) for i in range(len(tokens))], **kw).images
            b = dev.detokenize(tokens, generator=[gen(i) for i in range(len(tokens))], **kw).images.cpu()
            diff = (a - b).abs().max().item()
            (row if diff < 1e-3 else fail)("golden parity", f"detokenize {'fast' if fast else 'plain'} (APG 7.5)",
                                           f"max|d| {diff:.2e}", "images in [0,1], device vs CPU")
        ar = random_ar(AR_TINY)
        a = ar.generate(class_labels=[1, 7], num_tokens=16, guidance_scale=3.0, top_k=100, generator=gen(3))
        b = ar.to(args.device).generate(class_labels=[1, 7], num_tokens=16, guidance_scale=3.0, top_k=100,
                                        generator=gen(3)).cpu()
        row("golden parity", "AR tokens (CPU generator)", f"{(a == b).float().mean().item():.4f} equal",
            "a differing token can follow from last-bit logit differences")


# -- 2. dtype deviation -------------------------------------------------------------------------------------------
def dtype_deviation(args):
    pipe = random_pipeline(args).to(args.device)
    x = images_for(args, 2)
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="pt")
    ids = pipe.tokenize(x, sample_posterior=False)
    ref = pipe.detokenize(ids, generator=[gen(0), gen(1)], **kw).images.float()
    for dtype in (torch.bfloat16, torch.float16):
        if args.device.type == "cpu" and dtype == torch.float16 and not args.quick:
            continue
        pipe.flextok.to(dtype)
        try:
            same = (pipe.tokenize(x, sample_posterior=False) == ids).float().mean().item()
            out = pipe.detokenize(ids, generator=[gen(0), gen(1)], **kw).images.float()
            d = (out - ref).abs()
            row("dtype", f"{str(dtype)[6:]} vs float32", f"ids {same:.3f} equal",
                f"images mean|d| {d.mean().item():.2e}, max|d| {d.max().item():.2e} (VAE float32)")
        except RuntimeError as e:
            fail("dtype", f"{str(dtype)[6:]} vs float32", "error", str(e).splitlines()[0][:80])
        pipe.flextok.to(torch.float32)


# -- 3. speed -------------------------------------------------------------------------------------------------------
def speed(args):
    pipe = random_pipeline(args).to(args.device)
    pipe.flextok.to(args.dtype)
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, use_apg=True, output_type="pt")
    for b in args.batches:
        x = images_for(args, b)
        mem = {}
        with peak_memory(args.device, mem):
            ids, s = timed(lambda: pipe.tokenize(x, generator=gen(0)), args.device)
        row("speed", f"tokenize batch {b}", f"{b / s:.2f} img/s", f"peak {mem['gib']:.2f} GiB")
        for fast in (True, False):
            mem = {}
            with peak_memory(args.device, mem):
                _, s = timed(lambda: pipe.detokenize(ids, generator=gen(1), fast_decoding=fast, **kw), args.device)
            row("speed", f"detokenize {'fast' if fast else 'plain'} batch {b}", f"{b / s:.2f} img/s",
                f"k={ids.shape[1]}, {args.steps} steps, peak {mem['gib']:.2f} GiB")


# -- 4. AR ------------------------------------------------------------------------------------------------------------
def ar_speed(args):
    ar = random_ar(args.ar).to(args.device, args.dtype)
    labels = torch.arange(args.ar_batch) % args.ar["num_classes"]
    out = {}
    for cache in (True, False):
        mem = {}
        with peak_memory(args.device, mem):
            out[cache], s = timed(lambda: ar.generate(class_labels=labels, num_tokens=args.ar_tokens,
                                                       guidance_scale=4.0, generator=gen(5), use_cache=cache),
                                  args.device)
        row("AR", f"AR {'cached' if cache else 'uncached'} batch {args.ar_batch}",
            f"{args.ar_batch * args.ar_tokens / s:.0f} tok/s", f"{args.ar_tokens} tokens, CFG 4, peak {mem['gib']:.2f} GiB")
    same = torch.equal(out[True], out[False])
    (row if same or args.dtype != torch.float32 else fail)(
        "AR", "cached == uncached tokens", str(same), "" if args.dtype == torch.float32 else "reduced precision: "
        "the two paths' rounding may differ")


# -- 5. offload -----------------------------------------------------------------------------------------------------
def offloaded(args):
    resident = random_pipeline(args)
    resident.register_modules(ar_model=random_ar(AR_TINY))
    resident.to(args.device)
    pipe = random_pipeline(args)
    pipe.register_modules(ar_model=random_ar(AR_TINY))
    pipe.enable_model_cpu_offload(device=args.device)
    x = images_for(args, 2)
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="pt")

    def run(p):
        ids = p.tokenize(x, generator=gen(0))
        img = p.detokenize(ids, generator=gen(1), **kw).images
        gen_ids = p.generate_tokens(class_labels=[1, 2], num_tokens=8, generator=gen(2))
        return ids.cpu(), img.cpu(), gen_ids.cpu()

    with true_fp32():
        ref = run(resident)
        del resident
        mem = {}
        with peak_memory(args.device, mem):
            got, s = timed(lambda: run(pipe), args.device)
    ok = torch.equal(ref[0], got[0]) and torch.equal(ref[2], got[2])
    diff = (ref[1] - got[1]).abs().max().item()
    (row if ok and diff < 1e-4 else fail)("offloaded", "tokenize + detokenize + AR", f"{s:.2f} s",
                                         f"same ids {ok}, images max|d| {diff:.1e}, peak {mem['gib']:.2f} GiB")


# -- 6. SDPA kernels --------------------------------------------------------------------------------------------
KERNELS = {"_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)", "_scaled_dot_product_flash_attention":
           "flash", "_scaled_dot_product_efficient_attention": "memory-efficient",
           "_scaled_dot_product_cudnn_attention": "cuDNN", "_scaled_dot_product_attention_math": "math",
           "_scaled_dot_product_fused_attention_overrideable": "fused (backend)"}


def sdpa_kernels(fn) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key.removeprefix("aten::") for e in prof.key_averages()}
    found = [label for op, label in KERNELS.items() if op in names]
    return ", ".join(found) or "none"


def sdpa(args):
    pipe = random_pipeline(args).to(args.device)
    pipe.flextok.to(args.dtype)
    m = pipe.flextok
    lat = torch.randn(2, 16, args.size // 8, args.size // 8, device=args.device, dtype=args.dtype)
    ids = torch.randint(0, 64000, (2, m.num_registers), device=args.device)
    t = torch.full((2,), 0.5, device=args.device)

    def decoder(fast):
        regs = m.prepare_registers(ids, [16, m.num_registers], guidance=True, fast=fast)
        return lambda: m(lat, t, regs)

    ar = random_ar(args.ar).to(args.device, args.dtype)
    prefix, valid = ar.embed_prefix(torch.tensor([1, 2], device=args.device))
    from flextok_kit.flextok_core.ar import KVCache

    def ar_step():
        caches = [KVCache(2, ar.config.dim // ar.config.head_dim, 8, ar.config.head_dim, prefix.dtype, args.device)
                  for _ in ar.blocks]
        ar._hidden(prefix, valid, 1, caches)
        x = ar.tok_emb(torch.tensor([[3], [4]], device=args.device))
        return lambda: ar._hidden(x, valid, 1, caches, start=1)

    paths = {"encoder (bool mask)": lambda: m.encode(lat), "decoder fast (float key bias)": decoder(True),
             "decoder plain (no mask)": decoder(False),
             "AR prefill": lambda: ar._hidden(torch.cat([prefix, ar.tok_emb(ids[:, :4])], 1), valid, 1),
             "AR cached step": ar_step()}
    with torch.no_grad():
        for name, fn in paths.items():
            kernels = sdpa_kernels(fn)
            if args.device.type == "cuda" and "math" in kernels:
                fail("SDPA", name, kernels, "the math fallback on CUDA")
            else:
                row("SDPA", name, kernels, str(args.dtype).replace("torch.", ""))


SECTIONS = [("golden parity", golden_parity), ("dtype", dtype_deviation), ("speed", speed), ("AR", ar_speed),
            ("offloaded", offloaded), ("SDPA", sdpa)]


def print_table():
    widths = [max(len(r[i]) for r in ROWS + [("section", "item", "value", "note")]) for i in range(3)]
    header = ("section", "item", "value", "note")
    for r in [header] + ROWS:
        print(" | ".join(c.ljust(w) for c, w in zip(r[:3], widths)) + " | " + r[3])


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # ModelMixin.to(dtype)'s advice does not apply to these models
    print(machine(args))
    start = time.perf_counter()
    peak = {}
    with peak_memory(args.device, peak), torch.no_grad():
        for name, section in SECTIONS:
            if time.perf_counter() - start > args.max_minutes * 60:
                row(name, "all", "skipped", f"past --max-minutes {args.max_minutes}")
                continue
            t0 = time.perf_counter()
            try:
                section(args)
            except Exception as e:  # one broken section must not hide the others
                fail(name, "error", type(e).__name__, str(e).splitlines()[0][:120] if str(e) else "")
            print(f"[{name}: {time.perf_counter() - t0:.1f} s]", file=sys.stderr)
    row("total", "peak memory", f"{peak['gib']:.2f} GiB", "whole run" + (" (CUDA allocator)" if
                                                                          args.device.type == "cuda" else " (RSS)"))
    row("total", "wall time", f"{time.perf_counter() - start:.0f} s", "")
    print()
    print_table()
    if FAILED:
        print("\nFAILED: " + "; ".join(FAILED))
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
