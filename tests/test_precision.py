"""Reduced precision (issue 14): bfloat16 / float16 give the model the same way by every route, keep the declared
float32 modules, stay close to float32, and the speed-motivated changes (in-place sampling blocks, float32 residual
stream, chunked VAE, CPU decode chunks) change nothing else.

Bounds, stated once: on the golden checkpoint (random tiny weights, official release format) the bfloat16
pipeline's images stay within ``GOLDEN_BF16_MAX`` (max |difference| in [0, 1]) and ``GOLDEN_BF16_MEAN`` of the
official float32 images; on the two demo models (trained weights) bfloat16 vs float32 reconstructions are at least
``DEMO_BF16_PSNR`` dB apart at every k. They hold with AMX kernels and with ``ATEN_CPU_CAPABILITY=avx2`` (bf16
emulated in float32 arithmetic), where the roundings differ.
"""
import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flextok_kit.flextok_core import FlexTokModel, vae_decode, vae_encode
from flextok_kit.flextok_core.model import KEEP_IN_FP32
from flextok_kit.flextok_core.vae import vae_chunks
from flextok_kit.metrics import psnr
from flextok_kit.pipelines import FlexTokPipeline

from .conftest import GOLDEN, ROOT

GOLDEN_BF16_MAX, GOLDEN_BF16_MEAN = 5e-2, 4e-3  # measured: 3.1e-2 / 2.4e-3 (avx2 kernels), 2.4e-2 / 2.4e-3 (AMX)
DEMO_BF16_PSNR = 35.0
VECTORS = load_file(GOLDEN / "vectors.safetensors")
META = json.loads((GOLDEN / "vectors.json").read_text())


def tiny_model(**overrides) -> FlexTokModel:
    torch.manual_seed(0)
    cfg = dict(encoder_dim=64, encoder_depth=2, decoder_dim=64, decoder_depth=2, encoder_head_dim=32,
               decoder_head_dim=32, grid_size=(4, 4), num_registers=8, fsq_levels=(8, 5, 5, 5))
    model = FlexTokModel(**{**cfg, **overrides}).eval()
    with torch.no_grad():  # zero-initialised tables made distinct, as in a trained model
        for name in ("decoder.register_pos_embed", "decoder.mask_token", "decoder.null_cond", "encoder.registers"):
            model.get_parameter(name).normal_(std=0.5)
    return model


def kept_names(model) -> list[str]:
    return [n for n, _ in model.named_parameters() if any(m in n.split(".") for m in KEEP_IN_FP32)]


def images_01(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1)


# -- the same model by every route -------------------------------------------------------------------
def test_casts_keep_declared_modules_in_float32_with_their_values():
    ref = tiny_model()
    names = kept_names(ref)
    assert {n.split(".")[1] for n in names} >= {"time_embed", "blocks", "final_adaLN", "proj_out", "to_latents"}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.to(dtype=torch.float16),
                 lambda m: m.bfloat16()):
        model = cast(tiny_model())
        params = dict(model.named_parameters())
        for name, p in ref.named_parameters():
            if name in names:
                assert params[name].dtype == torch.float32 and torch.equal(params[name], p), name
            else:
                assert params[name].dtype in (torch.bfloat16, torch.float16), name
        assert model.dtype in (torch.bfloat16, torch.float16)  # ModelMixin.dtype skips the kept modules
    back = tiny_model().to(torch.bfloat16).float()
    assert all(p.dtype == torch.float32 for p in back.parameters())


def test_torch_dtype_and_to_give_the_same_pipeline(tmp_path):
    official = FlexTokPipeline.from_official(GOLDEN)
    official.save_pretrained(tmp_path / "ours")
    routes = {
        "from_pretrained(dtype)": FlexTokPipeline.from_pretrained(tmp_path / "ours", dtype=torch.bfloat16),
        "from_pretrained().to": FlexTokPipeline.from_pretrained(tmp_path / "ours").to(torch.bfloat16),
        "from_official(torch_dtype)": FlexTokPipeline.from_official(GOLDEN, torch_dtype=torch.bfloat16),
        "from_official(dtype)": FlexTokPipeline.from_official(GOLDEN, dtype=torch.bfloat16),
        "set_precision": FlexTokPipeline.from_official(GOLDEN).set_precision(torch.bfloat16),
    }
    first_name, first = next(iter(routes.items()))
    reference = {part: getattr(first, part).state_dict() for part in ("flextok", "vae")}
    noise = VECTORS["detok_noise"]
    ids = [VECTORS["token_ids"][0, :3], VECTORS["token_ids"][1, :7]]
    expected = first.detokenize(ids, num_inference_steps=3, guidance_scale=3.0, latents=noise, output_type="pt").images
    for name, pipe in routes.items():
        for part, state in reference.items():
            other = getattr(pipe, part).state_dict()
            for key, value in state.items():
                assert other[key].dtype == value.dtype and torch.equal(other[key], value), (name, part, key)
        images = pipe.detokenize(ids, num_inference_steps=3, guidance_scale=3.0, latents=noise, output_type="pt").images
        assert torch.equal(images, expected), f"{name} decodes differently from {first_name}"


def test_casting_does_not_warn_about_fp32_modules():
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("diffusers.models.modeling_utils")
    log.addHandler(handler)
    try:
        FlexTokPipeline.from_official(GOLDEN).to(torch.bfloat16)
        tiny_model().to(torch.float16)
    finally:
        log.removeHandler(handler)
    assert not [r for r in records if "kept in float32" in r.getMessage()]


def test_set_precision_float16_keeps_the_vae_in_float32_and_refuses_other_dtypes():
    pipe = FlexTokPipeline.from_official(GOLDEN).set_precision(torch.float16)
    assert pipe.flextok.dtype == torch.float16 and pipe.vae.dtype == torch.float32
    assert FlexTokPipeline.from_official(GOLDEN).set_precision(torch.bfloat16).vae.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        pipe.set_precision(torch.int8)


# -- close to float32 ----------------------------------------------------------------------------------
@pytest.mark.parametrize("run_name", ["k32_apg3", "mixed_apg3", "k32_g1"])
def test_bf16_golden_images_within_bound_of_the_official_float32(run_name):
    run = next(r for r in META["detok_runs"] if r["name"] == run_name)
    pipe = FlexTokPipeline.from_official(GOLDEN, dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    ids = [VECTORS["token_ids"][i, :k] for i, k in enumerate(run["keep_ks"])]
    images = pipe.detokenize(ids, num_inference_steps=META["schedule"]["timesteps"],
                             guidance_scale=run["guidance_scale"], use_apg=run["perform_norm_guidance"],
                             latents=VECTORS["detok_noise"], output_type="pt").images
    expected = images_01(VECTORS[f"detok_{run_name}_rgb"])
    diff = (images.float() - expected).abs()
    assert torch.isfinite(images).all()
    assert diff.max() <= GOLDEN_BF16_MAX and diff.mean() <= GOLDEN_BF16_MEAN, (float(diff.max()), float(diff.mean()))
    assert diff.max() > 0  # it really ran in bfloat16


@pytest.mark.parametrize("name,size", [("photo_tokenizer", 64), ("fashion_ar", 32)])
def test_bf16_demo_models_reconstruct_within_35_db_of_float32(name, size):
    fp32 = FlexTokPipeline.from_pretrained(ROOT / "demo_models" / name)
    bf16 = FlexTokPipeline.from_pretrained(ROOT / "demo_models" / name, dtype=torch.bfloat16)
    for pipe in (fp32, bf16):
        pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, size, size, generator=g) * 2 - 1
    ids = fp32.tokenize(images, generator=torch.Generator().manual_seed(1))  # the same tokens for both
    noise = torch.randn(4, fp32.flextok.config.latent_channels, size // 8, size // 8, generator=g)
    for k in (1, 2, 4, 8, 16):
        kw = dict(num_inference_steps=25, guidance_scale=3.0, latents=noise, output_type="pt")
        a = fp32.detokenize(ids[:, :k], **kw).images
        b = bf16.detokenize(ids[:, :k], **kw).images.float()
        score = psnr(b * 2 - 1, a * 2 - 1)
        assert (score >= DEMO_BF16_PSNR).all(), (k, score.tolist())


# -- the speed changes change nothing else ---------------------------------------------------------------
@pytest.mark.parametrize("per_sample_t", [False, True])
def test_in_place_sampling_blocks_equal_the_autograd_blocks(per_sample_t):
    model = tiny_model()
    with torch.no_grad():
        for block in model.decoder.blocks:
            block.adaLN.weight.normal_(std=0.2)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 16, 8, 8, generator=g)
    ids = torch.randint(0, model.vocab_size, (3, 8), generator=g)
    t = torch.rand(3, generator=g) if per_sample_t else torch.full((3,), 0.4)
    for fast in (False, True):
        regs = model.prepare_registers(ids, [2, 8, 5], guidance=True, fast=fast)
        with torch.no_grad():
            sampled = model(x, t, regs)
        with torch.enable_grad():
            trained = model(x, t, regs)
        torch.testing.assert_close(sampled, trained.detach(), rtol=1e-5, atol=1e-5)


def test_bf16_residual_stream_stays_float32():
    model = tiny_model().to(torch.bfloat16)
    seen = []
    model.decoder.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    regs = model.prepare_registers(torch.zeros(1, 8, dtype=torch.long), [3], guidance=True)
    with torch.no_grad():
        v = model(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), regs)
    assert seen == [torch.float32] and v.dtype == torch.float32  # proj_out is kept in float32


def test_vae_chunks_do_not_change_latents_or_images():
    pipe = FlexTokPipeline.from_official(GOLDEN)
    images = VECTORS["images"]
    with torch.no_grad():
        whole = vae_encode(pipe.vae, images, True, torch.Generator().manual_seed(5), batch_size=len(images))
        single = vae_encode(pipe.vae, images, True, torch.Generator().manual_seed(5), batch_size=1)
        torch.testing.assert_close(single, whole, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vae_decode(pipe.vae, whole, batch_size=1),
                                   vae_decode(pipe.vae, whole, batch_size=len(images)), rtol=1e-5, atol=1e-5)
    assert vae_chunks(3, torch.device("cpu")) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert vae_chunks(3, torch.device("meta")) == [slice(0, 3)]
    assert vae_chunks(5, torch.device("cpu"), 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_bf16_vae_goes_channels_last_and_float32_stays_as_it_is():
    pipe = FlexTokPipeline.from_official(GOLDEN)
    images = VECTORS["images"][:1]
    with torch.no_grad():
        vae_encode(pipe.vae, images, False)
        assert pipe.vae.decoder.conv_in.weight.is_contiguous()
        pipe.set_precision(torch.bfloat16)
        vae_encode(pipe.vae, images, False)
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_cpu_decode_batches_are_bounded_and_do_not_change_results():
    from flextok_kit.pipelines.pipeline_flextok import CPU_DECODER_TOKENS

    pipe = FlexTokPipeline.from_official(GOLDEN)
    pipe.set_progress_bar_config(disable=True)
    gh, gw = pipe.flextok.config.grid_size
    per_image = 2 * (gh * gw + pipe.num_registers)
    assert pipe._default_decode_batch(10_000, True, "cpu") == CPU_DECODER_TOKENS // per_image
    assert pipe._default_decode_batch(3, True, "cpu") == 3
    assert pipe._default_decode_batch(10_000, True, "meta") == 10_000
    ids = VECTORS["token_ids"][:, :4].repeat(3, 1)
    noise = torch.randn(len(ids), 16, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=3, guidance_scale=3.0, latents=noise, output_type="latent")
    torch.testing.assert_close(pipe.detokenize(ids, **kw).images,
                               pipe.detokenize(ids, decode_batch_size=1, **kw).images, rtol=1e-5, atol=1e-5)


def test_decode_speed_benchmark_runs_in_bfloat16():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode_speed.py"), "--quick", "--dtype",
                           "bfloat16", "--ks", "16", "--tok-ks", "16"], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "bfloat16 fast path vs float32" in out and "matmul 2048x2048" in out and "flags:" in out
    assert "tokenize k=16: bfloat16 vs float32" in out


@pytest.mark.parametrize("name,vae_dtype", [("bfloat16", torch.bfloat16), ("float16", torch.float32)])
def test_cli_dtype_goes_through_set_precision(name, vae_dtype):
    import argparse

    from flextok_kit.cli import load_pipeline

    pipe = load_pipeline(argparse.Namespace(model=str(GOLDEN), device="cpu", dtype=name))
    assert pipe.flextok.dtype == getattr(torch, name) and pipe.vae.dtype == vae_dtype
    assert pipe.flextok.decoder.proj_out.weight.dtype == torch.float32
