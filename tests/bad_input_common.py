"""Shared pieces of the bad-input tests (test_bad_checkpoints, test_bad_pipeline_inputs, test_cli_bad_input):
one valid tiny official checkpoint that variants are written from, and small file writers."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from .official_format import official_config, official_state_dict, random_model, random_vae, save_official, \
    vae_state_dict

N = 12  # registers of the tiny model


@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in the bad-input tests (scoped: a module-level switch would leak into other modules)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """One valid official checkpoint per test module (see :func:`make_base`)."""
    return make_base(tmp_path_factory.mktemp("base"))


def make_base(root: Path) -> SimpleNamespace:
    """A valid official-format checkpoint under ``root/ckpt`` whose VAE lives in ``root/vae`` (absolute
    ``hf_hub_path``, so variants written elsewhere find it) and also inside model.safetensors."""
    model, vae = random_model(0, num_registers=N, sample_posterior=False), random_vae(100)
    vae.save_pretrained(str(root / "vae"))
    config = official_config(model, hf_hub_path=str(root / "vae"))
    tensors = official_state_dict(model)
    tensors.update(vae_state_dict(vae))
    folder = save_official(root / "ckpt", tensors, config)
    return SimpleNamespace(model=model, vae=vae, config=config, tensors=tensors, folder=folder, root=root)


def write(tmp_path: Path, base, config=None, tensors=None, **kwargs) -> Path:
    """A variant of ``base`` (its config and tensors unless given) written to ``tmp_path/ckpt``."""
    return save_official(tmp_path / "ckpt", base.tensors if tensors is None else tensors,
                         base.config if config is None else config, **kwargs)


def png16(path: Path, array: np.ndarray) -> Path:
    """Write a 16-bit PNG (grayscale ``[H,W]`` or RGB ``[H,W,3]`` uint16) with a minimal encoder (filter 0), so
    the test does not depend on which 16-bit modes Pillow can write."""
    array = np.asarray(array, dtype=np.uint16)
    h, w = array.shape[:2]
    color_type = 0 if array.ndim == 2 else 2
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


def to8(array16: np.ndarray) -> np.ndarray:
    """The 8-bit version of 16-bit data: ``round(v / 65535 * 255)``."""
    return np.round(np.asarray(array16, dtype=np.float64) / 65535 * 255).astype(np.uint8)
