"""Steps 2-5 of ``scripts/comfyui_demo.sh`` (which installs ComfyUI first and then runs this file with ComfyUI's
own python). Standard library only: of flextok_kit it uses only ``flextok_kit.comfyui_client`` (the ComfyUI client the
node tests use too, standard library only), imported from the installed package or, under ComfyUI's python, where
flextok_kit is not installed (ComfyUI imports the pack by path), loaded from this checkout's comfyui_client.py.

    python scripts/comfyui_demo.py [--check] [extra ComfyUI arguments ...]

Into the ComfyUI folder tree ``COMFYUI_BASE`` (default ``$COMFYUI_HOME/ComfyUI``, the install itself; the server is
always started with ``--base-directory COMFYUI_BASE``, so another folder keeps the install untouched):

* ``custom_nodes/flextok_nodes``  -> symlink to this repository (the node pack), as the tests link it;
* ``models/flextok/<name>``       -> symlink to ``demo_models/<name>`` for every folder there with a model_index.json;
* ``input/``                      <- the sample photos of ``demo_models/samples`` (copied);
* ``user/default/workflows/``     <- ``example_workflows/*.json`` with Load FlexTok set to the demo model
                                     (refreshed on every run); the reconstruct example's Load Image already names
                                     a sample photo (checked here to be one of those copied into ``input/``).

Then it starts ComfyUI (``--cpu --listen 127.0.0.1 --port PORT``) in the foreground, or with ``--check`` in the background:
it queues each example workflow whose demo model is installed (reconstruct, AR generate, auto tokens) through
``POST /prompt``, waits for ``/history``, prints the output files and stops the server. Exit status 0 = success, 1 = failure, 2 = bad usage.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _comfyui_client():
    """``flextok_kit.comfyui_client`` of this checkout: imported when flextok_kit is installed from it (the project's
    venv), else loaded from its file (ComfyUI's own python, which runs this script from scripts/comfyui_demo.sh and
    does not install flextok_kit)."""
    path = ROOT / "comfyui_client.py"
    try:
        from flextok_kit import comfyui_client
        if Path(comfyui_client.__file__).resolve() == path:
            return comfyui_client
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location("flextok_kit_comfyui_client", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


_client = _comfyui_client()
ComfyServer, Run = _client.ComfyServer, _client.Run
retarget_workflow, ui_to_api = _client.retarget_workflow, _client.ui_to_api

PACK = "flextok_nodes"                     # custom_nodes/<PACK>, the name the tests use
DEMO_MODELS = ROOT / "demo_models"
SAMPLES = DEMO_MODELS / "samples"
EXAMPLES = ROOT / "example_workflows"
WORKFLOW_MODELS = {"flextok_reconstruct.json": "photo_tokenizer", "flextok_ar_generate.json": "fashion_ar",
                   "flextok_auto_tokens.json": "photo_tokenizer"}
CHECK_WORKFLOW = "flextok_reconstruct.json"


def say(msg: str) -> None:
    print(f"[comfyui_demo] {msg}", flush=True)


def fail(msg: str, code: int = 1):
    print(f"comfyui_demo: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# ---------------------------------------------------------------------------------------------------- set-up
def symlink(link: Path, target: Path) -> str:
    """link -> target; replaces a symlink pointing elsewhere, never a real file or folder. Returns what it did."""
    target = target.resolve()
    if link.is_symlink():
        if link.resolve() == target:
            return "kept"
        link.unlink()
    elif link.exists():
        return "blocked"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=target.is_dir())
    return "linked"


def install_pack(base: Path) -> None:
    link = base / "custom_nodes" / PACK
    if symlink(link, ROOT) == "blocked":
        fail(f"{link} exists and is not a link to this repository ({ROOT}); move it away and run again")
    for other in sorted((base / "custom_nodes").iterdir()):
        if other.name != PACK and other.is_symlink() and other.resolve() == ROOT:
            say(f"warning: {other} also links this repository: ComfyUI will load the pack twice")
    say(f"node pack: {link} -> {ROOT}")


def demo_model_names() -> list[str]:
    return sorted(p.parent.name for p in DEMO_MODELS.glob("*/model_index.json"))


def link_models(base: Path) -> list[str]:
    folder = base / "models" / "flextok"
    folder.mkdir(parents=True, exist_ok=True)
    # links to demo models that are gone (renamed or removed here) would only show up as broken entries
    for entry in folder.iterdir():
        if entry.is_symlink() and not entry.exists() and DEMO_MODELS.resolve() in Path(os.readlink(entry)).parents:
            entry.unlink()
    names = []
    for name in demo_model_names():
        link = folder / name
        if symlink(link, DEMO_MODELS / name) == "blocked":
            say(f"warning: {link} exists and is not a link to demo_models/{name}: left alone")
            continue
        names.append(name)
        say(f"model: {link} -> demo_models/{name}")
    if not names:
        fail(f"no demo model (a folder with model_index.json) in {DEMO_MODELS}")
    return names


def copy_samples(base: Path) -> None:
    dest = base / "input"
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(SAMPLES.glob("*.jpg")) + sorted(SAMPLES.glob("*.png")):
        out = dest / src.name
        data = src.read_bytes()
        if not out.is_file() or out.read_bytes() != data:
            out.write_bytes(data)
    say(f"sample photos: {dest} ({', '.join(p.name for p in sorted(SAMPLES.glob('*.jpg')))})")


def install_workflows(base: Path, models: list[str]) -> list[tuple[str, str, bool]]:
    dest = base / "user" / "default" / "workflows"
    dest.mkdir(parents=True, exist_ok=True)
    done = []
    for name, model in WORKFLOW_MODELS.items():
        ui = retarget_workflow(json.loads((EXAMPLES / name).read_text()), model=model)
        for node in ui["nodes"]:
            if node["type"] == "LoadImage" and not (base / "input" / node["widgets_values"][0]).is_file():
                fail(f"{name}: Load Image names {node['widgets_values'][0]!r}, which is not in {base / 'input'} "
                     f"(the example workflows should open one of the photos of {SAMPLES})")
        out = dest / name
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(ui, indent=1, ensure_ascii=False) + "\n")
        tmp.replace(out)
        done.append((out.stem, model, model in models))
        say(f"workflow: {out} (Load FlexTok: {model}{'' if model in models else ', NOT in demo_models yet'})")
    settings = base / "user" / "default" / "comfy.settings.json"
    if not settings.exists():  # a fresh ComfyUI user: no first-run template dialog over the canvas
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    return done


def port_in_use(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def output_root(base: Path, extra: list[str]) -> Path:
    for i, arg in enumerate(extra):
        if arg == "--output-directory" and i + 1 < len(extra):
            return Path(extra[i + 1]).resolve()
        if arg.startswith("--output-directory="):
            return Path(arg.split("=", 1)[1]).resolve()
    return base / "output"


# ---------------------------------------------------------------------------------------------------- --check
def check(srv: ComfyServer, base: Path, extra: list[str], run_timeout: float) -> list[Path]:
    """Run every installed example workflow whose demo model is linked; -> the PNGs they saved."""
    info = srv.object_info()
    if "FlexTokLoad" not in info:
        log = srv.log_path.read_text(errors="replace").splitlines()
        lines = [line for line in log if PACK in line or "IMPORT FAILED" in line or "Error" in line]
        fail(f"ComfyUI started but the FlexTok nodes are not registered. From {srv.log_path}:\n"
             + "\n".join(lines[-20:]) + f"\n--- last lines ---\n{srv.log_tail(40)}")
    options = info["FlexTokLoad"]["input"]["required"]["model_name"][1]["options"]
    if WORKFLOW_MODELS[CHECK_WORKFLOW] not in options:
        fail(f"Load FlexTok does not offer {WORKFLOW_MODELS[CHECK_WORKFLOW]!r} (it offers {options}); "
             f"models/flextok/ is {base / 'models/flextok'}")
    pngs = []
    for name, model in WORKFLOW_MODELS.items():
        if model not in options:
            say(f"{name}: demo model {model!r} not installed, skipped")
            continue
        pngs += run_workflow(srv, base, base / "user" / "default" / "workflows" / name, info, extra, run_timeout)
    return pngs


def run_workflow(srv: ComfyServer, base: Path, workflow: Path, info: dict, extra: list[str],
                 run_timeout: float) -> list[Path]:
    prompt = ui_to_api(json.loads(workflow.read_text()), info)
    say(f"queueing {workflow.name} (POST /prompt)")
    t0 = time.monotonic()
    status, body = srv.queue(prompt)
    if status != 200:
        fail(f"/prompt refused {workflow.name} ({status}):\n{json.dumps(body, indent=1)[-3000:]}")
    pid = body["prompt_id"]
    try:
        history = srv.wait_history(pid, timeout=run_timeout)
    except (TimeoutError, RuntimeError) as e:
        fail(f"{e}\n--- last lines of {srv.log_path} ---\n{srv.log_tail(40)}")
    run = Run(pid, history, [], base)
    if run.status != "success":
        err = run.error or {}
        trace = "".join(err.get("traceback") or [])[-2500:]
        fail(f"{workflow.name} failed in node {err.get('node_id')} ({err.get('node_type')}): "
             f"{err.get('exception_type')}: {err.get('exception_message')}\n{trace}"
             f"\n--- last lines of {srv.log_path} ---\n{srv.log_tail(30)}")
    root = output_root(base, extra)
    images, tokens, texts = [], [], []
    for node_out in run.outputs.values():
        texts += [t for t in node_out.get("text", []) if isinstance(t, str) and "FlexTokTokens(" not in t]
        for item in node_out.get("images", []):
            if item.get("type") == "output":
                images.append(root / item.get("subfolder", "") / item["filename"])
        for item in node_out.get("flextok_tokens", []):
            tokens.append(root / item.get("subfolder", "") / item["filename"])
    pngs = [p for p in images if p.suffix == ".png" and p.is_file()]
    if not pngs:
        fail(f"{workflow.name} ran but saved no PNG (outputs: {json.dumps(run.outputs)[:1500]})")
    say(f"{workflow.name} finished in {time.monotonic() - t0:.1f}s; output images in {root}:")
    for p in pngs:
        print(f"  {p}", flush=True)
    for p in tokens:
        print(f"  {p}  (tokens)", flush=True)
    for text in texts:  # text outputs (Preview as Text): e.g. the chosen k of the auto-tokens example
        print("\n".join(f"  | {line}" for line in text.splitlines()), flush=True)
    return pngs


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                     epilog="other arguments are passed to ComfyUI's main.py")
    parser.add_argument("--check", action="store_true",
                        help="start in the background, run the reconstruct workflow, print the outputs, stop")
    args, extra = parser.parse_known_args(argv)
    check_mode = args.check or os.environ.get("SMOKE", "").lower() in ("1", "true", "yes")
    home = Path(os.environ.get("COMFYUI_HOME") or Path.home() / ".cache" / "comfyui-0.3.75")
    launcher = home / "bin" / "comfyui"
    if not launcher.exists():
        fail(f"ComfyUI launcher {launcher} not found (run .ci/comfyui.sh, or set COMFYUI_HOME)")
    base = Path(os.environ.get("COMFYUI_BASE") or home / "ComfyUI").resolve()
    host = "127.0.0.1"
    port_text = os.environ.get("PORT") or "8188"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        fail(f"PORT={port_text!r} is not a port number", 2)
    port = int(port_text)

    say(f"ComfyUI folders (--base-directory): {base}")
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    install_pack(base)
    models = link_models(base)
    copy_samples(base)
    workflows = install_workflows(base, models)

    if port_in_use(host, port):
        fail(f"port {port} on {host} is already in use (another ComfyUI?); stop it or choose another: PORT=8189 "
             f"bash scripts/comfyui_demo.sh")
    cmd_args = ["--cpu", "--listen", host, "--port", str(port), "--base-directory", str(base)]
    url = f"http://{host}:{port}"

    if not check_mode:
        say(f"starting ComfyUI at {url}  (Ctrl-C stops it)")
        say("open the Workflows sidebar (W) and pick: "
            + ", ".join(f"{n} ({m}{'' if ok else ', model missing'})" for n, m, ok in workflows))
        sys.stdout.flush()
        os.execv(str(launcher), [str(launcher), *cmd_args, *extra])

    log = base / "user" / "comfyui_demo_check.log"
    log.write_text("")
    srv = ComfyServer(launcher, base, packs={}, extra_args=["--cpu", "--disable-api-nodes", *extra],
                      host=host, port=port)
    srv.log_path = log
    startup = float(os.environ.get("STARTUP_TIMEOUT") or 300)
    say(f"--check: starting ComfyUI in the background at {url} (log: {log})")
    try:
        try:
            srv.start(timeout=startup)
        except (RuntimeError, TimeoutError) as e:
            head = str(e).split("\n", 1)[0]
            fail(f"ComfyUI did not start: {head}\n--- last lines of {log} ---\n{srv.log_tail(60)}")
        say(f"ComfyUI is up at {url}")
        check(srv, base, extra, float(os.environ.get("RUN_TIMEOUT") or 600))
    finally:
        srv.stop()
    say("check passed; server stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
