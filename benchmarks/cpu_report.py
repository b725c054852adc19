"""What a speed ratio depends on: the CPU model, its reduced-precision matmul flags and the measured matmul ratio.

A bfloat16 result reads correctly only beside the machine's own bf16/fp32 matmul ratio: about 6x on a Xeon with
AMX (amx_bf16), about 1-2x with AVX512-BF16 alone, and below 1 without either (bf16 is then emulated).
Used by decode_speed.py and ar_speed.py; ``python benchmarks/cpu_report.py`` prints it alone.
"""
from __future__ import annotations

import os
import platform
import time

REDUCED_PRECISION_FLAGS = ("amx_bf16", "amx_fp16", "amx_tile", "avx512_bf16", "avx512_fp16", "avx512f", "avx2")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_model() -> str:
    """The CPU's model name and its reduced-precision flags, e.g. ``Intel(R) Xeon(R) Processor (amx_bf16, ...)``."""
    return f"{cpu_name()} ({', '.join(cpu_flags()) or 'flags unknown'})"


def cpu_flags() -> list[str]:
    """The reduced-precision-relevant flags of /proc/cpuinfo that this CPU has (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [flag for flag in REDUCED_PRECISION_FLAGS if flag in have]
    except OSError:
        pass
    return []


def matmul_tflops(dtype, threads: int, n: int = 2048, repeats: int = 8) -> float:
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def describe(threads: int, dtype_name: str | None = "bfloat16") -> str:
    """Two lines: the CPU (model, flags, ATEN_CPU_CAPABILITY) and, for a reduced dtype, the matmul ratio."""
    import torch

    lines = [f"cpu: {cpu_name()} | flags: {' '.join(cpu_flags()) or 'unknown'} | "
             f"ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '(native)')} | "
             f"torch kernels: {torch.backends.cpu.get_cpu_capability()}"]
    if dtype_name and dtype_name != "float32":
        fp32 = matmul_tflops(torch.float32, threads)
        low = matmul_tflops(getattr(torch, dtype_name), threads)
        amx = "amx_bf16" in cpu_flags() if dtype_name == "bfloat16" else "amx_fp16" in cpu_flags()
        lines.append(f"matmul 2048x2048, {threads} threads: float32 {fp32:.2f} TFLOP/s, {dtype_name} {low:.2f} TFLOP/s "
                     f"-> {dtype_name}/float32 = {low / fp32:.2f}x on this machine"
                     + ("" if amx else f" (no AMX for {dtype_name} here: expect far smaller model speed-ups than "
                                       "on an AMX Xeon)"))
    return "\n".join(lines)


if __name__ == "__main__":
    print(describe(2))
