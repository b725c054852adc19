"""Bad pipeline inputs (images, tokens, sampling settings) give clear errors that name the argument, the accepted
range and the value; unusual but valid inputs (16-bit images) give the right tokens.

Every error test is paired with a positive control (the same path with valid input works), so an
implementation that rejects everything fails too.
"""
from __future__ import annotations

import math
import re

import numpy as np
import PIL.Image
import pytest
import torch

from flextok_kit.flextok_core import FlexTokAR
from flextok_kit.pipelines import FlexTokPipeline

from .bad_input_common import _no_grad, base  # noqa: F401  (fixtures used by name)
from .bad_input_common import N, png16, to8
from .official_format import random_images


@pytest.fixture(scope="module")
def pipe(base):
    p = FlexTokPipeline.from_official(base.folder)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def ar_pipe(pipe):
    """The same tokenizer with a tiny class-conditional AR model."""
    torch.manual_seed(0)
    ar = FlexTokAR.from_preset("tiny", max_tokens=N, num_classes=3, id2label={0: "a", 1: "b", 2: "c"}).eval()
    p = FlexTokPipeline(vae=pipe.vae, flextok=pipe.flextok, scheduler=FlexTokPipeline.default_scheduler(),
                        ar_model=ar)
    p.set_progress_bar_config(disable=True)
    return p

# ---------------------------------------------------------------------------------------------------
# pipeline inputs
# ---------------------------------------------------------------------------------------------------
def test_valid_pipeline_inputs(pipe):
    for size in (16, 32, 48, 64):
        ids = pipe.tokenize(random_images(1, size), num_tokens=2)
        assert ids.shape == (1, 2)
    assert pipe.tokenize(random_images(1, 32)[0]).shape == (1, N)  # [3,H,W] is one image
    ids = torch.tensor([[0, 63999]])
    out = pipe.detokenize(ids, num_inference_steps=1, output_type="pt", height=32, width=32,
                          generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 32, 32)
    out = pipe.detokenize([torch.tensor([5]), torch.arange(N)], num_inference_steps=1, output_type="latent",
                          latents=torch.zeros(2, 16, 2, 4)).images
    assert out.shape == (2, 16, 2, 4)


@pytest.mark.parametrize("shape", [(32, 32), (1, 1, 3, 32, 32), (3, 32)])
def test_image_wrong_rank(pipe, shape):
    with pytest.raises(ValueError, match=r"shape \[B,3,H,W\].*got " + re.escape(str(shape))):
        pipe.tokenize(torch.zeros(shape))


@pytest.mark.parametrize("channels", [1, 4])
def test_image_wrong_channels(pipe, channels):
    with pytest.raises(ValueError, match=rf"shape \[B,3,H,W\].*got \(1, {channels}, 32, 32\)"):
        pipe.tokenize(torch.zeros(1, channels, 32, 32))


@pytest.mark.parametrize("hw", [(40, 40), (32, 24), (8, 8)])
def test_image_size_not_multiple_of_16(pipe, hw):
    with pytest.raises(ValueError, match=rf"{hw[0]}x{hw[1]} is not supported.*multiples of 16"):
        pipe.tokenize(torch.zeros(1, 3, *hw))


@pytest.mark.parametrize("hw", [(128, 128), (80, 32)])
def test_image_larger_than_model_supports(pipe, hw):
    with pytest.raises(ValueError, match=r"at most 64x64"):
        pipe.tokenize(torch.zeros(1, 3, *hw))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_image_integer_dtype(pipe, dtype):
    with pytest.raises(ValueError, match=r"floating point.*" + str(dtype).replace(".", r"\.")):
        pipe.tokenize(torch.zeros(1, 3, 32, 32, dtype=dtype))


def test_image_values_0_255(pipe):
    images = (random_images(1, 32) + 1) * 127.5
    with pytest.raises(ValueError, match=r"\[-1,1\].*looks like \[0,255\]"):
        pipe.tokenize(images)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_image_nan(pipe, bad):
    images = random_images(1, 32)
    images[0, 1, 3, 4] = bad
    with pytest.raises(ValueError, match=r"NaN or inf"):
        pipe.tokenize(images)


@pytest.mark.parametrize("tokens, match", [
    (torch.tensor([[1, -1]]), r"token id -1 at position 1 of sequence 0 is outside \[0, 64000\)"),
    (torch.tensor([[64000]]), r"token id 64000 at position 0 of sequence 0 is outside \[0, 64000\)"),
    ([torch.tensor([3]), torch.tensor([2, 10 ** 6])], r"token id 1000000 .*sequence 1 .*outside \[0, 64000\)"),
    (torch.tensor([[1.0, 2.0]]), r"must be integers.*torch\.float32"),
    (torch.tensor([[True]]), r"must be integers.*torch\.bool"),
    (torch.zeros(1, 0, dtype=torch.long), r"has 0 tokens; this model decodes 1\.\.12"),
    ([torch.tensor([1]), torch.zeros(0, dtype=torch.long)], r"sequence 1 has 0 tokens"),
    (torch.zeros(1, N + 1, dtype=torch.long), r"has 13 tokens; this model decodes 1\.\.12"),
    ([], r"non-empty list"),
    (torch.zeros(1, 2, 3, dtype=torch.long), r"tokens must be \[B,k\]"),
    ([torch.zeros(2, 3, dtype=torch.long)], r"sequence 0 must be 1-D"),
])
def test_bad_tokens(pipe, tokens, match):
    with pytest.raises(ValueError, match=match):
        pipe.detokenize(tokens, num_inference_steps=1, output_type="latent", height=32, width=32)


@pytest.mark.parametrize("k", [0, -1, N + 1])
def test_tokenize_num_tokens_out_of_range(pipe, k):
    with pytest.raises(ValueError, match=rf"num_tokens must be an integer in 1\.\.{N}, got {k}"):
        pipe.tokenize(random_images(1, 32), num_tokens=k)


@pytest.mark.parametrize("shape", [(1, 16, 4, 4), (2, 4, 4, 4), (2, 16, 4)])
def test_wrong_latents_shape(pipe, shape):
    with pytest.raises(ValueError, match=r"latents must have shape \(2, 16, 4, 4\)"):
        pipe.detokenize(torch.zeros(2, 3, dtype=torch.long), num_inference_steps=1, output_type="latent",
                        height=32, width=32, latents=torch.zeros(shape))


@pytest.mark.parametrize("output_type", ["png", "PIL", None])
def test_bad_output_type(pipe, output_type):
    with pytest.raises(ValueError, match=r"output_type must be one of \('pil', 'np', 'pt', 'latent'\)"):
        pipe.detokenize(torch.zeros(1, 3, dtype=torch.long), num_inference_steps=1, output_type=output_type)


# ---------------------------------------------------------------------------------------------------
# 16-bit images: the tokens of the same picture correctly converted to 8 bits (round(v / 65535 * 255))
# ---------------------------------------------------------------------------------------------------
def test_16bit_grayscale_pil_image(pipe, tmp_path):
    a = np.random.default_rng(0).integers(0, 65536, (32, 32), dtype=np.uint16)
    opened = PIL.Image.open(png16(tmp_path / "gray16.png", a))
    opened.load()
    assert opened.mode.startswith("I;16")  # what Pillow gives for a 16-bit grayscale PNG
    made = PIL.Image.fromarray(a)
    assert made.mode.startswith("I;16")
    reference = PIL.Image.fromarray(to8(a), mode="L").convert("RGB")  # the same picture in 8 bits
    want_pixels = pipe._images_to_tensor(reference)
    want = pipe.tokenize(reference)
    for im in (opened, made):
        torch.testing.assert_close(pipe._images_to_tensor(im), want_pixels, atol=0, rtol=0)
        assert torch.equal(pipe.tokenize(im), want)
    # not clipped: a 16-bit picture is not (mostly) white
    assert want_pixels.mean() < 0.5


def test_16bit_rgb_png(pipe, tmp_path):
    """Pillow decodes a 16-bit RGB PNG to mode RGB itself, keeping the high byte of each value (v >> 8): exact
    for 16-bit data made from 8-bit data (v = 257 k), within one level of round(v / 65535 * 255) otherwise."""
    rng = np.random.default_rng(1)
    k = rng.integers(0, 256, (32, 32, 3))
    a = (k * 257).astype(np.uint16)
    im = PIL.Image.open(png16(tmp_path / "rgb16.png", a))
    im.load()
    assert np.array_equal(to8(a), k)
    reference = PIL.Image.fromarray(to8(a), mode="RGB")
    assert torch.equal(pipe._images_to_tensor(im), pipe._images_to_tensor(reference))
    assert torch.equal(pipe.tokenize(im), pipe.tokenize(reference))
    b = rng.integers(0, 65536, (32, 32, 3), dtype=np.uint16)
    im = PIL.Image.open(png16(tmp_path / "rgb16_any.png", b))
    got = ((pipe._images_to_tensor(im)[0].permute(1, 2, 0).numpy() + 1) * 127.5).round()
    assert np.abs(got - to8(b)).max() <= 1
    # from a file, the shared image loader (CLI, demo, evaluation) decodes all 16 bits and rounds exactly
    from flextok_kit.images import load_image

    exact = load_image(tmp_path / "rgb16_any.png")
    assert np.array_equal(np.asarray(exact), to8(b)) and not np.array_equal(np.asarray(im.convert("RGB")), to8(b))


def test_mixed_image_list(pipe):
    im = PIL.Image.new("RGB", (32, 32))
    with pytest.raises(TypeError, match=r"images mixes PIL images and other types"):
        pipe.tokenize([im, random_images(1, 32)[0]])
    assert pipe.tokenize([im, im]).shape == (2, N)  # control


# ---------------------------------------------------------------------------------------------------
# empty batches name the argument
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("images, match", [
    (torch.empty(0, 3, 32, 32), r"images is an empty batch \(tensor of shape \(0, 3, 32, 32\)\)"),
    ([], r"images is an empty list"),
    ((), r"images is an empty list"),
])
def test_tokenize_empty_batch(pipe, images, match):
    with pytest.raises(ValueError, match=match):
        pipe.tokenize(images)
    with pytest.raises(ValueError, match=match):
        pipe(image=images, num_tokens=2, num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("tokens, match", [
    ([], r"tokens is an empty list"),
    (torch.empty(0, 3, dtype=torch.long), r"tokens is an empty batch \(shape \(0, 3\)\)"),
    (torch.empty(0, dtype=torch.long), r"sequence 0 has 0 tokens"),
])
def test_detokenize_empty_batch(pipe, tokens, match):
    with pytest.raises(ValueError, match=match):
        pipe.detokenize(tokens, num_inference_steps=1, output_type="latent")


def test_tokens_of_wrong_type(pipe):
    with pytest.raises(TypeError, match=r"tokens must be a LongTensor \[B,k\] .*got str"):
        pipe.detokenize("1 2 3", num_inference_steps=1, output_type="latent")


@pytest.mark.parametrize("kwargs, match", [
    (dict(class_labels=[]), r"class_labels is empty"),
    (dict(class_labels=torch.tensor([], dtype=torch.long)), r"class_labels is empty"),
    (dict(class_labels=[1.5]), r"class_labels\[0\] must be an integer, got 1\.5 \(float\)"),
    (dict(class_labels=[0, True]), r"class_labels\[1\] must be an integer, got True \(bool\)"),
    (dict(prompt=[]), r"prompt must be a string or a non-empty list of strings"),
])
def test_generation_empty_or_bad_condition(ar_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ar_pipe(num_tokens=2, output_type="tokens", **kwargs)
    assert ar_pipe(class_labels=[0, "b"], num_tokens=2, output_type="tokens").tokens.shape == (2, 2)  # control


def test_ar_model_empty_batch(ar_pipe):
    with pytest.raises(ValueError, match=r"empty batch: class_labels has batch size 0"):
        ar_pipe.ar_model.generate(class_labels=[], num_tokens=2)


def test_reconstruction_empty_num_tokens_list(pipe):
    with pytest.raises(ValueError, match=r"num_tokens is an empty list"):
        pipe(image=random_images(1, 32), num_tokens=[], num_inference_steps=1, output_type="latent")


# ---------------------------------------------------------------------------------------------------
# token counts: integers in 1..N (no bools, no floats, no silent "0 means all")
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k, match", [
    (True, rf"num_tokens must be an integer in 1\.\.{N}, got True \(bool\)"),
    (2.5, rf"num_tokens must be an integer in 1\.\.{N}, got 2\.5 \(float\)"),
    ("3", rf"num_tokens must be an integer in 1\.\.{N}, got '3' \(str\)"),
])
def test_tokenize_num_tokens_not_an_integer(pipe, k, match):
    with pytest.raises(ValueError, match=match):
        pipe.tokenize(random_images(1, 32), num_tokens=k)
    assert pipe.tokenize(random_images(1, 32), num_tokens=np.int64(3)).shape == (1, 3)  # control: numpy ints


@pytest.mark.parametrize("k, match", [
    (0, rf"num_tokens must be an integer in 1\.\.{N}, got 0"),
    (N + 1, rf"num_tokens must be an integer in 1\.\.{N}, got {N + 1}"),
    (True, r"num_tokens must be an integer .*got True \(bool\)"),
    ([2, 0], rf"num_tokens\[1\] must be an integer in 1\.\.{N}, got 0"),
    ([2, 3.0], r"num_tokens\[1\] must be an integer .*got 3\.0 \(float\)"),
])
def test_reconstruct_num_tokens(pipe, k, match):
    with pytest.raises(ValueError, match=match):
        pipe(image=random_images(1, 32), num_tokens=k, output_type="tokens")
    assert pipe(image=random_images(1, 32), num_tokens=[1, 2], output_type="tokens").tokens[1].shape == (2,)


# ---------------------------------------------------------------------------------------------------
# decoder sampling settings: finite, in range, named
# ---------------------------------------------------------------------------------------------------
NAN, INF = float("nan"), float("inf")
GS = r"guidance_scale must be a finite number >= 0 \(1 = no guidance, 0 = unconditional.*\), got "


@pytest.mark.parametrize("kwargs, match", [
    (dict(guidance_scale=NAN), GS + "nan"),
    (dict(guidance_scale=INF), GS + "inf"),
    (dict(guidance_scale=-INF), GS + "-inf"),
    (dict(guidance_scale=-0.5), GS + r"-0\.5"),
    (dict(guidance_scale="7.5"), GS + r"'7\.5' \(str\)"),
    (dict(guidance_scale=True), GS + r"True \(bool\)"),
    (dict(num_inference_steps=0), r"num_inference_steps must be an integer >= 1, got 0"),
    (dict(num_inference_steps=-3), r"num_inference_steps must be an integer >= 1, got -3"),
    (dict(num_inference_steps=2.0), r"num_inference_steps must be an integer >= 1, got 2\.0 \(float\)"),
    (dict(num_inference_steps=True), r"num_inference_steps must be an integer >= 1, got True \(bool\)"),
    (dict(apg_momentum=NAN), r"apg_momentum must be a finite number in \[-1, 1\] \(.*\), got nan"),
    (dict(apg_momentum=1.5), r"apg_momentum must be a finite number in \[-1, 1\] \(.*\), got 1\.5"),
    (dict(apg_momentum=-2), r"apg_momentum must be a finite number in \[-1, 1\] \(.*\), got -2"),
    (dict(apg_norm_threshold=NAN), r"apg_norm_threshold must be a finite number >= 0 \(None or 0 = no clipping.*"
                                   r"got nan"),
    (dict(apg_norm_threshold=INF), r"apg_norm_threshold must be a finite number >= 0 .*got inf"),
    (dict(apg_norm_threshold=-1.0), r"apg_norm_threshold must be a finite number >= 0 .*got -1\.0"),
    (dict(apg_eta=NAN), r"apg_eta must be a finite number in \[0, 1\] .*got nan"),
    (dict(apg_eta=-0.1), r"apg_eta must be a finite number in \[0, 1\] .*got -0\.1"),
    (dict(apg_eta=1.5), r"apg_eta must be a finite number in \[0, 1\] .*got 1\.5"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt must be an integer >= 1, got 0"),
    (dict(num_images_per_prompt=1.5), r"num_images_per_prompt must be an integer >= 1, got 1\.5 \(float\)"),
    (dict(decode_batch_size=0), r"decode_batch_size must be an integer >= 1, got 0"),
    (dict(guidance_schedule=lambda t: NAN), r"guidance_schedule\(t=1\) must be a finite number >= 0 .*got nan"),
    (dict(guidance_schedule=lambda t: 3.0 if t > 0.6 else -1.0),
     r"guidance_schedule\(t=0\.5\) must be a finite number >= 0 .*got -1\.0"),
])
def test_bad_decoder_settings(pipe, kwargs, match):
    tokens = torch.tensor([[1, 2]])
    settings = dict(num_inference_steps=2, output_type="latent", height=32, width=32)
    settings.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipe.detokenize(tokens, **settings)
    with pytest.raises(ValueError, match=match):  # and through __call__, before anything is tokenized
        pipe(image=random_images(1, 32), num_tokens=2, **{k: v for k, v in settings.items() if k != "output_type"},
             output_type="latent")


def test_guidance_schedule_not_callable(pipe):
    with pytest.raises(TypeError, match=r"guidance_schedule must be None or a callable t -> scale, got float"):
        pipe.detokenize(torch.tensor([[1]]), num_inference_steps=1, output_type="latent", guidance_schedule=7.5)


def test_unknown_decoder_option(pipe):
    with pytest.raises(TypeError, match=r"unexpected keyword argument\(s\) \['guidence_scale'\]; decoder options "
                                        r"are those of detokenize\(\)"):
        pipe(image=random_images(1, 32), num_tokens=2, guidence_scale=3.0)


def test_valid_decoder_edge_settings(pipe):
    """Control: the edges of every range are accepted and give finite results; None means 'off'."""
    tokens = torch.tensor([[1, 2], [3, 4]])
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(0))

    def run(**kw):
        kw.setdefault("num_inference_steps", 3)
        out = pipe.detokenize(tokens, output_type="latent", latents=noise, **kw).images
        assert torch.isfinite(out).all()
        return out

    for scale in (0.0, 0.5, 1.0, 30.0):
        run(guidance_scale=scale, use_apg=False)
    for momentum in (-1.0, 0.0, 1.0):
        run(guidance_scale=3.0, apg_momentum=momentum)
    run(guidance_scale=3.0, apg_eta=1.0)
    torch.testing.assert_close(run(guidance_scale=3.0, apg_norm_threshold=None),
                               run(guidance_scale=3.0, apg_norm_threshold=0.0), atol=0, rtol=0)
    torch.testing.assert_close(run(guidance_scale=3.0, apg_momentum=None),
                               run(guidance_scale=3.0, apg_momentum=0.0), atol=0, rtol=0)
    run(guidance_schedule=lambda t: 1.0 + 4.0 * t, num_inference_steps=np.int64(3))


# ---------------------------------------------------------------------------------------------------
# AR sampling settings: the same validator for the pipeline (ar_* names) and FlexTokAR.generate
# ---------------------------------------------------------------------------------------------------
AR_CASES = [
    ("guidance_scale", NAN, r"{g} must be a finite number >= 0 .*got nan"),
    ("guidance_scale", INF, r"{g} must be a finite number >= 0 .*got inf"),
    ("guidance_scale", -1.0, r"{g} must be a finite number >= 0 .*got -1\.0"),
    ("guidance_schedule", "cosine", r"{s} must be one of \('constant', 'linear'\), got 'cosine'"),
    ("temperature", 0.0, r"temperature must be a finite number > 0 \(use top_k=1 for greedy decoding\), got 0\.0"),
    ("temperature", -1.0, r"temperature must be a finite number > 0 .*got -1\.0"),
    ("temperature", NAN, r"temperature must be a finite number > 0 .*got nan"),
    ("temperature", INF, r"temperature must be a finite number > 0 .*got inf"),
    ("top_p", 0.0, r"top_p must be a finite number in \(0, 1\] .*got 0\.0"),
    ("top_p", 1.5, r"top_p must be a finite number in \(0, 1\] .*got 1\.5"),
    ("top_p", NAN, r"top_p must be a finite number in \(0, 1\] .*got nan"),
    ("top_k", -1, r"top_k must be an integer >= 0, got -1"),
    ("top_k", 2.5, r"top_k must be an integer >= 0, got 2\.5 \(float\)"),
    ("top_k", True, r"top_k must be an integer >= 0, got True \(bool\)"),
    ("num_tokens", 0, rf"num_tokens must be an integer in 1\.\.{N}, got 0"),
    ("num_tokens", 2.0, rf"num_tokens must be an integer in 1\.\.{N}, got 2\.0 \(float\)"),
    ("num_tokens", True, rf"num_tokens must be an integer in 1\.\.{N}, got True \(bool\)"),
]


@pytest.mark.parametrize("name, value, match", AR_CASES)
def test_bad_ar_settings_pipeline(ar_pipe, name, value, match):
    key = {"guidance_scale": "ar_guidance_scale", "guidance_schedule": "ar_guidance_schedule"}.get(name, name)
    match = match.format(g="ar_guidance_scale", s="ar_guidance_schedule")
    with pytest.raises(ValueError, match=match):
        ar_pipe(class_labels=[0], output_type="tokens", **{"num_tokens": 2, key: value})
    with pytest.raises(ValueError, match=match):
        ar_pipe.generate_tokens(class_labels=[0], **{"num_tokens": 2, key: value})


@pytest.mark.parametrize("name, value, match", AR_CASES)
def test_bad_ar_settings_model(ar_pipe, name, value, match):
    match = match.format(g="guidance_scale", s="guidance_schedule")
    with pytest.raises(ValueError, match=match):
        ar_pipe.ar_model.generate(class_labels=[0], **{"num_tokens": 2, name: value})


def test_valid_ar_edge_settings(ar_pipe):
    g = torch.Generator().manual_seed(0)
    for kw in (dict(ar_guidance_scale=0.0), dict(ar_guidance_scale=0.5), dict(temperature=1e-3),
               dict(top_p=1.0, top_k=0), dict(top_p=1e-6), dict(top_k=1, temperature=100.0),
               dict(ar_guidance_schedule="linear", ar_guidance_scale=2.0)):
        ids = ar_pipe.generate_tokens(class_labels=[0, 1], num_tokens=np.int64(3), generator=g, **kw)
        assert ids.shape == (2, 3) and ((ids >= 0) & (ids < 64000)).all()
    assert math.isfinite(ar_pipe.ar_model.generate(class_labels=[2], num_tokens=1, guidance_scale=0.0).float().sum())
