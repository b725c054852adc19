"""Automatic token budget (pipelines/token_budget.py): per image, the smallest candidate k whose reconstruction from
the first k tokens reaches a quality target; the largest when none does.

* the rule itself, exactly, on a decoder whose score per (image, k) is a known table (monotone and not);
* on the trained demo tokenizer: the choice checked by decoding again with the same latents and against an
  exhaustive decode of every candidate; ``tokenize(num_tokens="auto")`` ragged output through ``detokenize`` and the
  token file; ST-LPIPS (lower is better);
* bad targets, metrics, candidates and keywords: ValueError / TypeError naming the argument;
* ``flextok tokenize --auto``: ragged token file with each row's k and score, a summary, and ``flextok detokenize``
  with the same seed renders the scored images; bad ``--auto`` values print one line and exit 2.

Comparisons between runs are made in this process (or between this process and the CLI on the same machine) with
targets kept away from every measured score, so no float depends on the CPU's float path.
"""
from __future__ import annotations

import functools
import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from flextok_kit import cli
from flextok_kit.images import find_images, load_batch
from flextok_kit.metrics import psnr
from flextok_kit.pipelines import FlexTokPipeline, token_budget
from flextok_kit.pipelines.token_budget import choose_tokens
from flextok_kit.token_files import TokenFile, load

from .conftest import ROOT
from .test_pipeline import tiny_pipeline

PHOTO_MODEL = ROOT / "demo_models" / "photo_tokenizer"
SAMPLES = ROOT / "demo_models" / "samples"
STEPS = 6  # sampling steps in these tests (the choice logic does not depend on it)


# ------------------------------------------------------------------------------------------------ the rule, exactly
# image -> {k: score}; a decoder that renders image i at k as a flat image of value score/64 (exact in float32), and
# a metric that reads it back, so the scores are exactly these numbers
TABLE = {
    0: {1: 10, 2: 20, 4: 30, 8: 40, 16: 50},  # monotone: reaches 30 at k=4 exactly (>= counts)
    1: {1: 35, 2: 10, 4: 10, 8: 10, 16: 10},  # the smallest candidate reaches
    2: {1: 10, 2: 12, 4: 14, 8: 16, 16: 20},  # none reaches: the largest candidate
    3: {1: 10, 2: 40, 4: 20, 8: 20, 16: 45},  # not monotone: k=2 reaches, 4 and 8 do not
}


def table_metric(recon, ref):
    return (recon.flatten(1).mean(1) + 1) / 2 * 64


@pytest.fixture
def table_pipe():
    """A tiny pipeline (N=16) whose detokenize renders TABLE; records every call's batch."""
    pipe = tiny_pipeline(num_registers=16)
    real = pipe.detokenize
    pipe.calls = []

    @functools.wraps(real)  # the real signature: the search checks its options against it
    def detokenize(tokens, latents=None, height=None, width=None, output_type="pil", **kwargs):
        pipe.calls.append([(int(t[0]), len(t)) for t in tokens])
        assert latents is not None and latents.shape[0] == len(tokens) and output_type == "pt"
        values = torch.tensor([TABLE[int(t[0])][len(t)] / 64 for t in tokens])
        images = values[:, None, None, None].expand(len(tokens), 3, height, width).clone()
        return type("Out", (), {"images": images})()

    pipe.detokenize = detokenize
    return pipe


def table_ids(b=4):
    return torch.arange(b)[:, None].expand(b, 16).clone()  # image i's ids are all i: the fake decoder reads them


def references(b=4):
    return torch.zeros(b, 3, 32, 32)


def test_smallest_reaching_candidate_and_none_reaches(table_pipe):
    res = choose_tokens(table_pipe, references(), 30, table_metric, higher_is_better=True, ids=table_ids())
    assert res.num_tokens == [4, 1, 16, 2]
    assert res.reached == [True, True, False, True]
    assert res.scores == [30.0, 35.0, 20.0, 40.0]
    # ascending: candidates up to the chosen one, no further
    assert res.decoder_passes == [3, 1, 5, 2]
    assert [list(e) for e in res.evaluated] == [[1, 2, 4], [1], [1, 2, 4, 8, 16], [1, 2]]
    # each round decodes every unfinished image's next candidate in one batch
    assert table_pipe.calls[0] == [(0, 1), (1, 1), (2, 1), (3, 1)] and table_pipe.calls[1] == [(0, 2), (2, 2), (3, 2)]
    assert len(table_pipe.calls) == 5
    assert [len(t) for t in res.tokens] == res.num_tokens and all(t.dim() == 1 for t in res.tokens)
    # other candidates: the largest given is the fallback; unsorted input and repeats are fine
    res = choose_tokens(table_pipe, references(), 30, table_metric, [8, 2, 2], higher_is_better=True, ids=table_ids())
    assert res.candidates == [2, 8] and res.num_tokens == [8, 8, 8, 2]
    # lower is better: the first k at or below the target
    res = choose_tokens(table_pipe, references(), 10, table_metric, higher_is_better=False, ids=table_ids())
    assert res.num_tokens == [1, 2, 1, 1] and res.reached == [True] * 4


def test_decode_batch_size_bounds_the_batches_not_the_answer(table_pipe):
    res = choose_tokens(table_pipe, references(), 30, table_metric, higher_is_better=True, ids=table_ids(),
                        decode_batch_size=2)
    assert res.num_tokens == [4, 1, 16, 2]
    assert max(len(c) for c in table_pipe.calls) == 2


def test_bisect_agrees_where_quality_grows_with_tokens(table_pipe):
    ascending = choose_tokens(table_pipe, references(), 30, table_metric, higher_is_better=True, ids=table_ids())
    bisect = choose_tokens(table_pipe, references(), 30, table_metric, higher_is_better=True, ids=table_ids(),
                           search="bisect")
    # images 0 and 2 never get worse with more tokens: the same answer in fewer passes; 1 and 3 do, and bisect
    # misses their small k (it is only exact for monotone scores)
    assert ascending.num_tokens == [4, 1, 16, 2] and bisect.num_tokens == [4, 16, 16, 16]
    assert bisect.reached == [True, False, False, True]
    assert bisect.decoder_passes == [2, 3, 3, 3]  # at most ceil(log2 5) = 3 halvings (+ the unseen fallback)
    assert all(k in e for k, e in zip(bisect.num_tokens, bisect.evaluated))  # the chosen k's score was decoded


# ------------------------------------------------------------------------------------------------ the demo tokenizer
@pytest.fixture(scope="module")
def photo_pipe():
    pipe = FlexTokPipeline.from_pretrained(PHOTO_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def photos():
    """The 3 sample photos at 64 px plus 5 64-px tiles of them (varied content)."""
    full = load_batch(SAMPLES, 256, "center-crop")
    tiles = [full[i, :, 64 * r:64 * r + 64, 64 * c:64 * c + 64] for i, r, c in
             ((0, 1, 1), (1, 0, 0), (1, 2, 3), (2, 3, 0), (2, 1, 2))]
    return torch.cat([load_batch(SAMPLES, 64, "center-crop"), torch.stack(tiles)])


def exhaustive_scores(pipe, ids, x, noise, ks, metric=psnr, **kw) -> np.ndarray:
    """[B, len(ks)]: every candidate of every image, all in one batch, image i from noise[i]."""
    b = x.shape[0]
    seqs = [ids[i, :k] for i in range(b) for k in ks]
    out = pipe.detokenize(seqs, latents=noise.repeat_interleave(len(ks), 0), output_type="pt", **kw).images
    scores = metric(out * 2 - 1, x.repeat_interleave(len(ks), 0))
    return scores.reshape(b, len(ks)).numpy().astype(np.float64)


def targets_between(scores: np.ndarray, count: int, margin: float) -> list[float]:
    """Targets spread over the measured scores, each at least ``margin`` from every one of them."""
    values = np.sort(scores.reshape(-1))
    gaps = [(b - a, (a + b) / 2) for a, b in zip(values[:-1], values[1:]) if b - a > 2 * margin]
    picks = sorted(gaps, reverse=True)[:count]
    assert len(picks) == count, "no gaps wide enough between the scores"
    return sorted(t for _, t in picks)


def rule(scores_row, ks, target, higher=True):
    for k, s in zip(ks, scores_row):
        if (s >= target) if higher else (s <= target):
            return k
    return ks[-1]


def test_choice_is_the_rule_and_reproduces_by_decoding_again(photo_pipe, photos):
    ks = [1, 2, 4, 8, 16]
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0)
    noise = torch.randn(len(photos), 16, 8, 8, generator=torch.Generator().manual_seed(0))
    ids = photo_pipe.tokenize(photos, sample_posterior=False)
    table = exhaustive_scores(photo_pipe, ids, photos, noise, ks, **kw)
    targets = targets_between(table, 3, margin=0.02)
    seen = set()
    for target in targets + [float(table.max()) + 1]:  # the last: no image reaches it
        chosen = photo_pipe.choose_num_tokens(photos, target, latents=noise, sample_posterior=False, **kw)
        expected = [rule(row, ks, target) for row in table]
        assert chosen == expected, (target, table.round(3))
        seen.update(chosen)
        # decoding the chosen prefix again, alone, from the same latents gives the scored image
        for i, k in enumerate(chosen):
            again = photo_pipe.detokenize([ids[i, :k]], latents=noise[i:i + 1], output_type="pt", **kw).images
            score = float(psnr(again * 2 - 1, photos[i:i + 1]))
            assert abs(score - table[i, ks.index(k)]) < 1e-3
            assert (score >= target) == (table[i].max() >= target)  # reached, or nobody could: k = 16
    assert chosen == [16] * len(photos)  # the unreachable target
    assert len(seen) >= 3, seen  # the targets make different images choose different k


def test_tokenize_auto_is_ragged_and_round_trips(photo_pipe, photos, tmp_path):
    kw = dict(num_inference_steps=STEPS, guidance_scale=3.0, sample_posterior=False)
    noise = torch.randn(len(photos), 16, 8, 8, generator=torch.Generator().manual_seed(1))
    ids = photo_pipe.tokenize(photos, sample_posterior=False)
    table = exhaustive_scores(photo_pipe, ids, photos, noise, [1, 2, 4, 8, 16], num_inference_steps=STEPS,
                              guidance_scale=3.0)
    target = targets_between(table, 1, margin=0.02)[0]
    ks = photo_pipe.choose_num_tokens(photos, target, latents=noise, **kw)
    rows = photo_pipe.tokenize(photos, num_tokens="auto", target=target, metric="psnr", latents=noise, **kw)
    assert isinstance(rows, list) and [len(r) for r in rows] == ks and len(set(ks)) > 1
    assert all(r.dim() == 1 and r.dtype == torch.long and torch.equal(r, ids[i, :len(r)]) for i, r in enumerate(rows))
    direct = photo_pipe.detokenize(rows, latents=noise, output_type="pt", num_inference_steps=STEPS,
                                   guidance_scale=3.0).images
    TokenFile.from_rows(rows, photo_pipe.fingerprint, model_name="photo").save(tmp_path / "auto.safetensors")
    back = load(tmp_path / "auto.safetensors")
    assert back.lengths.tolist() == ks and all(torch.equal(a, b) for a, b in zip(back.rows(), rows))
    again = photo_pipe.detokenize(back.rows(), latents=noise, output_type="pt", num_inference_steps=STEPS,
                                  guidance_scale=3.0).images
    assert torch.equal(direct, again)
    # one generator: the posterior sample, then the noise; the same seed gives the same choice
    a = photo_pipe.tokenize(photos[:3], num_tokens="auto", target=target, generator=torch.Generator().manual_seed(3),
                            num_inference_steps=STEPS, guidance_scale=3.0)
    b = photo_pipe.tokenize(photos[:3], num_tokens="auto", target=target, generator=torch.Generator().manual_seed(3),
                            num_inference_steps=STEPS, guidance_scale=3.0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_ssim_and_lpips_directions(photo_pipe, photos):
    pytest.importorskip("stlpips_pytorch")
    kw = dict(num_inference_steps=2, guidance_scale=1.0, sample_posterior=False,
              latents=torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(2)))
    x = photos[:3]
    # lower is better: any reconstruction is within distance 10 (smallest k), none within 0 (the largest)
    assert photo_pipe.choose_num_tokens(x, 10.0, metric="lpips", **kw) == [1, 1, 1]
    assert photo_pipe.choose_num_tokens(x, 0.0, metric="lpips", candidates=[2, 4], **kw) == [4, 4, 4]
    assert photo_pipe.choose_num_tokens(x, -1.0, metric="ssim", **kw) == [1, 1, 1]
    assert photo_pipe.choose_num_tokens(x, 1.0, metric="ssim", **kw) == [16, 16, 16]


# ------------------------------------------------------------------------------------------------ refused input
@pytest.mark.parametrize("kwargs,name", [
    (dict(target=float("nan")), "target"), (dict(target="28"), "target"), (dict(target=0.0), "target"),
    (dict(target=1.5, metric="ssim"), "target"), (dict(target=-0.1, metric="lpips"), "target"),
    (dict(target=28, metric="psnrr"), "metric"), (dict(target=28, metric=None), "metric"),
    (dict(target=28, metric=psnr), "higher_is_better"),
    (dict(target=28, metric="psnr", higher_is_better=False), "higher_is_better"),
    (dict(target=28, candidates=[]), "candidates"), (dict(target=28, candidates=[0, 4]), "candidates\\[0\\]"),
    (dict(target=28, candidates=[4, 17]), "candidates\\[1\\]"), (dict(target=28, candidates="1,2"), "candidates"),
    (dict(target=28, candidates=[2.5]), "candidates\\[0\\]"), (dict(target=28, search="binary"), "search"),
    (dict(target=28, num_inference_steps=0), "num_inference_steps"),
    (dict(target=28, decode_batch_size=0), "decode_batch_size"),
])
def test_bad_arguments_are_refused_by_name(photo_pipe, kwargs, name):
    x = load_batch(SAMPLES, 64, "center-crop")[:1]
    with pytest.raises(ValueError, match=f"^{name}"):
        photo_pipe.choose_num_tokens(x, **kwargs)
    with pytest.raises(ValueError, match=f"^{name}"):
        photo_pipe.tokenize(x, num_tokens="auto", **kwargs)


def test_bad_modes_and_keywords(photo_pipe):
    x = load_batch(SAMPLES, 64, "center-crop")[:1]
    with pytest.raises(ValueError, match="num_tokens must be an integer in 1..16 or 'auto', got 'fast'"):
        photo_pipe.tokenize(x, num_tokens="fast", target=20)
    with pytest.raises(ValueError, match="num_tokens='auto' needs target="):
        photo_pipe.tokenize(x, num_tokens="auto")
    with pytest.raises(TypeError, match="options of num_tokens='auto'"):
        photo_pipe.tokenize(x, num_tokens=4, target=20)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'steps'"):
        photo_pipe.choose_num_tokens(x, 20, steps=3)
    with pytest.raises(TypeError, match="unexpected keyword argument.*'output_type'"):
        photo_pipe.choose_num_tokens(x, 20, output_type="pil")
    with pytest.raises(ValueError, match="latents must have shape"):
        photo_pipe.choose_num_tokens(x, 20, latents=torch.zeros(2, 16, 8, 8), num_inference_steps=1)


def test_lpips_without_its_wheel_is_a_clear_error(photo_pipe, monkeypatch):
    def missing(name):
        raise ImportError("No module named 'stlpips_pytorch'")

    token_budget._stlpips.cache_clear()
    monkeypatch.setattr(token_budget, "build_perceptual", missing)
    try:
        with pytest.raises(ImportError, match="metric='lpips' needs ST-LPIPS: `pip install --no-deps stlpips-pytorch`"):
            photo_pipe.choose_num_tokens(load_batch(SAMPLES, 64, "center-crop")[:1], 0.2, metric="lpips")
        assert cli.main(["tokenize", str(SAMPLES), "--model", str(PHOTO_MODEL), "--out", "x.safetensors",
                         "--auto", "lpips:0.2"]) == 2
    finally:
        token_budget._stlpips.cache_clear()


# ------------------------------------------------------------------------------------------------ command line
def flextok(*args):
    return subprocess.run([sys.executable, "-m", "flextok_kit.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600)


def test_cli_auto_writes_ragged_rows_that_detokenize_reproduces(photo_pipe, tmp_path):
    x = load_batch(SAMPLES, 64, "center-crop")
    ids = photo_pipe.tokenize(x, sample_posterior=False)
    # the CLI seeds row i's noise with --seed + i, as `flextok detokenize --seed` does
    noise = torch.cat([torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(7 + i)) for i in range(3)])
    table = exhaustive_scores(photo_pipe, ids, x, noise, [1, 2, 4, 8, 16], num_inference_steps=STEPS,
                              guidance_scale=3.0)
    target = targets_between(table, 1, margin=0.02)[0]
    common = ["--model", PHOTO_MODEL, "--steps", STEPS, "--guidance", 3, "--seed", 7]
    out = tmp_path / "auto.safetensors"
    proc = flextok("tokenize", SAMPLES, "--fit", "center-crop", "--size", 64, "--deterministic", "--out", out,
                   "--auto", f"psnr:{target}", "--quiet", *common)
    assert proc.returncode == 0, proc.stderr
    tokens = load(out)
    expected = [rule(row, [1, 2, 4, 8, 16], target) for row in table]
    assert tokens.lengths.tolist() == expected and len(set(expected)) > 1
    assert all(torch.equal(r, ids[i, :len(r)]) for i, r in enumerate(tokens.rows()))
    auto = tokens.extra["auto"]
    assert (auto["metric"], auto["target"], auto["candidates"]) == ("psnr", target, [1, 2, 4, 8, 16])
    assert [r["k"] for r in auto["rows"]] == expected
    for i, r in enumerate(auto["rows"]):
        assert abs(r["score"] - table[i, [1, 2, 4, 8, 16].index(r["k"])]) < 1e-3
    mean = sum(expected) / 3
    assert f"auto psnr >= {target:g}: mean k {mean:.2f}" in proc.stdout and "chosen k   images" in proc.stdout
    assert "decoder passes per image" in proc.stdout
    # detokenize with the same seed, steps and guidance: the scored images (up to 8-bit rounding)
    proc = flextok("detokenize", out, "--out", tmp_path / "png", "--quiet", *common)
    assert proc.returncode == 0, proc.stderr
    for i, path in enumerate(sorted(find_images([SAMPLES]))):
        png = np.asarray(PIL.Image.open(tmp_path / "png" / f"{path.stem}.png").convert("RGB"), dtype=np.float32)
        score = float(psnr(torch.from_numpy(png).permute(2, 0, 1)[None] / 127.5 - 1, x[i:i + 1]))
        assert abs(score - auto["rows"][i]["score"]) < 0.05, (path.name, score, auto["rows"][i])


def test_cli_auto_sharded_and_bisect(tmp_path):
    out = tmp_path / "shards"
    proc = flextok("tokenize", SAMPLES, "--model", PHOTO_MODEL, "--fit", "center-crop", "--size", 64, "--out", out,
                   "--shard-size", 2, "--auto", "ssim:0.99", "--candidates", 2, 8, "--search", "bisect", "--steps", 2,
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    tokens = load(out / "shard-000001.safetensors")
    assert tokens.lengths.tolist() == [8] and tokens.extra["auto"]["rows"][0]["reached"] is False
    assert "0 of 3 image(s) reach the target, the others keep 8 tokens" in proc.stdout
    assert "(bisect search over 2 candidates)" in proc.stdout
    assert json.loads((out / "index.json").read_text())["settings"]["auto"]["metric"] == "ssim"


@pytest.mark.parametrize("args,message", [
    (["--auto", "psnr"], "--auto 'psnr': give METRIC:TARGET"),
    (["--auto", "mse:3"], "--auto 'mse:3': the metric must be one of psnr, ssim, lpips"),
    (["--auto", "psnr:high"], "the target 'high' is not a number"),
    (["--auto", "psnr:-3"], "--auto 'psnr:-3': target must be a finite number > 0"),
    (["--auto", "ssim:1.5"], "target must be a finite number in [-1, 1]"),
    (["--auto", "psnr:20", "--num-tokens", "4"], "leave out --num-tokens"),
    (["--candidates", "4"], "--candidates and --search go with --auto"),
    (["--auto", "psnr:20", "--candidates", "0", "4"], "--candidates: candidates[0] must be an integer in 1..16"),
    (["--auto", "psnr:20", "--candidates", "32"], "--candidates: candidates[0] must be an integer in 1..16, got 32"),
])
def test_cli_bad_auto_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "t.safetensors"
    code = cli.main(["tokenize", str(SAMPLES), "--model", str(PHOTO_MODEL), "--fit", "center-crop", "--size", "64",
                     "--out", str(out), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("flextok tokenize: error: "), err
    assert message in err and not out.exists()
