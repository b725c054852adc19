"""The FlexTok node pack inside a REAL ComfyUI 0.3.75 server, driven over HTTP and the websocket.

Needs ComfyUI installed by ``.ci/comfyui.sh`` (``.ci/install_comfyui.sh`` + this pack's requirements in ComfyUI's
env) at ``$COMFYUI_HOME`` (default ``~/.cache/comfyui-0.3.75``). Without it the server tests skip, except when
``CI`` is set: then they fail. ``FLEXTOK_COMFYUI_INSTALL=1`` makes the fixture run ``.ci/comfyui.sh`` itself.
The browser test also needs ``--with-browser`` (Debian chromium + playwright in ComfyUI's env);
``FLEXTOK_UPDATE_SCREENSHOT=1`` copies its screenshot to docs/comfyui_workflow.png.

The server gets a throw-away ``--base-directory`` with this repository symlinked as ``custom_nodes/flextok_nodes``,
the golden tiny checkpoint (official format) as ``models/flextok/flextok_tiny``, the same weights in diffusers
format, and a model with other weights.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from .conftest import GOLDEN, ROOT

from flextok_kit import flextok_core, token_files
from flextok_kit.comfyui_client import ComfyServer, free_port, retarget_workflow, ui_to_api, write_safetensors
from flextok_kit.nodes import core  # plain Python, no ComfyUI
from flextok_kit.pipelines import FlexTokPipeline

COMFYUI_HOME = Path(os.environ.get("COMFYUI_HOME") or Path.home() / ".cache" / "comfyui-0.3.75")
LAUNCHER = COMFYUI_HOME / "bin" / "comfyui"
COMFY_PY = COMFYUI_HOME / "bin" / "python"
IN_CI = bool(os.environ.get("CI"))
PACK = "flextok_nodes"
EXAMPLES = ROOT / "example_workflows"
RECONSTRUCT = EXAMPLES / "flextok_reconstruct.json"
AR_EXAMPLE = EXAMPLES / "flextok_ar_generate.json"
AUTO_EXAMPLE = EXAMPLES / "flextok_auto_tokens.json"
NODE_IDS = ["FlexTokLoad", "FlexTokEncode", "FlexTokTruncate", "FlexTokDecode", "FlexTokCoarseToFine",
            "FlexTokSaveTokens", "FlexTokLoadTokens", "FlexTokARGenerate", "FlexTokAutoTokens"]
HAS_AR_BACKEND = hasattr(FlexTokPipeline, "generate_tokens") and hasattr(flextok_core, "FlexTokAR")
# The examples load the demo models (demo_models/photo_tokenizer, demo_models/fashion_ar: what
# scripts/comfyui_demo.sh links); the server tests here run them on the golden tiny model instead.
TEST_MODELS = {RECONSTRUCT: "flextok_tiny", AR_EXAMPLE: "flextok_tiny_ar", AUTO_EXAMPLE: "flextok_tiny"}


# ------------------------------------------------------------------------------------------------ fixtures
def _unavailable(reason: str):
    if IN_CI:
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(reason)


def _ensure_comfyui() -> None:
    if not LAUNCHER.exists() and (IN_CI or os.environ.get("FLEXTOK_COMFYUI_INSTALL") == "1"):
        res = subprocess.run(["bash", str(ROOT / ".ci" / "comfyui.sh")], capture_output=True, text=True,
                             env=dict(os.environ, COMFYUI_HOME=str(COMFYUI_HOME)), timeout=1800)
        if res.returncode != 0:
            _unavailable(f".ci/comfyui.sh failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    if not LAUNCHER.exists():
        _unavailable(f"ComfyUI is not installed at {COMFYUI_HOME} (run .ci/comfyui.sh or set COMFYUI_HOME)")
    res = subprocess.run([str(COMFY_PY), "-c", "import diffusers, safetensors"], capture_output=True, text=True)
    if res.returncode != 0:
        _unavailable(f"the pack's requirements are missing from ComfyUI's env ({COMFY_PY}); run .ci/comfyui.sh: "
                     f"{res.stderr[-500:]}")


def _test_image() -> PIL.Image.Image:
    """160x96 RGB: not square and wider than the tiny model's 128, so fit matters."""
    y, x = np.mgrid[0:96, 0:160]
    rgb = np.stack([x * 255 / 159, y * 255 / 95, ((x // 16 + y // 16) % 2) * 255], -1)
    return PIL.Image.fromarray(rgb.round().astype(np.uint8))


@pytest.fixture(scope="module")
def golden_pipe():
    pipe = FlexTokPipeline.from_official(str(GOLDEN))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base(tmp_path_factory, golden_pipe):
    base = tmp_path_factory.mktemp("comfy_base")
    models = base / "models" / "flextok"
    models.mkdir(parents=True)
    (models / "flextok_tiny").symlink_to(GOLDEN, target_is_directory=True)  # official format, read-only
    golden_pipe.save_pretrained(models / "flextok_tiny_diffusers")  # same weights, diffusers format
    other = FlexTokPipeline.from_official(str(GOLDEN))
    with torch.no_grad():
        for p in other.flextok.decoder.parameters():
            p.add_(0.01)
    other.save_pretrained(models / "other" / "flextok_other")  # other weights, in a sub folder
    (models / "not_a_model").mkdir()
    (models / "not_a_model" / "readme.txt").write_text("no checkpoint here")
    inputs = base / "input"
    inputs.mkdir()
    _test_image().save(inputs / "example.png")
    write_safetensors(inputs / "not_tokens.safetensors", {"x": [1.0, 2.0]})  # must not be offered as tokens
    return base


@pytest.fixture(scope="module")
def srv(base):
    _ensure_comfyui()
    server = ComfyServer(LAUNCHER, base, packs={PACK: ROOT},
                         extra_args=["--disable-api-nodes", "--disable-metadata"])
    try:
        server.start(timeout=180)
    except Exception as e:  # noqa: BLE001
        _unavailable(f"ComfyUI did not start: {e}")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def info(srv):
    return srv.object_info()


def load_image01(path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def run_ok(srv, prompt):
    run = srv.run(prompt, timeout=300)
    assert run.status == "success", json.dumps(run.error, indent=1)[-3000:]
    return run


def run_error(srv, prompt) -> dict:
    run = srv.run(prompt, timeout=300)
    assert run.status == "error", f"expected an execution error, got {run.status}: {run.outputs}"
    return run.error


def queue_invalid(srv, prompt) -> list[dict]:
    status, body = srv.queue(prompt)
    assert status == 400, (status, body)
    return [dict(e, node=nid) for nid, ne in body["node_errors"].items() for e in ne["errors"]]


def encode_graph(model="flextok_tiny", fit="center-crop", image="example.png"):
    return {
        "img": {"class_type": "LoadImage", "inputs": {"image": image}},
        "m": {"class_type": "FlexTokLoad", "inputs": {"model_name": model, "device": "default", "dtype": "auto"}},
        "enc": {"class_type": "FlexTokEncode", "inputs": {"flextok_model": ["m", 0], "image": ["img", 0], "fit": fit,
                                                          "posterior_seed": 0}},
    }


def decode_node(model_ref, tokens_ref, steps=3, seed=0):
    return {"class_type": "FlexTokDecode", "inputs": {"flextok_model": model_ref, "tokens": tokens_ref, "steps": steps,
                                                      "guidance_scale": 7.5, "use_apg": True, "seed": seed}}


def token_file_options(srv) -> list[str]:
    return srv.object_info("FlexTokLoadTokens")["FlexTokLoadTokens"]["input"]["required"]["tokens_file"][1]["options"]


def save_node(images_ref, prefix):
    return {"class_type": "SaveImage", "inputs": {"images": images_ref, "filename_prefix": prefix}}


def example(path: Path) -> dict:
    """An example workflow (UI format) with Load FlexTok switched to this module's test model and Load Image to its
    test image (the examples open a demo sample photo, which only scripts/comfyui_demo.sh copies into input/)."""
    return retarget_workflow(json.loads(path.read_text()), model=TEST_MODELS[path], image="example.png")


# ------------------------------------------------------------------------------------------------ no server
def test_core_k_lists_and_tokens(tmp_path):
    assert core.parse_k_list("1, 4,16;16", n=32) == [1, 4, 16]
    for text, msg in [("0,4", "k=0 is too small"), ("1,64", "more than this model's N=32"), ("", "empty"),
                      ("1,x", "'x' is not an integer")]:
        with pytest.raises(ValueError, match=msg):
            core.parse_k_list(text, n=32)
    with pytest.raises(ValueError, match="more than the 8 tokens in the input"):
        core.parse_k_list("16", n=32, available=8)
    tok = core.FlexTokTokens.of(torch.arange(64).view(2, 32), "a" * 32, "m", (128, 128), 32, 64000)
    assert tok.truncate(4).ids.tolist() == [[0, 1, 2, 3], [32, 33, 34, 35]]
    with pytest.raises(ValueError, match="k=33 is more than the 32 tokens"):
        tok.truncate(33)
    with pytest.raises(ValueError, match="another FlexTok model.*'m'.*'x'"):
        tok.check_model("b" * 32, "x")
    path = tmp_path / "sub" / "t.safetensors"
    core.save_tokens(tok.truncate(5), str(path))
    assert sorted(os.listdir(path.parent)) == ["t.safetensors"]  # no temp file left behind
    back = core.load_tokens(str(path))
    assert back.ids.tolist() == tok.ids[:, :5].tolist() and back.model_id == tok.model_id
    assert back.image_size == (128, 128) and back.num_registers == 32
    assert core.list_token_files(str(tmp_path)) == ["sub/t.safetensors"]
    write_safetensors(tmp_path / "plain.safetensors", {"x": [1.0]})
    with pytest.raises(ValueError, match="not FlexTok tokens"):
        core.load_tokens(str(tmp_path / "plain.safetensors"))


def test_core_fit_images():
    img = torch.rand(2, 96, 160, 3)
    assert core.FIT_MODES == ("center-crop", "resize", "none")  # the one vocabulary (images.FITS)
    crop = core.fit_images(img, (128, 128), "center-crop")
    assert crop.shape == (2, 3, 128, 128)
    squashed = core.fit_images(img, (128, 128), "resize")
    assert squashed.shape == (2, 3, 128, 128) and not torch.equal(crop, squashed)
    # workflows saved before the rename hold center_crop / stretch: the same fits
    assert torch.equal(core.fit_images(img, (128, 128), "center_crop"), crop)
    assert torch.equal(core.fit_images(img, (128, 128), "stretch"), squashed)
    same = core.fit_images(img[:, :, 16:112], (96, 96), "center-crop")  # exact size: untouched
    assert torch.equal(same, img[:, :, 16:112].movedim(-1, 1))
    with pytest.raises(ValueError, match="fit must be one of center-crop, resize, none, got 'squash'"):
        core.fit_images(img, (128, 128), "squash")

    def check(h, w):
        raise ValueError(f"image size {h}x{w} is not supported")
    with pytest.raises(ValueError, match="96x160 is not supported.*'center-crop' or 'resize'"):
        core.fit_images(img, (128, 128), "none", check=check)


def test_core_model_folders_and_identity(tmp_path, golden_pipe):
    (tmp_path / "a").symlink_to(GOLDEN, target_is_directory=True)
    golden_pipe.save_pretrained(tmp_path / "deep" / "b")
    assert core.find_model_folders([str(tmp_path)]) == ["a", "deep/b"]  # never a/vae or deep/b/vae
    assert core.resolve_model_folder([str(tmp_path)], "deep/b")[1] == "diffusers"
    with pytest.raises(FileNotFoundError, match="'nope' not found.*available: \\['a', 'deep/b'\\]"):
        core.resolve_model_folder([str(tmp_path)], "nope")
    ident = core.model_identity(golden_pipe)
    assert core.model_identity(FlexTokPipeline.from_pretrained(str(tmp_path / "deep" / "b"))) == ident
    bf16 = FlexTokPipeline.from_official(str(GOLDEN))
    bf16.flextok.to(torch.bfloat16)
    assert core.model_identity(bf16) == ident  # the dtype does not change the token space
    with torch.no_grad():
        next(bf16.flextok.decoder.parameters()).add_(0.05)  # a fine-tune: another token space
    assert core.model_identity(bf16) != ident


# ------------------------------------------------------------------------------------------------ demo script
# Before the server tests, so that it does not run beside the module's server.
def test_comfyui_demo_script_check(tmp_path):
    """README's third quick-start command, `bash scripts/comfyui_demo.sh --check`, in a throw-away COMFYUI_BASE (the
    install itself stays untouched): pack, demo models and workflows installed, the reconstruct example run on
    demo_models/photo_tokenizer and the AR example on demo_models/fashion_ar through POST /prompt, PNGs printed,
    server stopped."""
    _ensure_comfyui()
    base = tmp_path / "comfy_demo"
    env = {k: v for k, v in os.environ.items() if k not in ("SMOKE", "STARTUP_TIMEOUT", "RUN_TIMEOUT")}
    env.update(COMFYUI_HOME=str(COMFYUI_HOME), COMFYUI_BASE=str(base), PORT=str(free_port()))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "comfyui_demo.sh"), "--check"], capture_output=True,
                         text=True, env=env, timeout=900)
    assert res.returncode == 0, (res.stdout + res.stderr)[-5000:]
    assert "check passed; server stopped" in res.stdout

    # what it installed: symlinks to the pack and to every demo model folder, the workflows with the demo models
    assert (base / "custom_nodes" / PACK).is_symlink() and (base / "custom_nodes" / PACK).resolve() == ROOT
    demo = sorted(p.parent.name for p in (ROOT / "demo_models").glob("*/model_index.json"))
    assert "photo_tokenizer" in demo
    linked = base / "models" / "flextok"
    assert sorted(p.name for p in linked.iterdir()) == demo
    assert all((linked / n).is_symlink() and (linked / n).resolve() == ROOT / "demo_models" / n for n in demo)
    for path, model in ((RECONSTRUCT, "photo_tokenizer"), (AR_EXAMPLE, "fashion_ar"),
                        (AUTO_EXAMPLE, "photo_tokenizer")):
        for ui in (json.loads(path.read_text()), json.loads((base / "user/default/workflows" / path.name).read_text())):
            assert [n["widgets_values"][0] for n in ui["nodes"] if n["type"] == "FlexTokLoad"] == [model], path.name
    # the reconstruct example opens a sample photo, which the demo copied into input/
    photos = [n["widgets_values"][0] for n in json.loads((base / "user/default/workflows" / RECONSTRUCT.name)
                                                         .read_text())["nodes"] if n["type"] == "LoadImage"]
    assert photos and all((ROOT / "demo_models/samples" / f).is_file() and (base / "input" / f).is_file()
                          for f in photos), photos

    # what it made: the PNGs it printed, under the base's output/: the reconstructions 64x64 like the photo demo
    # model, the AR samples 32x32 like the Fashion-MNIST one
    printed = [Path(line.strip()) for line in res.stdout.splitlines() if line.strip().endswith(".png")]
    assert printed, res.stdout[-3000:]
    assert all(p.is_file() and (base / "output") in p.parents for p in printed), printed
    sizes = {p.name: PIL.Image.open(p).size for p in printed}
    assert "flextok_reconstruct.json finished" in res.stdout and "flextok_ar_generate.json finished" in res.stdout
    # the auto-tokens example: the three sample photos, each with its chosen k (Preview as Text, printed)
    assert "flextok_auto_tokens.json finished" in res.stdout
    chosen = [line for line in res.stdout.splitlines() if line.strip().startswith("| image ")]
    assert [line.split(":")[0].strip() for line in chosen] == ["| image 0", "| image 1", "| image 2"], res.stdout
    assert {PIL.Image.open(p).size for p in printed if "/ar" not in str(p.relative_to(base))} == {(64, 64)}, sizes
    assert {PIL.Image.open(p).size for p in printed if "/ar" in str(p.relative_to(base))} == {(32, 32)}, sizes


# ------------------------------------------------------------------------------------------------ server
def test_pack_imports_and_registers(srv, info):
    log = srv.log_path.read_text(errors="replace")
    assert "IMPORT FAILED" not in "\n".join(line for line in log.splitlines() if PACK in line), log[-3000:]
    for node in NODE_IDS:
        assert node in info, node
        assert info[node]["category"] == "FlexTok"
        assert info[node]["python_module"] == f"custom_nodes.{PACK}"
    assert info["FlexTokLoad"]["display_name"] == "Load FlexTok"
    assert info["FlexTokSaveTokens"]["output_node"] is True


def _inputs(info, node):
    req = info[node]["input"]["required"]
    return {name: spec[0] for name, spec in req.items()}


def test_object_info_inputs(info):
    assert _inputs(info, "FlexTokLoad") == {"model_name": "COMBO", "device": "COMBO", "dtype": "COMBO"}
    models = info["FlexTokLoad"]["input"]["required"]["model_name"][1]["options"]
    assert models == ["flextok_tiny", "flextok_tiny_diffusers", "other/flextok_other"]  # folders, never vae/
    assert _inputs(info, "FlexTokEncode") == {"flextok_model": "FLEXTOK_MODEL", "image": "IMAGE", "fit": "COMBO",
                                               "posterior_seed": "INT"}
    fit = info["FlexTokEncode"]["input"]["required"]["fit"][1]
    assert fit["options"] == ["center-crop", "resize", "none"] and fit["default"] == "center-crop"
    assert _inputs(info, "FlexTokTruncate") == {"tokens": "FLEXTOK_TOKENS", "k": "INT"}
    assert info["FlexTokTruncate"]["input"]["required"]["k"][1]["min"] == 1
    sampling = {"steps": "INT", "guidance_scale": "FLOAT", "use_apg": "BOOLEAN", "seed": "INT"}
    assert _inputs(info, "FlexTokDecode") == {"flextok_model": "FLEXTOK_MODEL", "tokens": "FLEXTOK_TOKENS", **sampling}
    assert _inputs(info, "FlexTokCoarseToFine") == {"flextok_model": "FLEXTOK_MODEL", "tokens": "FLEXTOK_TOKENS",
                                                     "k_values": "STRING", **sampling, "label": "BOOLEAN"}
    assert _inputs(info, "FlexTokSaveTokens") == {"tokens": "FLEXTOK_TOKENS", "filename_prefix": "STRING"}
    assert _inputs(info, "FlexTokLoadTokens") == {"tokens_file": "COMBO"}
    assert "not_tokens.safetensors" not in info["FlexTokLoadTokens"]["input"]["required"]["tokens_file"][1]["options"]
    assert _inputs(info, "FlexTokAutoTokens") == {
        "flextok_model": "FLEXTOK_MODEL", "image": "IMAGE", "metric": "COMBO", "target": "FLOAT",
        "candidates": "STRING", "fit": "COMBO", "posterior_seed": "INT", **sampling}
    assert info["FlexTokAutoTokens"]["input"]["required"]["metric"][1]["options"] == ["psnr", "ssim", "lpips"]
    assert _inputs(info, "FlexTokARGenerate") == {
        "flextok_model": "FLEXTOK_MODEL", "class_label": "STRING", "prompt": "STRING", "num_tokens": "INT",
        "ar_guidance_scale": "FLOAT", "temperature": "FLOAT", "top_k": "INT", "top_p": "FLOAT", "seed": "INT",
        "batch_size": "INT"}
    outputs = {n: info[n]["output"] for n in NODE_IDS}
    assert outputs == {"FlexTokLoad": ["FLEXTOK_MODEL"], "FlexTokEncode": ["FLEXTOK_TOKENS"],
                       "FlexTokTruncate": ["FLEXTOK_TOKENS"], "FlexTokDecode": ["IMAGE"],
                       "FlexTokCoarseToFine": ["IMAGE", "IMAGE"], "FlexTokSaveTokens": [],
                       "FlexTokLoadTokens": ["FLEXTOK_TOKENS"], "FlexTokARGenerate": ["FLEXTOK_TOKENS"],
                       "FlexTokAutoTokens": ["FLEXTOK_TOKENS", "STRING"]}


def test_example_workflows_served(srv):
    status, templates = srv.get("/api/workflow_templates")
    assert status == 200 and sorted(templates[PACK]) == ["flextok_ar_generate", "flextok_auto_tokens",
                                                          "flextok_reconstruct"]
    status, body = srv.get(f"/api/workflow_templates/{PACK}/flextok_reconstruct.json")
    assert status == 200 and body["nodes"]


def test_reconstruct_example(srv, info, base, golden_pipe):
    prompt = ui_to_api(example(RECONSTRUCT), info)
    kinds = {nid: n["class_type"] for nid, n in prompt.items()}
    assert sorted(kinds.values()) == sorted(["LoadImage", "FlexTokLoad", "FlexTokEncode", "FlexTokCoarseToFine",
                                             "SaveImage", "PreviewImage", "FlexTokTruncate", "FlexTokDecode",
                                             "SaveImage", "FlexTokSaveTokens"])
    by_kind = {v: k for k, v in kinds.items()}
    c2f, dec = by_kind["FlexTokCoarseToFine"], by_kind["FlexTokDecode"]
    ks = [int(k) for k in prompt[c2f]["inputs"]["k_values"].split(",")]
    steps = prompt[dec]["inputs"]["steps"]
    k_trunc = prompt[by_kind["FlexTokTruncate"]]["inputs"]["k"]
    run = run_ok(srv, prompt)

    # outputs: one frame per k, a strip, the decoded image, the token file
    out = run.outputs
    saves = [nid for nid, k in kinds.items() if k == "SaveImage"]
    frames_node = next(n for n in saves if prompt[n]["inputs"]["images"][0] == c2f)
    single_node = next(n for n in saves if n != frames_node)
    frames = [Path(base, i["type"], i["subfolder"], i["filename"]) for i in out[frames_node]["images"]]
    assert len(frames) == len(ks) and all(PIL.Image.open(f).size == (128, 128) for f in frames)
    strip = out[by_kind["PreviewImage"]]["images"]
    assert len(strip) == 1 and strip[0]["type"] == "temp"
    assert PIL.Image.open(Path(base, "temp", strip[0]["subfolder"], strip[0]["filename"])).size == (128 * len(ks), 128)
    single = out[single_node]["images"]
    assert len(single) == 1
    decoded = load_image01(Path(base, "output", single[0]["subfolder"], single[0]["filename"]))
    assert decoded.shape == (128, 128, 3)
    saved = out[by_kind["FlexTokSaveTokens"]]["flextok_tokens"][0]
    tokens = core.load_tokens(str(Path(base, "output", saved["subfolder"], saved["filename"])))
    assert tokens.ids.shape == (1, k_trunc) and tokens.image_size == (128, 128)
    assert tokens.model_id == core.model_identity(golden_pipe) and tokens.model_name == "flextok_tiny"

    # the nodes compute what the pipeline computes: same tokens, same image
    x = core.fit_images(load_image01(base / "input" / "example.png")[None], (128, 128), "center-crop")
    ref_ids = golden_pipe.tokenize(x * 2 - 1, generator=torch.Generator().manual_seed(0))
    assert tokens.ids.tolist() == ref_ids[:, :k_trunc].tolist()
    ref = golden_pipe.detokenize(ref_ids[:, :k_trunc], num_inference_steps=steps,
                                 guidance_scale=prompt[dec]["inputs"]["guidance_scale"], use_apg=True,
                                 generator=[torch.Generator().manual_seed(0)], output_type="pt").images
    assert (decoded - ref[0].permute(1, 2, 0)).abs().max() < 3 / 255
    # Coarse-to-Fine's k=k_trunc frame is the same decode (same noise per image); compare below its label
    frame = load_image01(frames[ks.index(k_trunc)])
    assert (frame[32:] - decoded[32:]).abs().mean() < 2 / 255

    # progress over the websocket: one message per sampling step, for each sampling node
    for node in (dec, c2f):
        values = [(d["value"], d["max"]) for d in run.of_type("progress") if d["node"] == node]
        assert values == [(i, steps) for i in range(1, steps + 1)], (node, values)


def test_tokens_load_round_trip(srv, base):
    files = sorted((base / "output" / "flextok").glob("tokens_*.safetensors"))
    if not files:
        run_ok(srv, {**encode_graph(), "t": {"class_type": "FlexTokTruncate", "inputs": {"tokens": ["enc", 0], "k": 8}},
                     "s": {"class_type": "FlexTokSaveTokens", "inputs": {"tokens": ["t", 0],
                                                                          "filename_prefix": "flextok/tokens"}}})
        files = sorted((base / "output" / "flextok").glob("tokens_*.safetensors"))
    name = f"flextok/{files[0].name} [output]"
    assert name in token_file_options(srv)
    shutil.copy(files[0], base / "input" / "mine.safetensors")
    options = token_file_options(srv)
    assert "mine.safetensors" in options and "not_tokens.safetensors" not in options
    prompt = {
        "m": encode_graph()["m"],
        "lt": {"class_type": "FlexTokLoadTokens", "inputs": {"tokens_file": "mine.safetensors"}},
        "d": decode_node(["m", 0], ["lt", 0], steps=2, seed=5),
        "s": save_node(["d", 0], "roundtrip"),
    }
    run = run_ok(srv, prompt)
    assert len(run.output_files()) == 1 and PIL.Image.open(run.output_files()[0]).size == (128, 128)


def flextok_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "flextok_kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_cli_and_nodes_read_each_others_token_files(srv, base, golden_pipe, tmp_path):
    """One token-file format: `flextok tokenize` -> FlexTok Load Tokens -> Decode, a ragged file -> Truncate ->
    Decode, and FlexTok Save Tokens -> `flextok detokenize`, each decoding what the pipeline decodes from the same
    ids with image i's noise seeded seed + i (the nodes' and the CLI's convention)."""
    flextok_cli("tokenize", base / "input" / "example.png", "--model", GOLDEN, "--fit", "center-crop", "--size", "128",
                "--num-tokens", "8", "--out", base / "input" / "from_cli.safetensors", "--quiet")
    row = token_files.load(base / "input" / "from_cli.safetensors").rows()[0]
    token_files.TokenFile.from_rows([row, row[:3]], golden_pipe.fingerprint, model_name="flextok_tiny",
                                    image_sizes=[(128, 128)] * 2, num_registers=32,
                                    vocab_size=64000).save(base / "input" / "ragged.safetensors")
    assert {"from_cli.safetensors", "ragged.safetensors"} <= set(token_file_options(srv))
    prompt = {
        "m": encode_graph()["m"],
        "a": {"class_type": "FlexTokLoadTokens", "inputs": {"tokens_file": "from_cli.safetensors"}},
        "da": decode_node(["m", 0], ["a", 0], steps=2, seed=5), "sa": save_node(["da", 0], "from_cli"),
        "r": {"class_type": "FlexTokLoadTokens", "inputs": {"tokens_file": "ragged.safetensors"}},
        "t": {"class_type": "FlexTokTruncate", "inputs": {"tokens": ["r", 0], "k": 5}},  # rows of 8, 3 -> 5, 3
        "dr": decode_node(["m", 0], ["t", 0], steps=2, seed=5), "sr": save_node(["dr", 0], "ragged"),
        "st": {"class_type": "FlexTokSaveTokens", "inputs": {"tokens": ["t", 0], "filename_prefix": "from_nodes"}},
    }
    run = run_ok(srv, prompt)
    ref = golden_pipe.detokenize([row, row[:5], row[:3]], num_inference_steps=2, guidance_scale=7.5, use_apg=True,
                                 generator=[torch.Generator().manual_seed(s) for s in (5, 5, 6)],
                                 output_type="pt").images.permute(0, 2, 3, 1)
    images = {n: [load_image01(Path(base, i["type"], i["subfolder"], i["filename"])) for i in run.outputs[n]["images"]]
              for n in ("sa", "sr")}
    assert len(images["sa"]) == 1 and len(images["sr"]) == 2
    for image, expected in zip(images["sa"] + images["sr"], ref):
        assert (image - expected).abs().max() < 3 / 255

    saved = run.outputs["st"]["flextok_tokens"][0]
    path = Path(base, "output", saved["subfolder"], saved["filename"])
    assert token_files.load(path).lengths.tolist() == [5, 3]  # ragged rows survive Save Tokens
    out = tmp_path / "png"
    flextok_cli("detokenize", path, "--model", GOLDEN, "--steps", "2", "--seed", "5", "--out", out, "--quiet")
    pngs = sorted(out.iterdir())  # rows without a source are named after the token file
    assert [p.name for p in pngs] == [f"{path.stem}_{i:05d}.png" for i in range(2)]
    for png, expected in zip(pngs, ref[1:]):
        assert (load_image01(png) - expected).abs().max() < 3 / 255


def test_encode_accepts_old_fit_names(srv, base, golden_pipe):
    """Workflows saved before the one fit vocabulary hold center_crop / stretch: /prompt takes them and Encode fits as
    center-crop / resize do."""
    image = load_image01(base / "input" / "example.png")[None]
    for old, new in (("center_crop", "center-crop"), ("stretch", "resize")):
        prompt = {**encode_graph(fit=old), "s": {"class_type": "FlexTokSaveTokens", "inputs": {
            "tokens": ["enc", 0], "filename_prefix": f"old_fit_{old}"}}}
        saved = run_ok(srv, prompt).outputs["s"]["flextok_tokens"][0]
        ids = core.load_tokens(str(Path(base, "output", saved["subfolder"], saved["filename"]))).ids
        x = core.fit_images(image, (128, 128), new)
        assert ids.tolist() == golden_pipe.tokenize(x * 2 - 1, generator=torch.Generator().manual_seed(0)).tolist()


def test_same_weights_in_diffusers_format_decode_the_tokens(srv):
    """Official and diffusers folders of the same weights share the identity; from_pretrained works in ComfyUI."""
    prompt = {**encode_graph("flextok_tiny"),
              "m2": {"class_type": "FlexTokLoad", "inputs": {"model_name": "flextok_tiny_diffusers",
                                                              "device": "cpu", "dtype": "fp32"}},
              "d": decode_node(["m2", 0], ["enc", 0], steps=2, seed=1), "s": save_node(["d", 0], "diffusers")}
    run = run_ok(srv, prompt)
    assert len(run.output_files()) == 1


def test_decode_defaults_to_the_models_own_sampler(srv):
    """steps 0 / guidance -1 (the new nodes' defaults) = the loaded model's own sampler: 25 steps for a teacher (a
    distilled model records fewer; tests/test_distill.py checks that default in the pipeline)."""
    prompt = {**encode_graph(), "d": {"class_type": "FlexTokDecode", "inputs": {
        "flextok_model": ["m", 0], "tokens": ["enc", 0], "steps": 0, "guidance_scale": -1.0, "use_apg": True,
        "seed": 0}}, "s": save_node(["d", 0], "defaults")}
    run = run_ok(srv, prompt)
    values = [(d["value"], d["max"]) for d in run.of_type("progress") if d["node"] == "d"]
    assert values == [(i, 25) for i in range(1, 26)], values
    assert len(run.output_files()) == 1


def test_validation_errors(srv):
    """Bad widget values are refused by /prompt (400) with a message naming the input."""
    g = {**encode_graph(), "t": {"class_type": "FlexTokTruncate", "inputs": {"tokens": ["enc", 0], "k": 0}},
         "d": decode_node(["m", 0], ["t", 0]), "s": save_node(["d", 0], "bad")}
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "value_smaller_than_min" and e["details"].startswith("k") and e["node"] == "t"
               for e in errs), errs

    # ComfyUI 0.3.75 does not check V3 dropdown values itself (value_not_in_list is V1 only): the nodes do
    g = {**encode_graph(model="no_such_model"), "d": decode_node(["m", 0], ["enc", 0]), "s": save_node(["d", 0], "bad")}
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "custom_validation_failed" and e["node"] == "m" and "'no_such_model' is not a FlexTok model"
               in e["details"] and "flextok_tiny" in e["details"] for e in errs), errs

    g = {**encode_graph(fit="squash"), "d": decode_node(["m", 0], ["enc", 0]), "s": save_node(["d", 0], "bad")}
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "custom_validation_failed" and "fit: 'squash'" in e["details"] for e in errs), errs

    # steps 0 = the model's default (a distilled decoder's few steps); below 0 is refused
    g = {**encode_graph(), "d": decode_node(["m", 0], ["enc", 0], steps=-1), "s": save_node(["d", 0], "bad")}
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "value_smaller_than_min" and e["details"] == "steps" for e in errs), errs

    g = {**encode_graph(), "c": {"class_type": "FlexTokCoarseToFine", "inputs": {
        "flextok_model": ["m", 0], "tokens": ["enc", 0], "k_values": "0,4", "steps": 2, "guidance_scale": 7.5,
        "use_apg": True, "seed": 0, "label": True}}, "s": save_node(["c", 0], "bad")}
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "custom_validation_failed" and "k=0 is too small" in e["details"] for e in errs), errs
    g["c"]["inputs"].update(k_values="1,4", steps=-1)  # validate_inputs must not switch off the min/max checks
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "value_smaller_than_min" and e["details"] == "steps" for e in errs), errs

    g = {"lt": {"class_type": "FlexTokLoadTokens", "inputs": {"tokens_file": "not_tokens.safetensors"}},
         **encode_graph(), "d": decode_node(["m", 0], ["lt", 0]), "s": save_node(["d", 0], "bad")}
    errs = queue_invalid(srv, g)
    assert any(e["type"] == "custom_validation_failed" and e["node"] == "lt" and "not a FlexTok token file"
               in e["details"] for e in errs), errs


def test_execution_errors_are_clear_and_server_survives(srv):
    g = {**encode_graph(), "t": {"class_type": "FlexTokTruncate", "inputs": {"tokens": ["enc", 0], "k": 64}},
         "d": decode_node(["m", 0], ["t", 0]), "s": save_node(["d", 0], "bad")}
    err = run_error(srv, g)
    assert err["node_type"] == "FlexTokTruncate"
    assert "k=64 is more than the 32 tokens" in err["exception_message"], err["exception_message"]

    g = {**encode_graph(), "c": {"class_type": "FlexTokCoarseToFine", "inputs": {
        "flextok_model": ["m", 0], "tokens": ["enc", 0], "k_values": "1,64", "steps": 2, "guidance_scale": 7.5,
        "use_apg": True, "seed": 0, "label": True}}, "s": save_node(["c", 0], "bad")}
    err = run_error(srv, g)
    assert "k=64 is more than this model's N=32" in err["exception_message"], err["exception_message"]

    g = {**encode_graph(fit="none"), "d": decode_node(["m", 0], ["enc", 0]), "s": save_node(["d", 0], "bad")}
    err = run_error(srv, g)
    assert err["node_type"] == "FlexTokEncode"
    assert "96x160" in err["exception_message"] and "multiples of 16" in err["exception_message"]

    g = {**encode_graph(), "m2": {"class_type": "FlexTokLoad", "inputs": {"model_name": "other/flextok_other",
                                                                           "device": "default", "dtype": "auto"}},
         "d": decode_node(["m2", 0], ["enc", 0]), "s": save_node(["d", 0], "bad")}
    err = run_error(srv, g)
    assert err["node_type"] == "FlexTokDecode"
    msg = err["exception_message"]
    assert "another FlexTok model" in msg and "'flextok_tiny'" in msg and "'other/flextok_other'" in msg, msg

    g = {**encode_graph(), "ar": {"class_type": "FlexTokARGenerate", "inputs": {
        "flextok_model": ["m", 0], "class_label": "1", "prompt": "", "num_tokens": 8, "ar_guidance_scale": 5.0,
        "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 0, "batch_size": 1}},
         "d": decode_node(["m", 0], ["ar", 0]), "s": save_node(["d", 0], "bad")}
    err = run_error(srv, g)
    assert err["node_type"] == "FlexTokARGenerate" and "has no AR model" in err["exception_message"]

    # still serving, and a good run after the failures works
    assert srv.get("/system_stats")[0] == 200
    run_ok(srv, {**encode_graph(), "d": decode_node(["m", 0], ["enc", 0], steps=2, seed=11),
                 "s": save_node(["d", 0], "after_errors")})


def _make_tiny_ar_folder(dest: Path) -> None:
    """A diffusers-format folder: the golden tokenizer plus a tiny random class-conditional AR model."""
    from flextok_kit.flextok_core.ar import FlexTokAR
    pipe = FlexTokPipeline.from_official(str(GOLDEN))
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny", num_classes=10, max_tokens=32, id2label={i: f"class_{i}" for i in range(10)})
    FlexTokPipeline(vae=pipe.vae, flextok=pipe.flextok, scheduler=pipe.scheduler,
                    ar_model=ar.eval()).save_pretrained(dest)


@pytest.mark.skipif(not HAS_AR_BACKEND, reason="the AR backend (FlexTokPipeline.generate_tokens and "
                                               "flextok_core.FlexTokAR, which model_index.json names) is not there yet")
def test_ar_generate_example(srv, base):
    _make_tiny_ar_folder(base / "models" / "flextok" / "flextok_tiny_ar")
    info = srv.object_info()
    prompt = ui_to_api(example(AR_EXAMPLE), info)
    ar = next(nid for nid, n in prompt.items() if n["class_type"] == "FlexTokARGenerate")
    k, b = prompt[ar]["inputs"]["num_tokens"], prompt[ar]["inputs"]["batch_size"]
    run = run_ok(srv, prompt)
    saved = next(o["flextok_tokens"][0] for o in run.outputs.values() if "flextok_tokens" in o)
    tokens = core.load_tokens(str(Path(base, "output", saved["subfolder"], saved["filename"])))
    assert tokens.ids.shape == (b, k) and 0 <= int(tokens.ids.min()) and int(tokens.ids.max()) < 64000
    assert tokens.model_name == "flextok_tiny_ar" and tokens.image_size == (128, 128)
    images = [p for p in run.output_files(kinds=("output",)) if p.suffix == ".png"]
    assert len(images) == b and all(PIL.Image.open(p).size == (128, 128) for p in images)

    # a class name, through the AR config's id2label; and the node's own checks
    def ar_graph(**over):
        inputs = dict(prompt[ar]["inputs"], flextok_model=["m", 0], **over)
        return {"m": {"class_type": "FlexTokLoad", "inputs": {"model_name": "flextok_tiny_ar", "device": "default",
                                                               "dtype": "auto"}},
                "ar": {"class_type": "FlexTokARGenerate", "inputs": inputs},
                "s": {"class_type": "FlexTokSaveTokens", "inputs": {"tokens": ["ar", 0],
                                                                     "filename_prefix": "flextok/ar_named"}}}
    run_ok(srv, ar_graph(class_label="class_3", num_tokens=4, batch_size=1))
    assert "out of range" in run_error(srv, ar_graph(class_label="10"))["exception_message"]
    assert "class_x" in run_error(srv, ar_graph(class_label="class_x"))["exception_message"]
    assert "use 1..32" in run_error(srv, ar_graph(num_tokens=33))["exception_message"]


# ------------------------------------------------------------------------------------------------ auto tokens
def _chosen_lines(run) -> list[str]:
    texts = [t for o in run.outputs.values() for t in o.get("text", []) if "image 0: k=" in t]
    assert len(texts) == 1, run.outputs
    return texts[0].splitlines()


def test_auto_tokens_example(srv, info, base):
    """The example on the test model: three photos in one batch -> ragged tokens (each row its own k, the same k as
    the text output says) -> Decode renders one image per row; Save Tokens keeps the lengths and the scores."""
    prompt = ui_to_api(example(AUTO_EXAMPLE), info)
    kinds = {nid: n["class_type"] for nid, n in prompt.items()}
    assert sorted(kinds.values()) == sorted(["LoadImage"] * 3 + ["ImageBatch"] * 2 + [
        "FlexTokLoad", "FlexTokAutoTokens", "FlexTokDecode", "SaveImage", "PreviewAny", "FlexTokSaveTokens"])
    run = run_ok(srv, prompt)
    by_kind = {v: k for k, v in kinds.items()}
    saved = run.outputs[by_kind["FlexTokSaveTokens"]]["flextok_tokens"][0]
    tokens = core.load_tokens(str(Path(base, "output", saved["subfolder"], saved["filename"])))
    lines = _chosen_lines(run)
    assert len(lines) == 4 and lines[-1].startswith("mean k")
    ks = [int(line.split("k=")[1].split(" ")[0]) for line in lines[:3]]
    assert tokens.lengths.tolist() == ks and tokens.image_size == (128, 128)
    auto = tokens.extra["auto"]
    assert [r["k"] for r in auto["rows"]] == ks and auto["metric"] == "psnr" and auto["candidates"][-1] == 32
    images = run.outputs[by_kind["SaveImage"]]["images"]
    assert len(images) == 3 and all(PIL.Image.open(Path(base, "output", i["subfolder"], i["filename"])).size
                                    == (128, 128) for i in images)


def _psnr_table(pipe, x, posterior_seed, seed, ks, steps):
    """What the node computes for image i (posterior seed + i, noise seed + i), at every candidate: [B, len(ks)]."""
    from flextok_kit.metrics import psnr
    rows = []
    for i in range(x.shape[0]):
        ids = pipe.tokenize(x[i:i + 1] * 2 - 1, generator=torch.Generator().manual_seed(posterior_seed + i))
        noise = torch.randn(1, 16, *(s // 8 for s in x.shape[-2:]), generator=torch.Generator().manual_seed(seed + i))
        out = pipe.detokenize([ids[0, :k] for k in ks], latents=noise.expand(len(ks), -1, -1, -1), output_type="pt",
                              num_inference_steps=steps, guidance_scale=3.0).images
        rows.append(psnr(out * 2 - 1, (x[i:i + 1] * 2 - 1).expand(len(ks), -1, -1, -1)).tolist())
    return np.array(rows)


def test_auto_tokens_node_follows_the_rule_on_the_demo_model(srv, base):
    """On the trained demo tokenizer (scores differ clearly between k): the node picks, per image, the smallest k
    whose PSNR reaches the target (as this process computes it with the same seeds), and Decode with the same seed
    renders the scored images."""
    photo = ROOT / "demo_models" / "photo_tokenizer"
    link = base / "models" / "flextok" / "photo_tokenizer"
    if not link.exists():
        link.symlink_to(photo, target_is_directory=True)
    names = ["Dragonfly_by_Bolly.jpg", "sunset_by_Aitzol_Berasategi.jpg"]
    for name in names:
        shutil.copy(ROOT / "demo_models" / "samples" / name, base / "input" / name)
    pipe = FlexTokPipeline.from_pretrained(photo)
    pipe.set_progress_bar_config(disable=True)
    x = core.fit_images(torch.stack([load_image01(base / "input" / n) for n in names]), (64, 64), "center-crop")
    ks, steps = [1, 2, 4, 8, 16], 6
    table = _psnr_table(pipe, x, 3, 5, ks, steps)
    values = np.sort(table.reshape(-1))
    gaps = [((a + b) / 2, b - a) for a, b in zip(values[:-1], values[1:]) if b - a > 0.1]
    rule = lambda t: [next((k for k, v in zip(ks, row) if v >= t), ks[-1]) for row in table]  # noqa: E731
    target = max(gaps, key=lambda g: (len(set(rule(g[0]))), g[1]))[0]  # different k per image if possible
    sampling = {"steps": steps, "guidance_scale": 3.0, "use_apg": True, "seed": 5}
    prompt = {
        "a": {"class_type": "LoadImage", "inputs": {"image": names[0]}},
        "b": {"class_type": "LoadImage", "inputs": {"image": names[1]}},
        "ab": {"class_type": "ImageBatch", "inputs": {"image1": ["a", 0], "image2": ["b", 0]}},
        "m": {"class_type": "FlexTokLoad", "inputs": {"model_name": "photo_tokenizer", "device": "default",
                                                       "dtype": "auto"}},
        "auto": {"class_type": "FlexTokAutoTokens", "inputs": {
            "flextok_model": ["m", 0], "image": ["ab", 0], "metric": "psnr", "target": round(float(target), 4),
            "candidates": "", "fit": "center-crop", "posterior_seed": 3, **sampling}},
        "d": {"class_type": "FlexTokDecode", "inputs": {"flextok_model": ["m", 0], "tokens": ["auto", 0],
                                                         **sampling}},
        "s": save_node(["d", 0], "auto_rule"),
        "p": {"class_type": "PreviewAny", "inputs": {"source": ["auto", 1]}},
    }
    run = run_ok(srv, prompt)
    lines = _chosen_lines(run)
    chosen = [int(line.split("k=")[1].split(" ")[0]) for line in lines[:2]]
    assert chosen == rule(target), (target, table.round(3), lines)
    for i, item in enumerate(run.outputs["s"]["images"]):
        decoded = load_image01(Path(base, "output", item["subfolder"], item["filename"]))
        mse = ((decoded - x[i].permute(1, 2, 0)) ** 2).mean()
        score = float(10 * torch.log10(1 / mse))
        assert abs(score - table[i, ks.index(chosen[i])]) < 0.1, (i, score, table[i])


def test_auto_tokens_refuses_bad_values(srv):
    def graph(**over):
        inputs = {"flextok_model": ["m", 0], "image": ["img", 0], "metric": "psnr", "target": 20.0,
                  "candidates": "", "fit": "center-crop", "posterior_seed": 0, "steps": 2, "guidance_scale": 3.0,
                  "use_apg": True, "seed": 0}
        g = encode_graph()
        del g["enc"]
        return {**g, "auto": {"class_type": "FlexTokAutoTokens", "inputs": dict(inputs, **over)},
                "d": decode_node(["m", 0], ["auto", 0], steps=2), "s": save_node(["d", 0], "bad")}

    for over, message in [(dict(target=0.0), "target must be a finite number > 0"),
                          (dict(metric="ssim", target=1.5), "target must be a finite number in [-1, 1]"),
                          (dict(metric="mse"), "metric: 'mse' is not one of the options"),
                          (dict(candidates="0,4"), "candidates: k=0 is too small"),
                          (dict(candidates="2,x"), "candidates: 'x' is not an integer")]:
        errs = queue_invalid(srv, graph(**over))
        assert any(e["type"] == "custom_validation_failed" and e["node"] == "auto" and message in e["details"]
                   for e in errs), (over, errs)
    err = run_error(srv, graph(candidates="4,64"))
    assert err["node_type"] == "FlexTokAutoTokens" and "k=64 is more than this model's N=32" in err["exception_message"]
    has_lpips = subprocess.run([str(COMFY_PY), "-c", "import stlpips_pytorch"], capture_output=True).returncode == 0
    if not has_lpips:  # ComfyUI's env without the wheel: a clear message, not a traceback deep inside
        err = run_error(srv, graph(metric="lpips", target=0.2))
        assert "metric='lpips' needs ST-LPIPS" in err["exception_message"], err["exception_message"]


def _browser_available() -> str | None:
    if not Path("/usr/bin/chromium").exists():
        return "Debian chromium is not installed (.ci/comfyui.sh --with-browser)"
    res = subprocess.run([str(COMFY_PY), "-c", "import playwright"], capture_output=True)
    if res.returncode != 0:
        return "playwright is not installed in ComfyUI's env (.ci/comfyui.sh --with-browser)"
    return None


def test_browser_frontend_loads_and_runs_the_examples(srv, info, tmp_path):
    reason = _browser_available()
    if reason:
        _unavailable(reason)
    shot = tmp_path / "comfyui_workflow.png"
    copies = {}  # the examples with this module's test models
    for path in (AR_EXAMPLE, AUTO_EXAMPLE, RECONSTRUCT):
        copies[path] = tmp_path / path.name
        copies[path].write_text(json.dumps(example(path), indent=1))
    cmd = [str(COMFY_PY), str(ROOT / "tests" / "browser_check.py"), "--url", srv.url, "--expect", *NODE_IDS,
           "--workflow", str(copies[AR_EXAMPLE]), "--workflow", str(copies[AUTO_EXAMPLE]),
           "--workflow", str(copies[RECONSTRUCT]), "--run",
           "--screenshot", str(shot)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["missing"] == [] and set(report["categories"].values()) == {"FlexTok"}
    for path in (AR_EXAMPLE, AUTO_EXAMPLE, RECONSTRUCT):
        wf = report["workflows"][str(copies[path])]
        assert wf["unknown"] == [], wf["unknown"]
        # the frontend turns the workflow into the same prompt as the tests' converter
        made = {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in wf["prompt"].items()}
        assert made == ui_to_api(example(path), info), path.name
    run = report["run"]  # the reconstruct example, queued by the frontend like the Run button
    assert run["status"] == "success" and "execution_success" in run["messages"], run
    saves = [str(n["id"]) for n in json.loads(RECONSTRUCT.read_text())["nodes"]
             if n["type"] in ("SaveImage", "PreviewImage")]
    assert set(saves) <= set(run["outputs"]), run
    assert report["page_errors"] == [], report["page_errors"]
    assert PIL.Image.open(shot).size[0] >= 1200
    if os.environ.get("FLEXTOK_UPDATE_SCREENSHOT") == "1":
        (ROOT / "docs").mkdir(exist_ok=True)
        shutil.copy(shot, ROOT / "docs" / "comfyui_workflow.png")


# last: /free clears ComfyUI's cache, which the browser test's run of the reconstruct example reuses
def test_interrupt_and_free(srv):
    """/interrupt stops a long decode between steps; /free unloads the model and the next run loads it again."""
    g = {**encode_graph(), "d": decode_node(["m", 0], ["enc", 0], steps=1000, seed=123),
         "s": save_node(["d", 0], "int")}
    client_id = str(uuid.uuid4())
    ws = srv.connect_ws(client_id, timeout=120)
    try:
        status, body = srv.queue(g, client_id)
        assert status == 200, body
        pid, seen, interrupted_at = body["prompt_id"], [], None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            raw = ws.recv()
            if isinstance(raw, bytes):
                continue
            msg = json.loads(raw)
            data = msg.get("data") or {}
            seen.append(msg.get("type"))
            if msg.get("type") == "progress" and data.get("node") == "d" and interrupted_at is None:
                interrupted_at = data["value"]
                srv.interrupt()
            if msg.get("type") in ("execution_success", "execution_error", "execution_interrupted") \
                    and data.get("prompt_id") == pid:
                break
    finally:
        ws.close()
    assert seen[-1] == "execution_interrupted", seen[-10:]
    assert interrupted_at is not None and interrupted_at < 1000
    srv.free()
    time.sleep(1.0)
    run_ok(srv, {**encode_graph(), "d": decode_node(["m", 0], ["enc", 0], steps=2, seed=7),
                 "s": save_node(["d", 0], "after_free")})
    log = srv.log_path.read_text(errors="replace")
    assert log.count("Requested to load FlexTokModules") >= 2, "the model did not go through load_models_gpu again"
