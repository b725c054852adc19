"""Pipeline behaviour on tiny random models: fast == plain decoding, batching, saving and loading."""
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL

from flextok_kit.flextok_core import FlexTokModel
from flextok_kit.pipelines import FlexTokPipeline

from .conftest import GOLDEN


def tiny_pipeline(seed=0, num_registers=32, **overrides) -> FlexTokPipeline:
    torch.manual_seed(seed)
    config = dict(grid_size=(4, 4), num_registers=num_registers, encoder_dim=64, encoder_depth=2, encoder_head_dim=32,
                  decoder_dim=64, decoder_depth=2, decoder_head_dim=32)
    config.update(overrides)
    model = FlexTokModel(**config)
    with torch.no_grad():  # non-zero everything, like trained weights
        for p in model.parameters():
            p.normal_(0, 0.5 if p.dim() < 2 else 1 / p.shape[1] ** 0.5)
    vae = AutoencoderKL(block_out_channels=[8, 16, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
                        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=16, norm_num_groups=8)
    pipe = FlexTokPipeline(vae=vae.eval(), flextok=model.eval(), scheduler=FlexTokPipeline.default_scheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("guidance,apg", [(1.0, False), (3.0, False), (3.0, True)])
def test_fast_decoding_equals_plain(pipe, guidance, apg):
    ids = torch.randint(0, 64000, (4, 32), generator=torch.Generator().manual_seed(1))
    tokens = [ids[0, :1], ids[1, :7], ids[2, :31], ids[3, :32]]  # run of 31, 25, 1 and 0 mask tokens
    noise = torch.randn(4, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    kw = dict(num_inference_steps=3, guidance_scale=guidance, use_apg=apg, latents=noise, output_type="latent")
    plain = pipe.detokenize(tokens, fast_decoding=False, **kw).images
    fast = pipe.detokenize(tokens, fast_decoding=True, **kw).images
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=0)
    # and the prefix length matters: a stub that ignored keep_k would not notice
    other = pipe.detokenize([ids[0, :2], ids[1, :7], ids[2, :31], ids[3, :32]], **kw).images
    assert (other[0] - fast[0]).abs().max() > 1e-3
    torch.testing.assert_close(other[1:], fast[1:], atol=1e-5, rtol=0)


def test_fast_decoding_equals_plain_on_golden():
    pipe = FlexTokPipeline.from_official(GOLDEN)
    pipe.set_progress_bar_config(disable=True)
    ids = torch.randint(0, 64000, (3, 32), generator=torch.Generator().manual_seed(3))
    noise = torch.randn(3, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    kw = dict(num_inference_steps=5, guidance_scale=7.5, latents=noise, output_type="latent")
    tokens = [ids[0, :1], ids[1, :16], ids[2]]
    plain = pipe.detokenize(tokens, fast_decoding=False, **kw).images
    torch.testing.assert_close(pipe.detokenize(tokens, **kw).images, plain, atol=1e-5, rtol=0)


def test_batch_equals_one_by_one(pipe):
    ids = torch.randint(0, 64000, (3, 32), generator=torch.Generator().manual_seed(5))
    tokens = [ids[0, :3], ids[1, :12], ids[2, :32]]
    noise = torch.randn(3, 16, 4, 4, generator=torch.Generator().manual_seed(6))
    kw = dict(num_inference_steps=2, guidance_scale=2.0, output_type="latent")
    batched = pipe.detokenize(tokens, latents=noise, **kw).images
    for i, t in enumerate(tokens):
        single = pipe.detokenize([t], latents=noise[i : i + 1], **kw).images
        torch.testing.assert_close(single[0], batched[i], atol=1e-5, rtol=0)


def test_token_formats_agree(pipe):
    ids = torch.randint(0, 64000, (2, 8), generator=torch.Generator().manual_seed(7))
    noise = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(8))
    kw = dict(num_inference_steps=2, guidance_scale=1.0, latents=noise, output_type="latent")
    a = pipe.detokenize(ids, **kw).images
    b = pipe.detokenize([ids[0], ids[1]], **kw).images  # list of 1-D
    c = pipe.detokenize([ids[0:1], ids[1:2]], **kw).images  # official list of [1,k]
    d = pipe.detokenize(ids.tolist(), **kw).images  # plain lists of ints
    for x in (b, c, d):
        assert torch.equal(a, x)


def test_tokenize_prefix_and_posterior(pipe):
    x = images()
    full = pipe.tokenize(x, sample_posterior=False)
    assert full.shape == (2, 32) and full.dtype == torch.long
    assert torch.equal(pipe.tokenize(x, num_tokens=5, sample_posterior=False), full[:, :5])
    assert torch.equal(pipe.tokenize(x, sample_posterior=False), full)  # mode: deterministic
    torch.manual_seed(0)
    a = pipe.tokenize(x)  # the checkpoint's default: sample the posterior
    torch.manual_seed(0)
    assert torch.equal(pipe.tokenize(x), a)
    g = torch.Generator().manual_seed(0)
    assert pipe.tokenize(x, generator=g).shape == (2, 32)


def test_pil_input_matches_tensor(pipe):
    arr = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    as_tensor = torch.from_numpy(arr).permute(2, 0, 1).float()[None] / 127.5 - 1
    pil_ids = pipe.tokenize(PIL.Image.fromarray(arr), sample_posterior=False)
    assert torch.equal(pil_ids, pipe.tokenize(as_tensor, sample_posterior=False))
    gray = PIL.Image.fromarray(arr[..., 0])  # grayscale becomes RGB
    assert pipe.tokenize(gray, sample_posterior=False).shape == (1, 32)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types(pipe, output_type):
    ids = torch.randint(0, 64000, (2, 4), generator=torch.Generator().manual_seed(9))
    out = pipe.detokenize(ids, num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
                          output_type=output_type, generator=torch.Generator().manual_seed(0))
    imgs = out.images
    if output_type == "pil":
        assert len(imgs) == 2 and imgs[0].size == (32, 32)
    elif output_type == "np":
        assert imgs.shape == (2, 32, 32, 3) and imgs.min() >= 0 and imgs.max() <= 1
    elif output_type == "pt":
        assert imgs.shape == (2, 3, 32, 32)
    else:
        assert imgs.shape == (2, 16, 4, 4)
    assert isinstance(pipe.detokenize(ids, num_inference_steps=1, guidance_scale=1.0, height=32, width=32,
                                      output_type=output_type, return_dict=False), tuple)


def test_generator_reproduces(pipe):
    ids = torch.randint(0, 64000, (2, 4), generator=torch.Generator().manual_seed(10))
    kw = dict(num_inference_steps=2, guidance_scale=1.0, height=32, width=32, output_type="latent")
    a = pipe.detokenize(ids, generator=torch.Generator().manual_seed(1), **kw).images
    b = pipe.detokenize(ids, generator=torch.Generator().manual_seed(1), **kw).images
    c = pipe.detokenize(ids, generator=torch.Generator().manual_seed(2), **kw).images
    assert torch.equal(a, b) and not torch.equal(a, c)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(5)]
    d = pipe.detokenize(ids, generator=gens, **kw).images
    e = pipe.detokenize(ids[1:], generator=[torch.Generator().manual_seed(5)], **kw).images
    torch.testing.assert_close(d[1:], e, atol=1e-5, rtol=0)


def test_reconstruct_call(pipe):
    out = pipe(image=images(1), num_tokens=4, num_inference_steps=2, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 3, 32, 32)


def test_save_load_round_trip_is_bit_exact(tmp_path):
    pipe = FlexTokPipeline.from_official(GOLDEN)
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = FlexTokPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    for name in ("flextok", "vae"):
        a, b = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    public = lambda c: {k: list(v) if isinstance(v, tuple) else v for k, v in c.items() if not k.startswith("_")}
    assert public(loaded.flextok.config) == public(pipe.flextok.config)
    assert loaded.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    ids = torch.randint(0, 64000, (2, 6), generator=torch.Generator().manual_seed(11))
    kw = dict(num_inference_steps=2, guidance_scale=3.0, height=64, width=64, output_type="pt")
    assert torch.equal(pipe.detokenize(ids, generator=torch.Generator().manual_seed(0), **kw).images,
                       loaded.detokenize(ids, generator=torch.Generator().manual_seed(0), **kw).images)
    assert not list((tmp_path / "saved").rglob("*.bin")) and list((tmp_path / "saved").rglob("*.safetensors"))
