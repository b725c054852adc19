#!/usr/bin/env bash
# Quick start: set up .venv, then reconstruct a sample image at 1..N tokens into a coarse-to-fine grid.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m flextok_kit.demo "$@"
