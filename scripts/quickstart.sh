#!/usr/bin/env bash
# Quick start: set up .venv, then reconstruct the sample photos at 1..N tokens into a coarse-to-fine grid and
# generate one row per Fashion-MNIST class with the AR demo model (out/coarse_to_fine.png, out/generated_by_class.png).
# Options go to flextok_kit.demo: `bash scripts/quickstart.sh --distilled` uses the few-step distilled demo decoders
# (demo_models/*_distilled: 4 decoder passes per image instead of 50, see README "Few-step decoding").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m flextok_kit.demo "$@"
