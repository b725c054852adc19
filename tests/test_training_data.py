"""Training data and plumbing: sources (folder, tar shards, Hugging Face datasets), deterministic crops, skipping
unreadable images, config loading, shard assignment and checkpoint bookkeeping. Fast, no training."""
import io
import json
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from flextok_kit.training import config as tconfig
from flextok_kit.training.data import (DATA_DEFAULTS, EpochSampler, ImageTransform, build_dataset, collate,
                                       make_loader, sample_rrc_box, write_image_folder, write_tar_shards)
from flextok_kit.training.shards import ShardReader, fingerprint, run_sharded
from flextok_kit.training.utils import CheckpointManager, EMA, lr_at


def synth_images(n=12, size=32, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        a[: size // 2, :, i % 3] = 255  # something per-class-ish
        out.append(a)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    imgs = synth_images()
    labels = [i % 3 for i in range(len(imgs))]
    write_image_folder(root / "folder", imgs, labels, ["cat", "dog", "eel"])
    for i in (0, 5):  # sidecar captions
        cls = ["cat", "dog", "eel"][labels[i]]
        (root / "folder" / cls / f"{i:06d}.txt").write_text(f"caption {i}")
    write_tar_shards(root / "tars", imgs, labels, [f"caption {i}" for i in range(len(imgs))], per_shard=5)
    return SimpleNamespace(root=root, imgs=imgs, labels=labels)


def cfg(**kw):
    c = dict(DATA_DEFAULTS, crop="center", hflip=0.0, resolution=32)
    c.update(kw)
    return c


def test_folder_and_tar_sources_agree(data):
    folder = build_dataset(cfg(type="folder", path=str(data.root / "folder")), seed=0)
    tars = build_dataset(cfg(type="tar", path=str(data.root / "tars" / "shard-{000000..000002}.tar")), seed=0)
    assert len(folder) == len(tars) == len(data.imgs)
    assert folder.classes == ["cat", "dog", "eel"] and folder.num_classes == 3 and tars.num_classes == 3
    by_stem = {}
    for i in range(len(folder)):
        item = folder[i]
        by_stem[int(item["source"].split("/")[-1].split(".")[0])] = item
    for i in range(len(tars)):
        t = tars[(i, 0)]
        j = int(t["source"].split(":")[-1])
        f = by_stem[j]
        # native size + centre crop: the exact pixels of the original image, from either source
        np.testing.assert_array_equal(t["pixels"].permute(1, 2, 0).numpy(), data.imgs[j])
        assert torch.equal(t["pixels"], f["pixels"])
        assert t["label"] == f["label"] == data.labels[j]
        assert t["caption"] == f"caption {j}"
    assert by_stem[5]["caption"] == "caption 5" and by_stem[1]["caption"] == ""


def test_random_resized_crop_is_deterministic_and_in_range(data):
    ds = build_dataset(cfg(type="folder", path=str(data.root / "folder"), crop="random_resized", hflip=0.5,
                           resolution=16), seed=3)
    a, b, c = ds[(2, 0)], ds[(2, 0)], ds[(2, 1)]
    assert torch.equal(a["pixels"], b["pixels"]) and a["pixels"].shape == (3, 16, 16)
    assert not torch.equal(a["pixels"], c["pixels"])  # another epoch, another crop
    other_seed = build_dataset(cfg(type="folder", path=str(data.root / "folder"), crop="random_resized",
                                   hflip=0.5, resolution=16), seed=4)
    assert not torch.equal(other_seed[(2, 0)]["pixels"], a["pixels"])
    rng = np.random.default_rng(0)
    areas = []
    for _ in range(2000):
        x0, y0, x1, y1 = sample_rrc_box(400, 300, rng, (0.4, 1.0), (3 / 4, 4 / 3))
        assert 0 <= x0 < x1 <= 400 and 0 <= y0 < y1 <= 300
        areas.append((x1 - x0) * (y1 - y0) / (400 * 300))
        assert 3 / 4 - 0.02 <= (x1 - x0) / (y1 - y0) <= 4 / 3 + 0.02
    assert 0.39 <= min(areas) and max(areas) <= 1.0 and np.mean(areas) > 0.5


def test_jpeg_draft_decoding_matches_full_decode(tmp_path):
    a = np.zeros((512, 768, 3), np.uint8)
    a[..., 0] = np.linspace(0, 255, 768, dtype=np.uint8)[None]
    a[..., 1] = np.linspace(0, 255, 512, dtype=np.uint8)[:, None]
    Image.fromarray(a).save(tmp_path / "x.jpg", quality=95)
    t = ImageTransform(32, crop="center", hflip=0.0)
    fast = t(Image.open(tmp_path / "x.jpg"), np.random.default_rng(0)).float()
    full_img = Image.open(tmp_path / "x.jpg").convert("RGB")  # already decoded: no draft
    full = t(full_img, np.random.default_rng(0)).float()
    assert (fast - full).abs().mean() < 3.0  # reduced-scale decode is a faithful approximation


def test_training_images_become_rgb_as_in_the_front_ends():
    """The transform converts with images.to_rgb8: transparency on white (RGBA, LA, palette with tRNS: the pixels the
    former paste-on-white gave, exactly), grey and palette images expanded, 16-bit scaled to 8 bits (it used to clip:
    a 16-bit grey PNG came out almost white)."""
    from flextok_kit.images import to_rgb8

    rng = np.random.default_rng(0)
    v, alpha = np.meshgrid(np.arange(256), np.arange(256))
    rgba = np.stack([v, 255 - v, (v * 7) % 256, alpha], -1).astype(np.uint8)
    palette = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").convert("P")
    palette.info["transparency"] = 7
    t = ImageTransform(32, crop="resize", hflip=0.0)
    for im in (Image.fromarray(rgba, "RGBA"), Image.fromarray(rgba[..., [0, 3]], "LA"), palette,
               Image.fromarray(rng.integers(0, 256, (32, 48), dtype=np.uint8), "L")):
        want = torch.from_numpy(np.asarray(to_rgb8(im).resize((32, 32), Image.BICUBIC)).copy()).permute(2, 0, 1)
        assert torch.equal(t(im, np.random.default_rng(0)), want), im.mode
        if im.mode in ("RGBA", "LA"):  # composited on white, as Image.paste with the alpha mask did
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
            assert np.array_equal(np.asarray(to_rgb8(im)), np.asarray(bg))
    grey16 = Image.fromarray((rng.integers(0, 256, (32, 32)) * 257).astype(np.uint16))
    assert grey16.mode == "I;16"
    got = t(grey16, np.random.default_rng(0))
    assert torch.equal(got, t(Image.fromarray((np.asarray(grey16) // 257).astype(np.uint8), "L"),
                              np.random.default_rng(0)))


def test_unreadable_images_are_skipped_and_counted(tmp_path, data):
    root = tmp_path / "bad"
    write_image_folder(root, data.imgs[:6])
    good = (root / "000002.png").read_bytes()
    (root / "000002.png").write_bytes(good[: len(good) // 3])  # truncated
    (root / "000004.png").write_bytes(b"not an image at all")
    ds = build_dataset(cfg(type="folder", path=str(root)), seed=0)
    item = ds[(2, 0)]
    assert item["skipped"] == 1 and item["index"] == 3  # fell through to the next image, same on every rank
    assert ds.try_load(4) is None and ds.try_load(3) is not None
    loader = make_loader(ds, batch_size=3, seed=0, shuffle=False)
    batches = list(loader)
    assert sum(int(b["skipped"].sum()) for b in batches) == 2
    assert all(len(b["pixels"]) == 3 for b in batches)
    # tar shards with a corrupt member
    tpath = tmp_path / "bad.tar"
    with tarfile.open(tpath, "w") as tf:
        for key, payload in (("a", good), ("b", b"garbage"), ("c", good)):
            info = tarfile.TarInfo(f"{key}.png")
            info.size = len(payload)
            tf.addfile(info, io.BytesIO(payload))
    tds = build_dataset(cfg(type="tar", path=str(tpath)), seed=0)
    assert len(tds) == 3 and tds.try_load(1) is None and tds[1]["skipped"] == 1


def test_epoch_sampler_is_a_seeded_permutation():
    s = EpochSampler(10, seed=1)
    first = list(s)
    assert sorted(i for i, _ in first) == list(range(10)) and all(e == 0 for _, e in first)
    assert list(s) == first
    s.set_epoch(1)
    second = list(s)
    assert [i for i, _ in second] != [i for i, _ in first] and all(e == 1 for _, e in second)


def test_hf_datasets_map_style_and_streaming(tmp_path, data):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog", "eel"]),
                               "text": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in data.imgs], "label": data.labels,
                                     "text": [f"caption {i}" for i in range(len(data.imgs))]}, features=feats)
    ds.save_to_disk(str(tmp_path / "hf"))
    mapped = build_dataset(cfg(type="hf", path=str(tmp_path / "hf")), seed=0)
    assert len(mapped) == len(data.imgs) and mapped.classes == ["cat", "dog", "eel"]
    item = mapped[(4, 0)]
    np.testing.assert_array_equal(item["pixels"].permute(1, 2, 0).numpy(), data.imgs[4])
    assert item["label"] == data.labels[4] and item["caption"] == "caption 4"
    stream = build_dataset(cfg(type="hf", path=str(tmp_path / "hf"), streaming=True, shuffle=False), seed=0)
    batches = list(make_loader(stream, batch_size=4, seed=0))
    assert len(batches) == 3 and batches[0]["pixels"].shape == (4, 3, 32, 32)
    got = torch.cat([b["label"] for b in batches]).tolist()
    assert sorted(got) == sorted(data.labels)


def test_config_base_overrides_and_schema(tmp_path):
    (tmp_path / "base.yaml").write_text("a: 1\nsub:\n  x: 1\n  y: [1, 2]\nmodel:\n  dim: 8\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nsub:\n  x: 2\n")
    defaults = {"a": 0, "b": "s", "sub": {"x": 0, "y": [], "z": None}, "model": {}}
    c = tconfig.load_config(tmp_path / "child.yaml", ["sub.z=[3,4]", "b=hello", "model.depth=3", "+sub.new=1.5e-3"],
                            defaults)
    assert c.a == 1 and c.sub.x == 2 and c.sub.y == [1, 2] and c.sub.z == [3, 4] and c.b == "hello"
    assert c.model == {"dim": 8, "depth": 3} and c.sub.new == 1.5e-3
    with pytest.raises(KeyError, match="sub.zz"):
        tconfig.load_config(tmp_path / "child.yaml", ["sub.zz=1"], defaults)
    (tmp_path / "typo.yaml").write_text("sub:\n  xx: 1\n")
    with pytest.raises(KeyError, match="xx"):
        tconfig.load_config(tmp_path / "typo.yaml", [], defaults)
    assert tconfig.parse_cli(["--config", "f.yaml", "a=1", "--b.c=2"]) == ("f.yaml", ["a=1", "b.c=2"])
    # every shipped config loads against its script's schema
    from flextok_kit.training import distill_decoder, tokenize_dataset, train_ar, train_tokenizer, train_vae

    schemas = {"vae": train_vae.DEFAULTS, "tokenizer": train_tokenizer.DEFAULTS, "ar": train_ar.DEFAULTS,
               "tokenize": tokenize_dataset.DEFAULTS, "distill": distill_decoder.DEFAULTS}
    for path in sorted(tconfig.CONFIG_DIR.glob("*.yaml")):
        kinds = [k for k in schemas if path.stem.startswith(k) or path.stem.endswith("_" + k)]  # fashion_ar, ...
        assert kinds, f"{path.name}: which script is this config for?"
        kind = kinds[0]
        loaded = tconfig.load_config(path, [], schemas[kind])
        assert loaded.output_dir


class FakeAccelerator:
    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world
        self.is_main_process = self.is_local_main_process = rank == 0

    def wait_for_everyone(self):
        pass


def test_run_sharded_splits_work_and_skips_finished(tmp_path):
    calls = []

    def process(start, end):
        calls.append((start, end))
        return {"x": torch.arange(start, end)}, {"count": str(end - start)}

    fp = fingerprint({"a": 1})
    # rank 1 of 2 writes shards 1 and 3 of [0,3) [3,6) [6,9) [9,10)
    run_sharded(FakeAccelerator(1, 2), tmp_path, 10, 3, fp, process, progress=False)
    assert calls == [(3, 6), (9, 10)]
    calls.clear()
    res = run_sharded(FakeAccelerator(0, 1), tmp_path, 10, 3, fp, process, progress=False)
    assert calls == [(0, 3), (6, 9)] and res["skipped"] == [1, 3]
    r = ShardReader(tmp_path)
    assert len(r) == 10 and torch.equal(r.load_all("x"), torch.arange(10)) and int(r.get("x", 7)) == 7
    with pytest.raises(ValueError, match="other settings"):
        run_sharded(FakeAccelerator(0, 1), tmp_path, 10, 3, fingerprint({"a": 2}), process, progress=False)


def test_checkpoint_folders_incomplete_ones_are_ignored(tmp_path):
    d = tmp_path / "checkpoints"
    for name, complete in (("step_00000002", True), ("step_00000004", False), (".tmp-step_00000006", True)):
        (d / name).mkdir(parents=True)
        if complete:
            (d / name / "meta.json").write_text(json.dumps({"loop": {"step": 2}}))
    found = CheckpointManager.complete_checkpoints(d)
    assert [p.name for p in found] == ["step_00000002"]
    CheckpointManager(FakeAccelerator(0, 1), tmp_path).clean_partial()
    assert not (d / ".tmp-step_00000006").exists() and (d / "step_00000004").exists()


def test_lr_schedule_and_ema():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(55, 1.0, 10, 100) == pytest.approx(0.5)
    p = torch.nn.Parameter(torch.zeros(3))
    ema = EMA([p], decay=0.5, warmup=False)
    p.data.fill_(1.0)
    ema.update([p])
    assert torch.allclose(ema.shadow[0], torch.full((3,), 0.5))
    state = ema.state_dict()
    other = EMA([torch.nn.Parameter(torch.zeros(3))], decay=0.9)
    other.load_state_dict(state)
    assert other.decay == 0.5 and other.num_updates == 1 and torch.equal(other.shadow[0], ema.shadow[0])
    ema.store([p])
    ema.copy_to([p])
    assert torch.allclose(p.data, torch.full((3,), 0.5))
    ema.restore([p])
    assert torch.equal(p.data, torch.ones(3))
    assert collate([{"pixels": torch.zeros(3, 2, 2, dtype=torch.uint8)}, None])["dropped"] == 1


def test_activation_checkpointing_gives_the_same_gradients():
    from flextok_kit.training.config import Config
    from flextok_kit.training.models import build_flextok
    from flextok_kit.training.train_tokenizer import TokenizerTrainModule, activation_checkpointing

    tc = Config(nested_dropout="pow2", cfg_dropout=0.5, timesteps="logit_normal", t_mean=0.0, t_std=1.0,
                fast_registers=True)
    kw = dict(latent_channels=4, grid_size=(2, 2), num_registers=4, encoder_dim=16, encoder_depth=2,
              encoder_head_dim=8, decoder_dim=16, decoder_depth=2, decoder_head_dim=8)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_flextok(kw)
        if ckpt:
            activation_checkpointing([*model.encoder.blocks, *model.decoder.blocks])
        mod = TokenizerTrainModule(model, None, tc, 0, 0.0)
        x0 = torch.randn(3, 4, 4, 4, generator=torch.Generator().manual_seed(1))
        mod(x0, generator=torch.Generator().manual_seed(2))["loss"].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
