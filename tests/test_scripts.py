"""The shell scripts in scripts/ run Python through one shared choice (scripts/_python.sh: $PYTHON, else the
project's .venv, else python3), so that they work right after the quick start without activating anything."""
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
CHOOSER = SCRIPTS / "_python.sh"
# the only scripts that name an interpreter themselves, and the one they may name
OWN_INTERPRETER = {
    "setup.sh": ".venv/bin/python",       # creates .venv (from $PYTHON or python3), then installs into it
    "quickstart.sh": ".venv/bin/python",  # runs setup.sh first
    "comfyui_demo.sh": '"$COMFYUI_HOME/bin/python"',  # ComfyUI's own environment, not ours
}
# an interpreter or launcher from PATH in command position (line start, after ; & | ( ` or a keyword, after VAR=x)
BARE = re.compile(r"(?:^|[;&|(`!]|\b(?:exec|then|do|else|if|while|until|time|env|command|nohup))\s*"
                  r"(?:\w+=\S*\s+)*(python[0-9.]*|pip[0-9.]*|accelerate|torchrun)(?=\s|$)", re.M)


def _code(path: Path) -> str:
    """The script without comments and without here-document bodies (Python code fed to "$PY" -)."""
    out, end = [], None
    for line in path.read_text().splitlines():
        if end is not None:
            if line.strip() == end:
                end = None
            continue
        if line.lstrip().startswith("#"):
            continue
        line = re.sub(r"\s#\s.*$", "", line)  # a trailing comment
        m = re.search(r"<<-?\s*['\"]?(\w+)['\"]?", line)
        if m:
            end = m.group(1)
        out.append(line)
    return "\n".join(out)


def _shell_scripts():
    return sorted(p for p in SCRIPTS.glob("*.sh") if p != CHOOSER)


def test_every_script_picks_python_through_python_sh():
    assert CHOOSER.is_file()
    assert _shell_scripts()
    for path in _shell_scripts():
        code = _code(path)
        bare = [m.group(1) for m in BARE.finditer(code)]
        assert not bare, f"{path.name} runs {bare} from PATH; use \"$PY\" (source scripts/_python.sh)"
        if path.name in OWN_INTERPRETER:
            assert not re.search(r"\$\{?PY\b", code), f"{path.name} uses $PY without scripts/_python.sh"
            assert OWN_INTERPRETER[path.name] in code, path.name
            continue
        paths = re.findall(r"\S*/python[0-9.]*\b", code)
        assert not paths, f"{path.name} names an interpreter {paths}; let scripts/_python.sh choose"
        if not re.search(r"\$\{?PY\b", code):
            continue  # runs no Python at all
        assert re.search(r"^(source|\.) scripts/_python\.sh\b", code, re.M), f"{path.name} must source _python.sh"
        assert not re.search(r"^\s*(export\s+)?PY=", code, re.M), f"{path.name} sets PY itself"
        # multi-process runs: the accelerate of the same interpreter, never `accelerate launch` from PATH
        for m in re.finditer(r"(?<![\w/.])accelerate(?!_)\S*", code):
            assert m.group(0) == "accelerate.commands.launch", f"{path.name}: {m.group(0)}"
            line = code[code.rfind("\n", 0, m.start()) + 1:m.start()]
            assert '"$PY" -m' in line, f"{path.name}: accelerate must run as \"$PY\" -m accelerate.commands.launch"


def _choose(tmp_path, env_extra, venv: bool):
    """Source a copy of _python.sh inside a fake checkout; -> (returncode, PY, stderr)."""
    repo = tmp_path / ("with_venv" if venv else "no_venv")
    (repo / "scripts").mkdir(parents=True, exist_ok=True)
    shutil.copy(CHOOSER, repo / "scripts" / "_python.sh")
    if venv:
        exe = repo / ".venv" / "bin" / "python"
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env.update(env_extra)
    res = subprocess.run(["bash", "-c", "set -euo pipefail; cd \"$1\"; source scripts/_python.sh; echo \"$PY\"; "
                          "require_flextok_kit", "x", str(repo)], capture_output=True, text=True, env=env)
    return res.returncode, res.stdout.strip(), res.stderr


def test_python_sh_order_and_hint(tmp_path):
    # .venv of the checkout (the quick start's) first; the fake venv python "finds" any module (exit 0)
    rc, py, _ = _choose(tmp_path, {}, venv=True)
    assert rc == 0 and py == str((tmp_path / "with_venv" / ".venv" / "bin" / "python").resolve())
    # $PYTHON wins over .venv
    rc, py, _ = _choose(tmp_path, {"PYTHON": sys.executable}, venv=True)
    assert rc == 0 and py == sys.executable
    # no .venv: python3 from PATH; an interpreter without flextok_kit stops with a hint, not a traceback later
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python3").chmod(0o755)
    rc, py, err = _choose(tmp_path, {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, venv=False)
    assert rc == 1 and py == "python3"
    assert "cannot import flextok_kit" in err and "bash scripts/setup.sh" in err


@pytest.mark.slow
def test_train_tiny_pipeline_runs_without_activating_anything(tmp_path):
    """scripts/train_tiny_pipeline.sh as the README runs it (no PYTHON, nothing activated), a few steps per stage:
    with the project's .venv it must use that, never a python3 from PATH (here one that fails loudly)."""
    venv_py = ROOT / ".venv" / "bin" / "python"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "python3", "pip", "accelerate"):
        (bin_dir / name).write_text(f"#!/bin/sh\necho 'scripts must not run {name} from PATH' >&2\nexit 97\n")
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", OUT=str(tmp_path / "tiny"), VAE_STEPS="2",
               TOK_STEPS="2", AR_STEPS="2")
    if not venv_py.exists():  # the suite runs from another environment: the $PYTHON path, with this interpreter
        env["PYTHON"] = sys.executable
    res = subprocess.run(["bash", str(SCRIPTS / "train_tiny_pipeline.sh")], capture_output=True, text=True, env=env,
                         timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "from PATH" not in res.stderr
    pipe = tmp_path / "tiny" / "pipeline"
    assert (pipe / "model_index.json").is_file() and (pipe / "ar_model").is_dir()


def test_package_demo_model_stores_every_weight_in_float16(tmp_path):
    """The demo models' 5 MB budget: the packager stores FlexTokModel's kept-in-float32 layers in float16 too, and
    loading gives a float32 model again."""
    import torch
    from safetensors import safe_open

    from flextok_kit.pipelines import FlexTokPipeline

    from .conftest import GOLDEN

    FlexTokPipeline.from_official(GOLDEN).save_pretrained(tmp_path / "src")
    proc = subprocess.run([sys.executable, str(SCRIPTS / "package_demo_model.py"), str(tmp_path / "src"),
                           str(tmp_path / "dest")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    files = sorted((tmp_path / "dest").rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"flextok", "vae"}
    for f in files:
        with safe_open(str(f), "pt") as weights:
            assert {weights.get_tensor(k).dtype for k in weights.keys()} == {torch.float16}, f
    loaded = FlexTokPipeline.from_pretrained(tmp_path / "dest")
    assert all(p.dtype == torch.float32 for p in loaded.flextok.parameters())
