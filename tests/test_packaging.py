"""Packaging: importing the library never imports ComfyUI (the package is a ComfyUI node pack and a library).

Bad-input tests live by subject: tests/test_bad_checkpoints.py (checkpoints, configs, weights, VAE folders, save
targets), tests/test_bad_pipeline_inputs.py (images, tokens, sampling settings), tests/test_cli_bad_input.py (the
command line: one error line, exit status 2); the repository's layout rules are in tests/test_layout.py.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import flextok_kit.flextok_core.official  # noqa: F401  (imported here so the check below has something to see)
import flextok_kit.pipelines  # noqa: F401

# ---------------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------------
_COMFY = ("comfy", "comfy_extras", "folder_paths", "comfy_execution")


def _comfy_modules(names):
    return sorted(m for m in names if m.split(".")[0] in _COMFY)


def test_import_does_not_import_comfyui():
    """``import flextok_kit`` in a fresh interpreter (outside ComfyUI) neither fails nor imports ComfyUI."""
    code = (
        "import sys, flextok_kit\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {_COMFY!r})\n"
        "assert not bad, bad\n"
        "assert flextok_kit.NODE_CLASS_MAPPINGS == {}, flextok_kit.NODE_CLASS_MAPPINGS\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_library_modules_do_not_import_comfyui():
    """This test process imported flextok_kit.flextok_core and flextok_kit.pipelines (at the top of this file)."""
    assert "flextok_kit.pipelines" in sys.modules and "flextok_kit.flextok_core.official" in sys.modules
    assert not _comfy_modules(sys.modules)
