"""The embedded demo models are reproducible from the committed recipe (scripts/train_demo_models.sh):

* the Fashion-MNIST preparation reads the dataset's idx files into class folders (synthetic idx files here);
* the Fashion-MNIST stages retrain for a few steps from the committed configs (tokenizer, tokenize, AR) and build
  exactly the architectures of the committed ``demo_models/fashion_ar`` (which must load and generate);
* the committed demo weights are small.
"""
import gzip
import json
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from flextok_kit import demo
from flextok_kit.training import prepare_fashion_mnist as fm
from flextok_kit.training.utils import read_metrics

FASHION = demo.AR_DEMO_MODEL
SAMPLES = demo.FASHION_SAMPLES
IGNORED = {"_name_or_path", "_diffusers_version", "_class_name", "_use_default_values"}


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_fashion(folder: Path, n_train=30, n_test=20, seed=0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    return folder


def config_of(folder: Path) -> dict:
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if k not in IGNORED}


def test_prepare_fashion_mnist_writes_padded_class_folders(tmp_path):
    src = fake_fashion(tmp_path / "src")
    counts = fm.prepare(tmp_path / "data", src, per_class={"train": 2}, eval_per_class=1)
    assert counts == {"train": 20, "test": 20, "eval": 10}
    assert sorted(p.name for p in (tmp_path / "data" / "train").iterdir()) == sorted(fm.CLASSES)
    im = PIL.Image.open(next((tmp_path / "data" / "eval" / "Bag").iterdir()))
    assert im.size == (32, 32) and im.mode == "L"
    px = np.array(im)
    assert (px[:2] == 0).all() and (px[:, -2:] == 0).all()  # the black padding
    # the same item, unpadded, is the dataset's pixels
    raw = fm.read_idx(src / "t10k-images-idx3-ubyte.gz")
    idx = int(Path(im.filename).stem)
    np.testing.assert_array_equal(px[2:-2, 2:-2], raw[idx])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no leftover temporary folder


def test_prepare_fashion_mnist_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.prepare(tmp_path / "out", tmp_path / "nowhere")
    src = fake_fashion(tmp_path / "src")
    data = gzip.open(src / "train-images-idx3-ubyte.gz").read()
    with gzip.open(src / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write(data[:-100])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: header says"):
        fm.prepare(tmp_path / "out", src)
    assert not (tmp_path / "out").exists()


def test_fashion_demo_model_is_committed_and_small():
    assert (FASHION / "model_index.json").is_file(), "demo_models/fashion_ar is missing"
    for folder in (FASHION, demo.DEMO_MODEL):  # a few MB per model (float16 storage)
        for weights in folder.rglob("*.safetensors"):
            assert weights.stat().st_size < 5e6, f"{weights}: {weights.stat().st_size / 1e6:.1f} MB"
    assert (FASHION / "README.md").is_file() and (demo.DEMO_MODEL / "README.md").is_file()
    assert len(list(SAMPLES.glob("*/*.png"))) == 20


def test_fashion_demo_generates_every_class():
    from flextok_kit.pipelines import FlexTokPipeline

    pipe = FlexTokPipeline.from_pretrained(FASHION)
    pipe.set_progress_bar_config(disable=True)
    ar = pipe.ar_model
    assert ar is not None and ar.config.num_classes == 10
    assert sorted(ar.config.id2label.values()) == sorted(fm.CLASSES)
    assert ar.config.vocab_size == pipe.flextok.vocab_size == 1000
    out = pipe(class_labels=["Trouser", "Bag"], num_tokens=16, num_inference_steps=2, guidance_scale=3.0,
               generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (2, 3, 32, 32) and out.tokens.shape == (2, 16)


@pytest.fixture(scope="module")
def fashion_tokenizer_run(tmp_path_factory):
    """train_tokenizer from the committed fashion config, a few steps on the bundled Fashion-MNIST samples."""
    from flextok_kit.training import train_tokenizer

    out = tmp_path_factory.mktemp("fashion") / "tokenizer"
    train_tokenizer.main(["--config", "fashion_tokenizer", f"vae.path={FASHION / 'vae'}", f"data.path={SAMPLES}",
                          f"output_dir={out}", "max_steps=4", "data.batch_size=8", "data.num_workers=0",
                          "log_every=1", "eval_every=4", "checkpoint_every=4", "eval_batch_size=4"])
    return out


def test_fashion_tokenizer_retrains_from_committed_config(fashion_tokenizer_run):
    out = fashion_tokenizer_run
    rows = [r for r in read_metrics(out) if "flow" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in rows)
    # the recipe builds the committed architecture
    assert config_of(out / "export" / "flextok") == config_of(FASHION / "flextok")
    from flextok_kit.pipelines import FlexTokPipeline

    pipe = FlexTokPipeline.from_pretrained(out / "export")
    assert pipe.tokenize(torch.zeros(1, 3, 32, 32)).shape == (1, 16)


def test_fashion_ar_retrains_from_committed_configs(fashion_tokenizer_run, tmp_path):
    from flextok_kit.training import tokenize_dataset, train_ar

    tokens = tmp_path / "tokens"
    tokenize_dataset.main(["--config", "fashion_tokenize", f"pipeline={FASHION}", f"data.path={SAMPLES}",
                           f"output_dir={tokens}", "data.num_workers=0"])
    out = tmp_path / "ar"
    train_ar.main(["--config", "fashion_ar", f"tokens={tokens}", f"output_dir={out}", "max_steps=3",
                   "data.batch_size=8", "eval_every=3", "checkpoint_every=3", "log_every=1", "eval_batch_size=4",
                   f"export.pipeline={fashion_tokenizer_run / 'export'}"])
    rows = [r for r in read_metrics(out) if "loss" in r and "eval/loss" not in r]
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows)
    assert config_of(out / "export") == config_of(FASHION / "ar_model")
    assert (out / "export_pipeline" / "model_index.json").is_file()


def test_flextok_eval_on_demo_tokenizers_improves_with_tokens(tmp_path):
    """Issue acceptance: `flextok eval` on the demo tokenizers prints metrics that improve with more tokens (here on
    the bundled held-out samples, deterministic seeds; the model cards have the full held-out tables)."""
    from flextok_kit import cli

    out = tmp_path / "fashion.json"
    cli.main(["eval", str(SAMPLES), "--model", str(FASHION), "--size", "32", "--tokens", "1", "4", "16", "--steps",
              "10", "--guidance", "3", "--perceptual", "none", "--features", "none", "--json", str(out), "--quiet"])
    rows = [r for r in json.loads(out.read_text())[0]["rows"] if r["kind"] == "tokens"]
    assert [r["tokens"] for r in rows] == [1, 4, 16]
    for key in ("psnr", "ssim"):
        values = [r[key] for r in rows]
        assert values == sorted(values) and values[0] < values[-1], (key, values)
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 2.0

    out = tmp_path / "photo.json"
    cli.main(["eval", str(demo.SAMPLES), "--model", str(demo.DEMO_MODEL), "--size", "64", "--fit", "resize",
              "--tokens", "1", "16", "--steps", "10", "--guidance", "3", "--perceptual", "none", "--features", "none",
              "--json", str(out), "--quiet"])
    rows = [r for r in json.loads(out.read_text())[0]["rows"] if r["kind"] == "tokens"]
    assert rows[1]["psnr"] > rows[0]["psnr"] + 1.0 and rows[1]["ssim"] > rows[0]["ssim"], rows
