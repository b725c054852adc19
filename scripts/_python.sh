# Sourced (not run) by the scripts in scripts/: sets PY, the Python interpreter they run everything with, so that
# they work right after the quick start without activating anything:
#   1. $PYTHON, if set (any interpreter that has flextok_kit installed);
#   2. else the project's .venv/bin/python, if it exists (made by scripts/setup.sh, which quickstart.sh and .ci/run
#      call);
#   3. else python3 from PATH.
# Training scripts launch multi-process runs with "$PY" -m accelerate.commands.launch (the accelerate of that same
# interpreter), never with a bare `accelerate` or `python3` from PATH.
# require_flextok_kit: exits with a one-line hint when PY cannot import the package (instead of a traceback later).
_flextok_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ -x "$_flextok_root/.venv/bin/python" ]; then
  PY="$_flextok_root/.venv/bin/python"
else
  PY=python3
fi

require_flextok_kit() {
  local check='import importlib.util, sys; sys.exit(importlib.util.find_spec("flextok_kit") is None)'
  if ! "$PY" -c "$check" 2>/dev/null; then
    if [ -n "${PYTHON:-}" ]; then
      echo "$(basename "$0"): error: PYTHON=$PYTHON cannot import flextok_kit; unset PYTHON to use" \
           "$_flextok_root/.venv (made by 'bash scripts/setup.sh'), or install the package into that interpreter" >&2
    else
      echo "$(basename "$0"): error: $PY cannot import flextok_kit; run 'bash scripts/setup.sh' first" \
           "(it creates $_flextok_root/.venv, which these scripts then use)" \
           "or set PYTHON=<interpreter with flextok_kit>" >&2
    fi
    exit 1
  fi
}
