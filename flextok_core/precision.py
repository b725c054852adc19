"""Reduced precision (bfloat16 / float16): which dtypes count as reduced, diffusers' cast warning, and the CPU
attention fallback where PyTorch's fused kernel cannot run them.

What stays in float32 under them is declared by each model (``FlexTokModel._keep_in_fp32_modules``); the decoder
keeps its residual stream in float32 (decoder.py); a reduced-precision VAE runs channels-last (vae.py).
"""
from __future__ import annotations

import contextlib
import functools
import logging

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

REDUCED_PRECISION = (torch.bfloat16, torch.float16)


class _NoFp32CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32" not in record.getMessage()


@contextlib.contextmanager
def quiet_fp32_cast_warning():
    """diffusers' ``ModelMixin.to(dtype)`` warns on every dtype cast that "modules should be kept in float32" and
    that casting "can lead to inconsistent results" -- also for models that declare no such module (``[]``:
    ``AutoencoderKL``, ``FlexTokAR``) and for ``FlexTokModel``, whose casts keep its declared modules exactly. The
    warning is wrong for all of them, so our casts filter it."""
    log = logging.getLogger("diffusers.models.modeling_utils")
    quiet = _NoFp32CastWarning()
    log.addFilter(quiet)
    try:
        yield
    finally:
        log.removeFilter(quiet)


@functools.lru_cache(maxsize=None)
def _cpu_fused_sdpa_works(dtype: torch.dtype) -> bool:
    """Whether PyTorch's fused CPU attention runs in ``dtype`` here. It does not on a CPU with AMX when the kernels
    are capped below AVX-512 (``ATEN_CPU_CAPABILITY=avx2``): the kernel picks AMX's packed layout from the CPU's
    flags and then fails with "pack_vnni2 is only supported when avx512 is supported" (PyTorch 2.13)."""
    q = torch.zeros(1, 1, 64, 64, dtype=dtype)
    try:
        F.scaled_dot_product_attention(q, q, q)
        return True
    except RuntimeError:
        return False


def cpu_attention_fallback(dtype: torch.dtype, device) -> contextlib.AbstractContextManager:
    """Attention (ours and the VAE's) under this context uses PyTorch's math kernel where the fused CPU kernel
    cannot run ``dtype`` (:func:`_cpu_fused_sdpa_works`); everywhere else it changes nothing."""
    if dtype in REDUCED_PRECISION and torch.device(device).type == "cpu" and not _cpu_fused_sdpa_works(dtype):
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
