#!/usr/bin/env bash
# Creates .venv with torch and this package (editable, with the test, train and eval extras). Idempotent.
# PYTHON: the interpreter that creates .venv (default python3, 3.10+). The other scripts then use .venv/bin/python
# (scripts/_python.sh).
#
# Which torch build: the first one .venv can import is kept; only when there is none does this script run
# `pip install torch==2.13.0`, and pip takes the build its configured indexes offer for that version:
#   * here (CI) pip's configuration points at a local wheel folder with torch-2.13.0+cpu, so it is the CPU build;
#   * with plain PyPI it is PyPI's default wheel for the platform: on Linux x86_64 that one bundles the CUDA
#     libraries (several GB), on macOS and Windows it is CPU-only.
# To choose the build (CUDA for a GPU, or CPU-only without the CUDA download), install torch into .venv first, as
# https://pytorch.org/get-started/locally/ says for your platform, then run this script, which keeps it:
#   python3 -m venv .venv
#   .venv/bin/python -m pip install torch --index-url https://download.pytorch.org/whl/cu128   # or .../whl/cpu
#   bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BASE_PY=${PYTHON:-python3}   # only creates .venv; everything after runs .venv/bin/python
if [ ! -x .venv/bin/python ]; then
  "$BASE_PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first (see the top of this file): an importable torch is kept, whatever its build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "[setup] installing torch==2.13.0 (the build pip's indexes offer; for a CUDA build install it into .venv" \
       "first, see the top of scripts/setup.sh)"
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -c "import torch; b = 'CUDA ' + torch.version.cuda if torch.version.cuda else 'CPU-only'; \
print(f'[setup] torch {torch.__version__} ({b} build) in .venv; for another build: see the top of scripts/setup.sh')"
.venv/bin/python -m pip install -q -e ".[test,train,eval]"
