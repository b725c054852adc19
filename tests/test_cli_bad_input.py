"""The command line on bad input: one clear line on stderr (``flextok <cmd>: error: ...``), exit status 2, never
a traceback. And an unusual but valid input (a 16-bit image) just works, giving the tokens of its 8-bit version.

Most cases run ``cli.main`` in-process (the same parser and error handling as ``flextok``, without starting
Python again); one test runs them all as real subprocesses to check what a user's terminal shows.
"""
from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from flextok_kit import cli
from flextok_kit.pipelines import FlexTokPipeline

from .bad_input_common import make_base, png16, to8, write


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Models (good and bad) and images (good, 16-bit and unreadable), written once."""
    root = tmp_path_factory.mktemp("cli_bad")
    base = make_base(root / "base")
    ours = root / "ours"
    FlexTokPipeline.from_official(base.folder).save_pretrained(ours)
    # our format with an integer tensor
    import shutil

    int_weights = root / "int_weights"
    shutil.copytree(ours, int_weights)
    weights = int_weights / "flextok" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["decoder.mask_token"] = (state["decoder.mask_token"] * 10).long()
    save_file(state, str(weights))
    # official format whose config.json is a list
    config_list = write(root / "config_list", base, metadata=False)
    (config_list / "config.json").write_text(json.dumps([base.config]))
    # images
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    gray16 = rng.integers(0, 65536, (32, 32), dtype=np.uint16)
    rgb16 = rng.integers(0, 65536, (32, 32, 3), dtype=np.uint16)  # full range: Pillow alone would be a level off
    png16(images / "gray16.png", gray16)
    png16(images / "rgb16.png", rgb16)
    PIL.Image.fromarray(to8(gray16), mode="L").save(images / "gray8.png")
    PIL.Image.fromarray(to8(rgb16), mode="RGB").save(images / "rgb8.png")
    PIL.Image.fromarray(to8(rgb16), mode="RGB").save(images / "ok.png")
    (images / "unreadable.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 10)
    return dict(root=root, ours=ours, int_weights=int_weights, config_list=config_list, official=base.folder,
                images=images)


def run(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def error_cases(w) -> dict:
    """name -> (argv, what the one error line must contain)."""
    img, out = w["images"], w["root"] / "out"
    return {
        "int_weights": (["info", w["int_weights"]],
                        ["int_weights/flextok/diffusion_pytorch_model.safetensors", "'decoder.mask_token'", "I64",
                         "floating point"]),
        "int_weights_tokenize": (["tokenize", img / "ok.png", "--model", w["int_weights"], "--out",
                                  out / "t.safetensors", "--quiet"], ["'decoder.mask_token'", "floating point"]),
        "config_list": (["info", w["config_list"]],
                        ["config_list/ckpt/config.json", "config must be an object", "(a list)"]),
        "missing_model": (["tokenize", img / "ok.png", "--model", w["root"] / "no_such_model", "--out",
                           out / "t.safetensors", "--quiet"], ["no_such_model", "does not exist"]),
        "missing_image": (["tokenize", img / "no_such_image.png", "--model", w["ours"], "--out",
                           out / "t.safetensors", "--quiet"], ["no_such_image.png", "no such file"]),
        "unreadable_image": (["tokenize", img / "unreadable.png", "--model", w["ours"], "--out",
                              out / "t.safetensors", "--quiet"], ["cannot read image", "unreadable.png"]),
        "guidance_nan": (["reconstruct", img / "ok.png", "--model", w["ours"], "--tokens", "1", "--steps", "1",
                          "--guidance", "nan", "--out", out / "grid.png"],
                         ["guidance_scale must be a finite number >= 0", "got nan"]),
        "guidance_negative": (["reconstruct", img / "ok.png", "--model", w["official"], "--tokens", "1", "--steps",
                               "1", "--guidance", "-2", "--out", out / "grid.png"],
                              ["guidance_scale must be a finite number >= 0", "got -2.0"]),
        "steps_zero": (["reconstruct", img / "ok.png", "--model", w["ours"], "--tokens", "1", "--steps", "0",
                        "--out", out / "grid.png"], ["num_inference_steps must be an integer >= 1, got 0"]),
        "save_onto_file": (["convert", w["official"], img / "ok.png", "--overwrite"],
                           ["ok.png is an existing file, not a folder", "refusing to replace it"]),
    }


def check_one_error_line(rc, err, needles, argv):
    lines = err.strip().splitlines()
    assert rc == 2, (argv, rc, err)
    assert len(lines) == 1, (argv, err)
    assert "Traceback" not in err
    assert lines[0].startswith(f"flextok {argv[0]}: error: "), lines
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("name", ["int_weights", "int_weights_tokenize", "config_list", "missing_model",
                                  "missing_image", "unreadable_image", "guidance_nan", "guidance_negative",
                                  "steps_zero", "save_onto_file"])
def test_cli_error_is_one_line(world, capsys, name):
    argv, needles = error_cases(world)[name]
    rc, _, err = run(capsys, *argv)
    check_one_error_line(rc, err, needles, [str(a) for a in argv])
    assert not (world["root"] / "out").exists()  # nothing written
    assert (world["images"] / "ok.png").is_file()  # convert never replaced the file


def test_cli_num_tokens_zero(world, capsys):
    rc, _, err = run(capsys, "tokenize", world["images"] / "ok.png", "--model", world["ours"], "--out",
                     world["root"] / "k0" / "t.safetensors", "--num-tokens", "0", "--quiet")
    check_one_error_line(rc, err, ["num-tokens", "1..12"], ["tokenize"])


def test_cli_16bit_images_give_the_tokens_of_their_8bit_version(world, capsys, tmp_path):
    """16-bit grayscale (I;16) and 16-bit RGB PNGs tokenize like the same picture saved in 8 bits."""
    for deep, flat in (("gray16.png", "gray8.png"), ("rgb16.png", "rgb8.png")):
        got = {}
        for name in (deep, flat):
            out = tmp_path / f"{name}.safetensors"
            rc, _, err = run(capsys, "tokenize", world["images"] / name, "--model", world["ours"], "--out", out,
                             "--quiet", "--deterministic")
            assert rc == 0, err
            got[name] = load_file(str(out))
        assert got[deep].keys() == got[flat].keys() and got[deep]
        for key in got[deep]:
            assert torch.equal(got[deep][key], got[flat][key]), key
    # and a stub that clipped or ignored the image would not match: another picture gives other tokens
    rc, _, err = run(capsys, "tokenize", world["images"] / "gray8.png", world["images"] / "rgb8.png", "--model",
                     world["ours"], "--out", tmp_path / "both.safetensors", "--quiet", "--deterministic")
    assert rc == 0, err
    both = [t for t in load_file(str(tmp_path / "both.safetensors")).values() if t.dim() == 2 and t.shape[0] == 2]
    assert both and not torch.equal(both[0][0], both[0][1])


def test_cli_errors_as_a_user_sees_them(world):
    """The real command (a fresh Python per case): exactly one stderr line, exit 2, no traceback, no log lines."""
    cases = error_cases(world)

    def launch(item):
        name, (argv, needles) = item
        proc = subprocess.run([sys.executable, "-m", "flextok_kit.cli", *map(str, argv)], capture_output=True,
                              text=True, timeout=600)
        return name, argv, needles, proc

    picked = {k: cases[k] for k in ("int_weights", "config_list", "missing_model", "unreadable_image",
                                    "guidance_nan")}
    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, argv, needles, proc in pool.map(launch, picked.items()):
            check_one_error_line(proc.returncode, proc.stderr, needles, [str(a) for a in argv])
