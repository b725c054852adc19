"""The ``flextok`` command line, run as a user would (a subprocess per command)."""
import json
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flextok_kit import cli, token_files
from flextok_kit.pipelines import FlexTokPipeline
from flextok_kit.token_files import TokenFile

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
    files = [p.split("/")[-1] for p in json.loads(meta["sources"])]
    assert sorted(files) == ["deep16.png", "exif.jpg", "exif_upright.jpg", "gray.png", "rgb.png", "rgba.png"]
    assert ids.shape == (6, 8) and ids.dtype == torch.int32 and int(ids.min()) >= 0 and int(ids.max()) < 64000
    assert (meta["format"], meta["format_version"]) == ("flextok-tokens", "2")
    assert meta["model_fingerprint"] == FlexTokPipeline.from_official(GOLDEN).fingerprint
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


# ------------------------------------------------------------------------------------------------ token files
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The golden tiny weights as a diffusers folder ("tiny") and the same model with other decoder weights."""
    root = tmp_path_factory.mktemp("models")
    pipe = FlexTokPipeline.from_official(GOLDEN)
    pipe.save_pretrained(root / "tiny")
    with torch.no_grad():
        for p in pipe.flextok.decoder.parameters():
            p.add_(0.01)
    pipe.save_pretrained(root / "other")
    return root


def run_cli(*args) -> int:
    """In-process: what `flextok ...` does (same parser, same error handling), without starting Python again."""
    return cli.main([str(a) for a in args])


def write_images(folder, sizes: dict):
    rng = np.random.default_rng(len(sizes))
    for rel, (h, w) in sizes.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / rel, quality=95)
    return folder


def png01(path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"), dtype=np.float32) / 255


def test_tokenize_then_detokenize_round_trip(tmp_path, models):
    """As a user runs it: images of two sizes (two with the same stem) -> token file -> one PNG per row and K, at
    the row's size, equal to pipe.detokenize of the same ids with row i's noise seeded seed + i."""
    images = write_images(tmp_path / "images", {"a/cat.png": (64, 64), "b/cat.png": (64, 64), "dog.jpg": (32, 48)})
    tokens, out = tmp_path / "tokens.safetensors", tmp_path / "png"
    flextok("tokenize", images, "--model", models / "tiny", "--out", tokens, "--num-tokens", "8", "--quiet")
    flextok("detokenize", tokens, "--model", models / "tiny", "--num-tokens", "2", "8", "--steps", "2", "--seed", "3",
            "--guidance", "7.5", "--out", out, "--quiet")
    t = token_files.load(tokens)
    assert [s.split("images/")[1] for s in t.sources] == ["a/cat.png", "b/cat.png", "dog.jpg"]  # input order
    assert t.image_sizes == [(64, 64), (64, 64), (32, 48)] and t.lengths.tolist() == [8, 8, 8]
    names = {"a/cat.png": "cat", "b/cat.png": "cat_1", "dog.jpg": "dog"}  # clashing stems: _1, in row order
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{n}_k{k}.png" for n in names.values() for k in (2, 8))

    pipe = FlexTokPipeline.from_pretrained(models / "tiny")
    pipe.set_progress_bar_config(disable=True)
    for i, row in enumerate(t.rows()):
        h, w = t.image_sizes[i]
        ref = pipe.detokenize([row[:2], row[:8]], generator=[torch.Generator().manual_seed(3 + i) for _ in range(2)],
                              height=h, width=w, num_inference_steps=2, guidance_scale=7.5, use_apg=True,
                              output_type="np").images
        for j, k in enumerate((2, 8)):
            png = png01(out / f"{names[t.sources[i].split('images/')[1]]}_k{k}.png")
            assert png.shape == (h, w, 3)
            # another process and batch composition: equal up to float rounding and 8-bit quantisation
            assert np.abs(png - ref[j]).max() <= 3 / 255 and np.abs(png - ref[j]).mean() < 1 / 255


def test_tokenize_shards_resume_and_detokenize_the_folder(tmp_path, models, capsys):
    images = write_images(tmp_path / "images", {f"img{i}.png": (64, 64) for i in range(5)})
    out = tmp_path / "shards"
    job = ("tokenize", images, "--model", models / "tiny", "--out", out, "--shard-size", "2", "--num-tokens", "8",
           "--quiet")
    assert run_cli(*job) == 0
    shards = sorted(p.name for p in out.glob("shard-*.safetensors"))
    assert shards == [f"shard-{i:06d}.safetensors" for i in range(3)] and (out / "index.json").is_file()
    whole = token_files.load_tokens(out)
    assert [s.split("/")[-1] for s in whole.sources] == [f"img{i}.png" for i in range(5)]
    assert tuple(whole.ids.shape) == (5, 8) and all(token_files.load(out / s).batch_size in (1, 2) for s in shards)

    def content(path):  # tensors and metadata (safetensors writes the metadata keys in no fixed order)
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k).tolist() for k in f.keys()}, f.metadata()

    def state():
        return {p.name: (content(p), p.stat().st_mtime_ns, p.stat().st_ino) for p in out.glob("shard-*")}
    before = state()
    # an interrupted run: shard 1 and the index were never written
    (out / "shard-000001.safetensors").unlink()
    (out / "index.json").unlink()
    capsys.readouterr()
    assert run_cli(*job) == 2 and "pass --resume" in capsys.readouterr().err  # never silently mixes runs
    assert run_cli(*job, "--resume") == 0
    after = state()
    assert after["shard-000001.safetensors"][0] == before["shard-000001.safetensors"][0]  # the same ids, metadata
    for name in ("shard-000000.safetensors", "shard-000002.safetensors"):
        assert after[name] == before[name]  # untouched: same bytes, same file, same mtime
    assert (out / "index.json").is_file()
    # resuming with other settings or another model is refused before anything is written
    for changed, why in ((("--num-tokens", "4"), "other settings"), (("--model", models / "other"), "other settings")):
        args = list(job)
        args[args.index(changed[0]) + 1] = changed[1]
        assert run_cli(*args, "--resume") == 2
        err = capsys.readouterr().err
        assert why in err and "Traceback" not in err
        assert state() == after

    single = tmp_path / "one.safetensors"
    assert run_cli(*job[:4], "--out", single, "--resume") == 2 and "give --out a folder" in capsys.readouterr().err
    assert not single.exists()

    png = tmp_path / "png"
    assert run_cli("detokenize", out, "--model", models / "tiny", "--steps", "1", "--out", png, "--quiet") == 0
    assert sorted(p.name for p in png.iterdir()) == [f"img{i}.png" for i in range(5)]  # each row's own k, no _k
    assert {PIL.Image.open(p).size for p in png.iterdir()} == {(64, 64)}


def test_detokenize_refuses_cleanly_and_writes_nothing(tmp_path, models, capsys):
    fp = FlexTokPipeline.from_pretrained(models / "tiny").fingerprint
    ragged = tmp_path / "ragged.safetensors"  # rows of 8 and 4 tokens
    TokenFile.from_rows([torch.arange(8), torch.arange(4)], fp, sources=["a.png", "b.png"],
                        image_sizes=[(64, 64)] * 2, num_registers=32, vocab_size=64000).save(ragged)
    other = tmp_path / "other.safetensors"
    TokenFile.from_rows([torch.arange(8)], FlexTokPipeline.from_pretrained(models / "other").fingerprint,
                        model_name="other").save(other)
    (tmp_path / "notes.txt").write_text("not tokens")
    TokenFile(torch.zeros(1, 4, dtype=torch.long), "x" * 32).save(tmp_path / "cut.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "cut.safetensors").read_bytes()[:-3])
    foreign = tmp_path / "weights.safetensors"
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(foreign))
    cases = [
        ((tmp_path / "missing.safetensors",), "missing.safetensors: no such token file or folder"),
        ((tmp_path / "notes.txt",), "notes.txt is not a safetensors file"),
        ((tmp_path / "cut.safetensors",), "cut.safetensors is truncated"),
        ((foreign,), "weights.safetensors is a safetensors file but not FlexTok tokens"),
        ((other,), "made by another model \\('other'"),
        ((ragged, "--num-tokens", "2", "6"),
         "--num-tokens 6: row 1 \\(b.png\\) of .*ragged.safetensors has only 4 tokens"),
        ((ragged, "--num-tokens", "33"), "--num-tokens 33: this model decodes 1..32 tokens"),
    ]
    for i, (args, message) in enumerate(cases):
        out = tmp_path / f"out{i}"
        capsys.readouterr()
        assert run_cli("detokenize", *args, "--model", models / "tiny", "--steps", "1", "--out", out) == 2, message
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("flextok detokenize: error: "), err
        assert re.search(message, err[0]), (message, err[0])
        assert not out.exists()  # nothing written, not even the folder
    # and as a separate process: exit 2, one line, no traceback
    proc = flextok("detokenize", foreign, "--model", models / "tiny", "--out", tmp_path / "out", ok=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
    # a ragged file decodes at each row's own length
    assert run_cli("detokenize", ragged, "--model", models / "tiny", "--steps", "1", "--out", tmp_path / "r") == 0
    assert sorted(p.name for p in (tmp_path / "r").iterdir()) == ["a.png", "b.png"]


def test_generate_save_tokens_then_detokenize(tmp_path, capsys):
    """`generate --save-tokens` writes the same format: rows named after their condition, decoded at the saved size."""
    from flextok_kit.flextok_core.ar import FlexTokAR

    base = FlexTokPipeline.from_official(GOLDEN)
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny", num_classes=4, max_tokens=32, id2label={i: f"class_{i}" for i in range(4)})
    FlexTokPipeline(vae=base.vae, flextok=base.flextok, scheduler=base.scheduler,
                    ar_model=ar.eval()).save_pretrained(tmp_path / "ar")
    ids = tmp_path / "ids.safetensors"
    assert run_cli("generate", "--model", tmp_path / "ar", "--class", "3", "--class", "class_1", "--num-tokens", "4",
                   "--images-per-condition", "2", "--steps", "1", "--size", "32", "--out", tmp_path / "grid.png",
                   "--save-tokens", ids) == 0
    t = token_files.load(ids)
    assert t.sources == ["3", "3", "class_1", "class_1"] and t.image_sizes == [(32, 32)] * 4
    assert t.lengths.tolist() == [4] * 4 and t.model_fingerprint == base.fingerprint
    assert run_cli("detokenize", ids, "--model", tmp_path / "ar", "--num-tokens", "1", "4", "--steps", "1", "--out",
                   tmp_path / "png", "--quiet") == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    assert names == sorted(f"{n}_k{k}.png" for n in ("3", "3_1", "class_1", "class_1_1") for k in (1, 4))
    assert {PIL.Image.open(p).size for p in (tmp_path / "png").iterdir()} == {(32, 32)}
