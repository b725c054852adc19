"""The training scripts end to end on tiny models and synthetic images (CPU).

Each stage trains a few steps and its loss on a fixed batch falls; exports load where they are used (VAE ->
stage 1, tokenizer pipeline -> FlexTokPipeline.from_pretrained and decode, AR -> FlexTokAR / pipeline);
tokenize_dataset resumes without redoing shards; a 2-process run keeps identical replicas; a SIGKILLed run
resumes to exactly the weights of an uninterrupted one.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from flextok_kit.training.data import write_image_folder, write_tar_shards
from flextok_kit.training.utils import read_metrics

RES = 32
TOKENIZER_TINY = [
    f"data.resolution={RES}", "data.batch_size=4", "data.num_workers=0", "model.num_registers=8",
    "model.encoder_dim=32", "model.decoder_dim=32", "model.encoder_head_dim=16", "model.decoder_head_dim=16",
    "progress_bar=false", "log_every=5",
]


def synth_images(n, size=RES, seed=0):
    """Smooth colour ramps with a bright disc: structured enough to learn from in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out, labels = [], []
    for i in range(n):
        c = i % 3
        a = np.zeros((size, size, 3), np.float32)
        a[..., c] = 220 * xx
        a[..., (c + 1) % 3] = 160 * yy
        cx, cy = rng.uniform(0.25, 0.75, 2)
        a[(xx - cx) ** 2 + (yy - cy) ** 2 < 0.03] = (255, 255, 40)
        out.append(np.clip(a + rng.normal(0, 4, a.shape), 0, 255).astype(np.uint8))
        labels.append(c)
    return out, labels


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    from diffusers import AutoencoderKL
    from transformers import BertConfig, BertModel, BertTokenizer, Dinov2Config, Dinov2Model

    root = tmp_path_factory.mktemp("training")
    imgs, labels = synth_images(24)
    names = ["red", "green", "blue"]
    write_image_folder(root / "images", imgs, labels, names)
    write_tar_shards(root / "tars", imgs, labels, [f"a {names[l]} picture" for l in labels], per_shard=10)
    torch.manual_seed(0)
    AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=8,
                  layers_per_block=1).save_pretrained(root / "vae")
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             patch_size=4, image_size=32)).save_pretrained(root / "dino")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "red", "green", "blue"]
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(root / "bert")
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(root / "bert")
    return SimpleNamespace(root=root, images=root / "images", tars=root / "tars", vae=root / "vae",
                           dino=root / "dino", bert=root / "bert")


@pytest.fixture(scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fresh_accelerate_state(one_thread_fresh_accelerate):
    """Every test here runs training scripts in-process (conftest.one_thread_fresh_accelerate)."""


def evals(out, key):
    return [m[key] for m in read_metrics(out) if key in m]


def subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")  # CPU processes + gloo, even on a GPU host
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------------------
# Stage 0
def test_train_vae_loss_falls_and_export_feeds_stage1(work, tmp_path):
    from diffusers import AutoencoderKL

    from flextok_kit.training import train_vae

    out = tmp_path / "vae_run"
    train_vae.main([
        "--config", "vae_tiny", f"data.path={work.images}", f"output_dir={out}", f"data.resolution={RES}",
        "data.batch_size=4", "data.num_workers=0", "vae.model.block_out_channels=[8,16,16,16]",
        "vae.model.norm_num_groups=8", "max_steps=16", "loss.disc_start=8", "loss.disc_channels=8",
        "loss.perceptual=random_conv", "optim.lr=2e-3", "optim.warmup_steps=0", "eval_every=8",
        "checkpoint_every=8", "progress_bar=false", "ema.decay=0.9",
    ])
    losses = evals(out, "eval/loss")
    assert len(losses) == 3 and losses[-1] < 0.8 * losses[0], losses
    assert evals(out, "eval/psnr")[-1] > evals(out, "eval/psnr")[0]
    train = [m for m in read_metrics(out) if "d_loss" in m]
    assert train, "the discriminator never started"
    vae = AutoencoderKL.from_pretrained(out / "export")
    assert vae.config.latent_channels == 16 and vae.config.scaling_factor != 1.0
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, RES, RES)).latent_dist.mode()
    assert z.shape == (1, 16, RES // 8, RES // 8)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000008", "step_00000016"]


# ------------------------------------------------------------------------------------------------------------
# Stage 1
@pytest.fixture(scope="module")
def tokenizer_run(work, tmp_path_factory, _one_thread):
    from accelerate.state import AcceleratorState, GradientState

    from flextok_kit.training import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "run"
    train_tokenizer.main([
        "--config", "tokenizer_tiny", f"data.path={work.images}", f"vae.path={work.vae}", f"output_dir={out}",
        *TOKENIZER_TINY, "data.batch_size=8", "max_steps=40", "optim.lr=4e-3", "optim.warmup_steps=0",
        "optim.schedule=constant", "eval_every=20", "checkpoint_every=20", "repa.encoder=dinov2",
        f"repa.encoder_path={work.dino}", "repa.layer=0", "repa.proj_dim=64", "cache.enabled=true", "cache.views=2",
        "cache.shard_size=16",
        "ema.decay=0.9",
    ])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def test_train_tokenizer_loss_falls(tokenizer_run):
    out = tokenizer_run
    flow, repa, loss = evals(out, "eval/flow"), evals(out, "eval/repa"), evals(out, "eval/loss")
    assert len(flow) == 3
    assert flow[-1] < flow[0] - 0.05, flow          # the rectified-flow loss itself falls
    assert repa[-1] < 0.8 * repa[0], repa            # the projector aligns with the (random) DINOv2 features
    assert loss[-1] < loss[0]
    # register-collapse monitors are logged with every evaluation (fractions)
    usage, sat = evals(out, "eval/token_usage"), evals(out, "eval/fsq_saturation")
    assert len(usage) == 3 and all(0 < u <= 1 for u in usage) and all(0 <= v <= 1 for v in sat)
    # latents were cached once: 24 images x 2 views in shards of 16
    index = json.loads((out / "latent_cache" / "index.json").read_text())
    assert index["num_items"] == 48 and index["num_shards"] == 3
    last = [m for m in read_metrics(out) if "samples" in m][-1]
    assert last["samples"] == 40 * 8 and last["skipped_images"] == 0


def test_tokenizer_export_loads_in_pipeline_and_decodes(tokenizer_run):
    from flextok_kit.pipelines import FlexTokPipeline

    pipe = FlexTokPipeline.from_pretrained(tokenizer_run / "export")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_registers == 8 and pipe.flextok.config.decoder_dim == 32
    x = torch.rand(2, 3, RES, RES) * 2 - 1
    ids = pipe.tokenize(x)
    assert ids.shape == (2, 8) and int(ids.max()) < 64000
    out = pipe.detokenize(ids[:, :2], num_inference_steps=2, guidance_scale=2.0, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, RES, RES) and torch.isfinite(out).all()
    # the export holds the EMA weights, not the last raw step
    from safetensors.torch import load_file

    ckpt = load_file(tokenizer_run / "checkpoints" / "step_00000040" / "model.safetensors")
    raw = ckpt["flextok.decoder.proj_out.weight"]
    assert not torch.equal(raw, pipe.flextok.decoder.proj_out.weight.detach())


# ------------------------------------------------------------------------------------------------------------
# Tokenizing
@pytest.fixture(scope="module")
def tokens_dir(tokenizer_run, work, tmp_path_factory, _one_thread):
    from accelerate.state import AcceleratorState, GradientState

    from flextok_kit.training import tokenize_dataset

    out = tmp_path_factory.mktemp("tokens") / "tokens"
    tokenize_dataset.main(["--config", "tokenize", f"pipeline={tokenizer_run / 'export'}", f"data.path={work.tars}",
                           "data.type=tar", f"data.resolution={RES}", "data.num_workers=0", "shard_size=10",
                           "batch_size=8", "views=2", "data.crop=random_resized", "data.hflip=0.5",
                           f"output_dir={out}", "progress_bar=false"])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return out


def test_tokenize_dataset_writes_shards_and_resumes(tokens_dir, tokenizer_run, work, tmp_path):
    from safetensors.torch import load_file

    from flextok_kit.pipelines import FlexTokPipeline
    from flextok_kit.training import tokenize_dataset
    from flextok_kit.training.config import load_config
    from flextok_kit.training.data import build_dataset, keyed_loader, to_float
    from flextok_kit.training.shards import read_metadata
    from flextok_kit.training.tokenize_dataset import load_tokens

    index = json.loads((tokens_dir / "index.json").read_text())
    assert index["num_items"] == 48 and index["num_shards"] == 5
    d = load_tokens(tokens_dir)
    assert d["tokens"].shape == (48, 8) and d["tokens"].dtype == torch.int64
    assert d["index"].tolist() == [i // 2 for i in range(48)] and d["view"].tolist() == [0, 1] * 24
    assert d["captions"][0] == "a red picture" and d["label"][:6].tolist() == [0, 0, 1, 1, 2, 2]
    assert index["settings"]["num_classes"] == 3
    # What holds by construction, whatever the few-step tokenizer learned on this CPU's kernels: the two views of
    # an image are different crops, and every stored row is the pipeline's tokenization of its own crop (the
    # tokens of two crops may still coincide when a tiny model collapses, so they are not compared).
    cfg = load_config("tokenize", [f"pipeline={tokenizer_run / 'export'}", f"data.path={work.tars}",
                                   "data.type=tar", f"data.resolution={RES}", "data.num_workers=0",
                                   "data.crop=random_resized", "data.hflip=0.5"], tokenize_dataset.DEFAULTS)
    dataset = build_dataset(cfg.data, seed=0)
    for i in range(24):
        assert not torch.equal(dataset[(i, 0)]["pixels"], dataset[(i, 1)]["pixels"]), f"image {i}: views equal"
    pipe = FlexTokPipeline.from_pretrained(tokenizer_run / "export")
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)  # tokenize_dataset seeds shard 0's posterior noise with seed * 1_000_003 + 0
    keys = [(j // 2, j % 2) for j in range(10)]
    again = torch.cat([pipe.tokenize(to_float(b["pixels"]), num_tokens=8, generator=g)
                       for b in keyed_loader(dataset, keys, batch_size=8)])
    assert torch.equal(again, d["tokens"][:10])

    # resume: delete two finished shards; only those are recomputed, identically
    shards = sorted(tokens_dir.glob("shard-*.safetensors"))
    before = {p.name: (p.stat().st_mtime_ns, load_file(p), read_metadata(p)) for p in shards}
    for p in (shards[1], shards[3]):
        p.unlink()
    time.sleep(0.01)
    result = tokenize_dataset.main(["--config", "tokenize", f"pipeline={tokenizer_run / 'export'}",
                                    f"data.path={work.tars}", "data.type=tar", f"data.resolution={RES}",
                                    "data.num_workers=0", "shard_size=10", "batch_size=8", "views=2",
                                    "data.crop=random_resized", "data.hflip=0.5", f"output_dir={tokens_dir}",
                                    "progress_bar=false"])
    assert result["written"] == [1, 3] and result["skipped"] == [0, 2, 4]
    for p in sorted(tokens_dir.glob("shard-*.safetensors")):
        mtime, tensors, metadata = before[p.name]
        again = load_file(p)  # deterministic crops and posterior noise: the same content
        assert all(torch.equal(tensors[k], again[k]) for k in tensors) and read_metadata(p) == metadata
        if p.name not in (shards[1].name, shards[3].name):
            assert p.stat().st_mtime_ns == mtime  # untouched
    # other settings into the same folder are refused
    with pytest.raises(ValueError, match="other settings"):
        tokenize_dataset.main(["--config", "tokenize", f"pipeline={tokenizer_run / 'export'}",
                               f"data.path={work.tars}", "data.type=tar", f"data.resolution={RES}",
                               "data.num_workers=0", "shard_size=10", "views=1", f"output_dir={tokens_dir}",
                               "progress_bar=false"])
    # uint16 ids round-trip
    small = tmp_path / "u16"
    tokenize_dataset.main(["--config", "tokenize", f"pipeline={tokenizer_run / 'export'}", f"data.path={work.tars}",
                           "data.type=tar", f"data.resolution={RES}", "data.num_workers=0", "shard_size=100",
                           "token_dtype=uint16", "data.max_items=4", f"output_dir={small}", "progress_bar=false"])
    u = load_tokens(small)
    assert u["tokens"].shape == (4, 8) and int(u["tokens"].max()) < 64000


# ------------------------------------------------------------------------------------------------------------
# Stage 2
def test_train_ar_class_conditional(tokens_dir, tokenizer_run, tmp_path):
    import flextok_kit.flextok_core.ar  # noqa: F401  (lets diffusers resolve the ar_model component)
    from flextok_kit.flextok_core.ar import FlexTokAR
    from flextok_kit.pipelines import FlexTokPipeline
    from flextok_kit.training import train_ar

    out = tmp_path / "ar"
    train_ar.main(["--config", "ar_tiny", f"tokens={tokens_dir}", f"output_dir={out}", "max_steps=30",
                   "data.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=0", "eval_every=15",
                   "checkpoint_every=15", "progress_bar=false", f"export.pipeline={tokenizer_run / 'export'}",
                   "ema.decay=0.5"])
    losses = evals(out, "eval/loss")
    assert len(losses) == 3 and losses[-1] < losses[0] - 1.0, losses
    ar = FlexTokAR.from_pretrained(out / "export")
    assert ar.config.num_classes == 3 and ar.config.max_tokens == 8 and not ar.is_text_conditional
    ids = ar.generate(class_labels=torch.tensor([0, 2]), num_tokens=8, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(0))
    assert ids.shape == (2, 8)
    pipe = FlexTokPipeline.from_pretrained(out / "export_pipeline")
    assert isinstance(pipe.ar_model, FlexTokAR)
    pipe.set_progress_bar_config(disable=True)
    img = pipe.detokenize(ids[:, :4], num_inference_steps=2, output_type="pt").images
    assert img.shape == (2, 3, RES, RES)


def test_train_ar_caption_conditional(tokens_dir, work, tmp_path):
    from flextok_kit.flextok_core.ar import FlexTokAR
    from flextok_kit.training import train_ar

    out = tmp_path / "ar_text"
    train_ar.main(["--config", "ar_caption_tiny", f"tokens={tokens_dir}", f"output_dir={out}", "max_steps=16",
                   "data.batch_size=8", "optim.lr=3e-3", "optim.warmup_steps=0", "eval_every=8",
                   "checkpoint_every=0", "progress_bar=false", f"text.path={work.bert}"])
    losses = evals(out, "eval/loss")
    assert losses[-1] < losses[0] - 0.5, losses
    ar = FlexTokAR.from_pretrained(out / "export")
    assert ar.is_text_conditional and ar.config.text_dim == 32


# ------------------------------------------------------------------------------------------------------------
# Distributed and resumable (subprocesses)
def launch(args, out_log, port=None, num_processes=1, wait=True):
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--main_process_port", str(port or free_port())]
    else:
        cmd += ["--num_processes", "1", "--cpu"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", *args]
    f = open(out_log, "w")
    # own process group: killing the job kills the launcher and the training process it started
    proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(), start_new_session=True)
    if wait:
        rc = proc.wait(timeout=300)
        f.close()
        assert rc == 0, Path(out_log).read_text()[-4000:]
    return proc


@pytest.mark.slow
def test_tokenizer_two_processes_keep_replicas_identical(work, tmp_path):
    out = tmp_path / "ddp"
    launch(["flextok_kit.training.train_tokenizer", "--config", "tokenizer_tiny", f"data.path={work.images}",
            f"vae.path={work.vae}", f"output_dir={out}", *TOKENIZER_TINY, "data.num_workers=1", "max_steps=6",
            "checkpoint_every=3", "repa.encoder=dinov2", f"repa.encoder_path={work.dino}", "repa.layer=1",
            "repa.proj_dim=64", "debug.rank_checksums=true", "gradient_accumulation_steps=2"],
           tmp_path / "ddp.log", num_processes=2)
    log = (tmp_path / "ddp.log").read_text()
    assert "2 process(es)" in log
    sums = [json.loads((out / "rank_checksums" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert sums[0]["step"] == sums[1]["step"] == 6
    assert sums[0]["checksums"] == sums[1]["checksums"]
    ckpt = out / "checkpoints" / "step_00000006"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    last = [m for m in read_metrics(out) if "samples" in m][-1]
    # 24 images / (batch 4 x 2 processes) = 3 micro-batches per process per epoch; with accumulation 2 an epoch
    # is 2 optimizer steps (the last one syncs at the end of the data), so 6 steps = 3 epochs = 72 samples
    assert last["samples"] == 3 * 24 and last["epoch"] == 2  # 0-based: the third epoch
    from flextok_kit.pipelines import FlexTokPipeline

    assert FlexTokPipeline.from_pretrained(out / "export").num_registers == 8


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights(work, tmp_path):
    args = ["flextok_kit.training.train_tokenizer", "--config", "tokenizer_tiny", f"data.path={work.images}",
            f"vae.path={work.vae}", *TOKENIZER_TINY, "max_steps=10", "checkpoint_every=2",
            "gradient_accumulation_steps=2", "repa.encoder=dinov2", f"repa.encoder_path={work.dino}",
            "repa.proj_dim=64", "cache.enabled=true", "cache.views=2", "cache.shard_size=10", "keep_last=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    launch(args + [f"output_dir={full}"], tmp_path / "full.log")

    proc = launch(args + [f"output_dir={killed}", "debug.step_sleep=0.4"], tmp_path / "killed.log", wait=False)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "step_00000004").is_dir():
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.time() < deadline, "no checkpoint within the time limit"
        time.sleep(0.05)
    time.sleep(0.5)  # somewhere in the middle of steps 5..6 (or their checkpoint)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole job, at an arbitrary moment
    proc.wait(timeout=60)
    assert not (killed / "export").exists(), "the run finished before it was killed"

    launch(args + [f"output_dir={killed}"], tmp_path / "resumed.log")
    log = (tmp_path / "resumed.log").read_text()
    assert "resumed from" in log
    from safetensors.torch import load_file

    a = load_file(full / "checkpoints" / "step_00000010" / "model.safetensors")
    b = load_file(killed / "checkpoints" / "step_00000010" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ea = load_file(next((full / "export" / "flextok").glob("*.safetensors")))
    eb = load_file(next((killed / "export" / "flextok").glob("*.safetensors")))
    assert all(torch.equal(ea[k], eb[k]) for k in ea)  # EMA (registered for checkpointing) resumed too
    assert len(list((killed / "checkpoints").glob("step_*"))) == 2  # keep_last
    assert not list((killed / "checkpoints").glob(".tmp-*"))

