#!/usr/bin/env bash
# ComfyUI demo: a real ComfyUI 0.3.75 (CPU) with this node pack, the embedded demo models and the example workflows.
#
# Usage: bash scripts/comfyui_demo.sh [--check] [extra ComfyUI arguments ...]
#   (no option)  start the server in the foreground at http://127.0.0.1:$PORT; Ctrl-C stops it
#   --check      (or SMOKE=1) start it in the background, run the example workflows through the HTTP API
#                (POST /prompt, GET /history), print the output images, stop the server; exit 0 only on success
#
# Steps (every one idempotent):
#   1. .ci/comfyui.sh --no-browser installs ComfyUI + this pack's requirements into $COMFYUI_HOME (cold: minutes)
#   2. custom_nodes/flextok_nodes     -> symlink to this repository
#   3. models/flextok/<name>          -> symlink to demo_models/<name>, for each folder with a model_index.json
#   4. user/default/workflows/        <- example_workflows/*.json with the demo models (flextok_reconstruct:
#                                        photo_tokenizer, flextok_ar_generate: fashion_ar), refreshed on every run;
#      input/                         <- the sample photos of demo_models/samples
#   5. start the server: --cpu --listen 127.0.0.1 --port $PORT --base-directory $COMFYUI_BASE
#
# Environment:
#   COMFYUI_HOME   ComfyUI install (default: $HOME/.cache/comfyui-0.3.75, as .ci/comfyui.sh and the tests)
#   COMFYUI_BASE   the folder tree with custom_nodes/ models/ input/ output/ user/ (default: $COMFYUI_HOME/ComfyUI;
#                  another folder keeps the install untouched)
#   PORT           default 8188
#   STARTUP_TIMEOUT, RUN_TIMEOUT   seconds for --check (default 300, 600)
set -euo pipefail
cd "$(dirname "$0")/.."

for arg in "$@"; do
  case "$arg" in
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {print}' "$0"; exit 0 ;;
  esac
done

export COMFYUI_HOME="${COMFYUI_HOME:-$HOME/.cache/comfyui-0.3.75}"
echo "[comfyui_demo] ComfyUI in $COMFYUI_HOME (.ci/comfyui.sh --no-browser)"
if ! bash .ci/comfyui.sh --no-browser; then
  echo "comfyui_demo: error: installing ComfyUI into $COMFYUI_HOME failed (see above)" >&2
  exit 1
fi

# Steps 2-5 run under ComfyUI's own python (standard library only): see scripts/comfyui_demo.py.
exec "$COMFYUI_HOME/bin/python" scripts/comfyui_demo.py "$@"
