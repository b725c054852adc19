"""The ``flextok`` command line, run as a user would (a subprocess per command)."""
import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flextok_kit.pipelines import FlexTokPipeline

from .conftest import GOLDEN


def flextok(*args, ok=True):
    proc = subprocess.run([sys.executable, "-m", "flextok_kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """64x64 images in the awkward formats people have: RGB, grayscale, RGBA, 16-bit, EXIF-rotated."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    rgb = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    PIL.Image.fromarray(rgb).save(folder / "rgb.png")
    PIL.Image.fromarray(rgb[..., 0]).save(folder / "gray.png")
    PIL.Image.fromarray(np.dstack([rgb, np.full((64, 64), 200, np.uint8)])).save(folder / "rgba.png")
    PIL.Image.fromarray((rgb[..., 1].astype(np.uint16) * 257)).save(folder / "deep16.png")
    # stored rotated by 90 degrees with EXIF orientation 6 (display = rotate 270 = 90 clockwise)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    PIL.Image.fromarray(np.rot90(rgb, k=1).copy()).save(folder / "exif.jpg", exif=exif, quality=100)
    PIL.Image.fromarray(rgb).save(folder / "exif_upright.jpg", quality=100)
    return folder


def test_convert_then_from_pretrained_reproduces_golden(tmp_path):
    flextok("convert", GOLDEN, tmp_path / "tiny")
    assert (tmp_path / "tiny" / "model_index.json").is_file()
    assert "research purposes only" in (tmp_path / "tiny" / "WEIGHTS_LICENSE_NOTICE.txt").read_text()
    pipe = FlexTokPipeline.from_pretrained(tmp_path / "tiny")
    pipe.set_progress_bar_config(disable=True)
    golden = load_file(GOLDEN / "vectors.safetensors")
    meta = json.loads((GOLDEN / "vectors.json").read_text())
    torch.manual_seed(meta["seeds"]["posterior_seed"])
    assert torch.equal(pipe.tokenize(golden["images"]), golden["token_ids"])
    for run in meta["detok_runs"]:
        tokens = [golden["token_ids"][i, :k] for i, k in enumerate(run["keep_ks"])]
        out = pipe.detokenize(tokens, num_inference_steps=4, guidance_scale=run["guidance_scale"],
                              use_apg=run["perform_norm_guidance"], latents=golden["detok_noise"],
                              output_type="latent").images
        torch.testing.assert_close(out, golden[f"detok_{run['name']}_latents"], atol=5e-4, rtol=1e-4)
    proc = flextok("convert", GOLDEN, tmp_path / "tiny", ok=False)
    assert proc.returncode == 2 and "exists" in proc.stderr


def test_tokenize_folder_handles_awkward_images(tmp_path, photos):
    out = tmp_path / "tokens.safetensors"
    flextok("tokenize", photos, "--model", GOLDEN, "--out", out, "--num-tokens", "8", "--deterministic")
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        ids = f.get_tensor("ids")
    files = [p.split("/")[-1] for p in json.loads(meta["files"])]
    assert sorted(files) == ["deep16.png", "exif.jpg", "exif_upright.jpg", "gray.png", "rgb.png", "rgba.png"]
    assert ids.shape == (6, 8) and ids.dtype == torch.int32 and int(ids.min()) >= 0 and int(ids.max()) < 64000
    assert meta["fingerprint"] == FlexTokPipeline.from_official(GOLDEN).fingerprint
    row = {name: ids[i] for i, name in enumerate(files)}
    assert torch.equal(row["exif.jpg"], row["exif_upright.jpg"])  # EXIF rotation applied
    assert not torch.equal(row["rgb.png"], row["gray.png"])


def test_reconstruct_grid(tmp_path, photos):
    out = tmp_path / "grid.png"
    proc = flextok("reconstruct", photos / "rgb.png", photos / "gray.png", "--model", GOLDEN, "--tokens", "1", "4",
                   "32", "--steps", "2", "--out", out)
    assert "2 image(s) x 3 token budgets" in proc.stdout
    grid = PIL.Image.open(out)
    # 4 columns (input + 3 budgets) of 64 px + padding, 2 rows + label strip
    assert grid.size == (4 * 68 + 4, 2 * 68 + 4 + 14)


def test_info(tmp_path):
    proc = flextok("info", GOLDEN, "--json")
    info = json.loads(proc.stdout)
    assert info["tokens"].startswith("1..32") and "null condition learned" in info["decoder"]


def test_clear_errors(tmp_path, photos):
    proc = flextok("tokenize", tmp_path / "missing", "--model", GOLDEN, "--out", tmp_path / "t.safetensors", ok=False)
    assert proc.returncode == 2 and "no such file or folder" in proc.stderr
    (tmp_path / "broken.png").write_text("not an image")
    proc = flextok("tokenize", tmp_path / "broken.png", "--model", GOLDEN, "--out", tmp_path / "t.safetensors",
                   ok=False)
    assert proc.returncode == 2 and "cannot read image" in proc.stderr and "broken.png" in proc.stderr
    PIL.Image.new("RGB", (100, 70)).save(tmp_path / "odd.png")
    proc = flextok("tokenize", tmp_path / "odd.png", "--model", GOLDEN, "--out", tmp_path / "t.safetensors", ok=False)
    assert proc.returncode == 2 and "multiples of 16" in proc.stderr and "--fit" in proc.stderr
    assert not (tmp_path / "t.safetensors").exists()  # nothing half-written
    flextok("tokenize", tmp_path / "odd.png", "--model", GOLDEN, "--out", tmp_path / "t.safetensors", "--fit",
            "center-crop", "--size", "64")
    assert load_file(tmp_path / "t.safetensors")["ids"].shape == (1, 32)
    proc = flextok("reconstruct", photos / "rgb.png", "--model", GOLDEN, "--tokens", "0", "64", ok=False)
    assert proc.returncode == 2 and "1..32" in proc.stderr
    proc = flextok("info", tmp_path, ok=False)
    assert proc.returncode == 2 and "model_index.json" in proc.stderr
