"""FlexTokPipeline follows diffusers conventions: offload hooks, callbacks, generators, guidance, chunking, loading."""
import logging

import pytest
import torch
from diffusers import DiffusionPipeline

from flextok_kit.pipelines import FlexTokPipeline
from flextok_kit.pipelines import pipeline_flextok

from .conftest import GOLDEN
from .test_pipeline import images, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=1)


def ids_for(b=2, k=4, seed=0):
    return torch.randint(0, 64000, (b, k), generator=torch.Generator().manual_seed(seed))


def noise_for(b, seed=0, size=4):
    return torch.randn(b, 16, size, size, generator=torch.Generator().manual_seed(seed))


class BatchSpy:
    """Records the batch size of every decoder forward."""

    def __init__(self, module):
        self.sizes = []
        self.handle = module.register_forward_hook(lambda m, args, out: self.sizes.append(out.shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_callback_gets_listed_tensors_every_step(pipe):
    seen = []

    def callback(p, step, timestep, tensors):
        assert p is pipe
        seen.append((step, float(timestep), sorted(tensors)))
        assert tensors["latents"].shape == (2, 16, 4, 4)
        v_c, v_u = tensors["velocity_cond"], tensors["velocity_uncond"]
        torch.testing.assert_close(tensors["velocity"], v_u + 3.0 * (v_c - v_u))  # plain CFG
        return {}

    pipe.detokenize(ids_for(), num_inference_steps=3, guidance_scale=3.0, use_apg=False, latents=noise_for(2),
                    output_type="latent", callback_on_step_end=callback,
                    callback_on_step_end_tensor_inputs=["latents", "velocity", "velocity_cond", "velocity_uncond"])
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == pytest.approx([1000.0, 2000 / 3, 1000 / 3], rel=1e-6)
    assert all(names == ["latents", "velocity", "velocity_cond", "velocity_uncond"] for _, _, names in seen)


def test_callback_can_replace_latents(pipe):
    kw = dict(num_inference_steps=2, guidance_scale=1.0, latents=noise_for(2), output_type="latent")
    plain = pipe.detokenize(ids_for(), **kw).images
    zeroed = pipe.detokenize(ids_for(), callback_on_step_end=lambda p, i, t, d: {"latents": d["latents"] * 0}, **kw)
    assert torch.equal(zeroed.images, torch.zeros_like(plain))
    with pytest.raises(ValueError, match="callback tensor inputs"):
        pipe.detokenize(ids_for(), callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["bogus"],
                        **kw)


def test_guidance_scale_one_skips_the_unconditional_pass(pipe):
    with BatchSpy(pipe.flextok) as spy:
        pipe.detokenize(ids_for(3), num_inference_steps=2, guidance_scale=1.0, latents=noise_for(3),
                        output_type="latent")
    assert spy.sizes == [3, 3]
    with BatchSpy(pipe.flextok) as spy:
        pipe.detokenize(ids_for(3), num_inference_steps=2, guidance_scale=2.0, latents=noise_for(3),
                        output_type="latent")
    assert spy.sizes == [6, 6]  # cond + uncond in one batched forward


def test_guidance_schedule(pipe):
    kw = dict(num_inference_steps=4, latents=noise_for(2), output_type="latent", use_apg=False)
    constant = pipe.detokenize(ids_for(), guidance_scale=3.0, **kw).images
    same = pipe.detokenize(ids_for(), guidance_scale=99.0, guidance_schedule=lambda t: 3.0, **kw).images
    torch.testing.assert_close(same, constant, atol=1e-6, rtol=0)
    ts = []
    with BatchSpy(pipe.flextok) as spy:
        ramp = pipe.detokenize(ids_for(), guidance_schedule=lambda t: ts.append(t) or (1.0 if t > 0.6 else 3.0),
                               **kw).images
    assert ts == pytest.approx([1.0, 0.75, 0.5, 0.25])
    assert spy.sizes == [2, 2, 4, 4]  # scale-1 steps skip the unconditional pass
    assert not torch.allclose(ramp, constant)


def test_apg_parameters_are_used(pipe):
    kw = dict(num_inference_steps=3, guidance_scale=4.0, latents=noise_for(2), output_type="latent")
    base = pipe.detokenize(ids_for(), **kw).images
    for change in (dict(apg_momentum=0.3), dict(apg_norm_threshold=0.01), dict(apg_eta=1.0)):
        assert not torch.allclose(pipe.detokenize(ids_for(), **kw, **change).images, base), change
    cfg = pipe.detokenize(ids_for(), use_apg=False, **kw).images
    assert not torch.allclose(cfg, base)


def test_decode_batch_size_bounds_the_batch_and_keeps_results(pipe):
    tokens = [ids_for(5, 32)[i, :k] for i, k in enumerate([1, 3, 9, 20, 32])]
    kw = dict(num_inference_steps=2, guidance_scale=3.0, latents=noise_for(5), output_type="pt")
    full = pipe.detokenize(tokens, **kw).images
    with BatchSpy(pipe.flextok) as spy:
        chunked = pipe.detokenize(tokens, decode_batch_size=2, **kw).images
    assert max(spy.sizes) <= 4  # 2 images, cond + uncond
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)


def test_num_images_per_prompt(pipe):
    ids = ids_for(2)
    out = pipe.detokenize(ids, num_images_per_prompt=3, num_inference_steps=1, guidance_scale=1.0, height=32,
                          width=32, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (6, 16, 4, 4)
    assert not torch.equal(out[0], out[1])  # different noise per image
    with pytest.raises(ValueError, match="num_images_per_prompt"):
        pipe.detokenize(ids, num_images_per_prompt=0)


def test_reconstruct_series_of_token_counts(pipe):
    x = images(2)
    g = torch.Generator().manual_seed(3)
    series = pipe(image=x, num_tokens=[1, 4, 32], num_inference_steps=2, guidance_scale=1.0, output_type="latent",
                  generator=g, sample_posterior=False).images
    assert series.shape == (6, 16, 4, 4)
    ids = pipe.tokenize(x, sample_posterior=False)
    g = torch.Generator().manual_seed(3)
    noise = pipe.prepare_latents(2, 32, 32, torch.float32, torch.device("cpu"), g)
    for i in range(2):
        for j, k in enumerate([1, 4, 32]):
            single = pipe.detokenize([ids[i, :k]], latents=noise[i : i + 1], num_inference_steps=2,
                                     guidance_scale=1.0, output_type="latent").images
            torch.testing.assert_close(series[i * 3 + j], single[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="num_tokens"):
        pipe(image=x, num_tokens=[0, 4])


def test_model_cpu_offload_hooks(pipe):
    reference = pipe.detokenize(ids_for(), num_inference_steps=2, latents=noise_for(2), output_type="pt").images
    offloaded = tiny_pipeline(seed=1)
    offloaded.set_progress_bar_config(disable=True)
    offloaded.enable_model_cpu_offload(device="cpu")
    assert type(getattr(offloaded.flextok, "_hf_hook", None)).__name__ == "CpuOffload"
    freed = []
    original = offloaded.maybe_free_model_hooks
    offloaded.maybe_free_model_hooks = lambda: freed.append(1) or original()
    out = offloaded.detokenize(ids_for(), num_inference_steps=2, latents=noise_for(2), output_type="pt").images
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=0)
    assert freed == [1]
    offloaded.tokenize(images(1))
    assert freed == [1, 1]


def test_dtype_handling():
    pipe = tiny_pipeline(seed=2)
    ref = pipe.detokenize(ids_for(), num_inference_steps=2, latents=noise_for(2), output_type="pt").images
    pipe.to(torch.bfloat16)
    assert pipe.flextok.dtype == torch.bfloat16 and pipe.dtype == torch.bfloat16
    out = pipe.detokenize(ids_for(), num_inference_steps=2, latents=noise_for(2), output_type="pt").images
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert (out - ref).abs().mean() < 0.05  # bf16 changes numbers at the 1e-2 level, not the picture
    assert pipe.tokenize(images(1)).dtype == torch.long


def test_vae_slicing_and_tiling_toggles(pipe):
    pipe.enable_vae_slicing()
    assert pipe.vae.use_slicing
    sliced = pipe.detokenize(ids_for(), num_inference_steps=1, latents=noise_for(2), output_type="pt").images
    pipe.disable_vae_slicing()
    assert not pipe.vae.use_slicing
    plain = pipe.detokenize(ids_for(), num_inference_steps=1, latents=noise_for(2), output_type="pt").images
    torch.testing.assert_close(sliced, plain, atol=1e-5, rtol=0)
    pipe.enable_vae_tiling()
    assert pipe.vae.use_tiling
    pipe.disable_vae_tiling()


def test_progress_bar(pipe, capsys):
    pipe.set_progress_bar_config(disable=False)
    try:
        pipe.detokenize(ids_for(), num_inference_steps=3, guidance_scale=1.0, height=32, width=32,
                        output_type="latent")
    finally:
        pipe.set_progress_bar_config(disable=True)
    assert "3/3" in capsys.readouterr().err


def test_generic_diffusers_loading_route(tmp_path):
    pipe = FlexTokPipeline.from_official(GOLDEN)
    pipe.save_pretrained(tmp_path / "model")
    assert (tmp_path / "model" / "pipeline.py").is_file()
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "model"), custom_pipeline=str(tmp_path / "model"),
                                               trust_remote_code=True)
    assert type(loaded).__name__ == "FlexTokPipeline"
    a, b = pipe.flextok.state_dict(), loaded.flextok.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # saving again over an existing folder replaces it atomically
    pipe.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_license_notice_printed_once(caplog, monkeypatch):
    monkeypatch.setattr(pipeline_flextok, "_license_shown", False)
    with caplog.at_level(logging.WARNING, logger=pipeline_flextok.__name__):
        FlexTokPipeline.from_official(GOLDEN)
        FlexTokPipeline.from_official(GOLDEN)
    notices = [r for r in caplog.records if "Apple Machine Learning Research Model License" in r.getMessage()]
    assert len(notices) == 1


def test_optional_ar_slots_round_trip(tmp_path, pipe):
    assert pipe.ar_model is None and pipe.text_encoder is None and pipe.tokenizer is None
    pipe.save_pretrained(tmp_path / "p")
    loaded = FlexTokPipeline.from_pretrained(tmp_path / "p")
    assert loaded.ar_model is None
    import json

    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    assert index["flextok"] == ["flextok_kit.flextok_core.model", "FlexTokModel"]
    assert index["scheduler"][1] == "FlexTokFlowScheduler"


def test_call_lists_the_decoder_arguments_with_detokenizes_defaults():
    import inspect

    call = inspect.signature(FlexTokPipeline.__call__).parameters
    detok = inspect.signature(FlexTokPipeline.detokenize).parameters
    for name in ("num_inference_steps", "guidance_scale", "latents", "callback_on_step_end",
                 "callback_on_step_end_tensor_inputs"):
        assert name in call and call[name].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD, name
        assert call[name].default == detok[name].default, name


def test_call_passes_the_listed_arguments_to_the_decoder(pipe):
    seen = []
    x = images(1)
    out = pipe(image=x, num_tokens=4, num_inference_steps=3, guidance_scale=2.0, latents=noise_for(1),
               callback_on_step_end=lambda p, i, t, d: seen.append((i, p.guidance_scale, p.num_timesteps)) or {},
               output_type="latent", sample_posterior=False).images
    assert seen == [(0, 2.0, 3), (1, 2.0, 3), (2, 2.0, 3)]
    direct = pipe.detokenize(pipe.tokenize(x, num_tokens=4, sample_posterior=False), num_inference_steps=3,
                             guidance_scale=2.0, latents=noise_for(1), output_type="latent").images
    torch.testing.assert_close(out, direct, atol=0, rtol=0)


def test_callback_reads_and_turns_off_guidance(pipe):
    """diffusers' dynamic-CFG recipe: a callback sets ``pipe._guidance_scale`` for the remaining steps."""
    seen = []

    def guidance_off_after_half(p, i, t, tensors):
        seen.append((i, p.guidance_scale, p.do_classifier_free_guidance, p.num_timesteps))
        if i == p.num_timesteps // 2 - 1:
            p._guidance_scale = 1.0
        return {}

    kw = dict(num_inference_steps=4, latents=noise_for(2), output_type="latent", use_apg=False)
    with BatchSpy(pipe.flextok) as spy:
        out = pipe.detokenize(ids_for(), guidance_scale=3.0, callback_on_step_end=guidance_off_after_half, **kw).images
    assert seen == [(0, 3.0, True, 4), (1, 3.0, True, 4), (2, 1.0, False, 4), (3, 1.0, False, 4)]
    assert spy.sizes == [4, 4, 2, 2]  # the unconditional pass stops with the guidance
    scheduled = pipe.detokenize(ids_for(), guidance_schedule=lambda t: 3.0 if t > 0.6 else 1.0, **kw).images
    torch.testing.assert_close(out, scheduled, atol=0, rtol=0)
    # and on: an unguided run gets its unconditional pass when a callback asks for guidance
    on = pipe.detokenize(ids_for(), guidance_scale=1.0, callback_on_step_end=lambda p, i, t, d: setattr(
        p, "_guidance_scale", 3.0) or {}, **kw).images
    ramp = pipe.detokenize(ids_for(), guidance_schedule=lambda t: 1.0 if t == 1.0 else 3.0, **kw).images
    torch.testing.assert_close(on, ramp, atol=0, rtol=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe.detokenize(ids_for(), callback_on_step_end=lambda p, i, t, d: setattr(p, "_guidance_scale", -2) or {},
                        **kw)


def test_pipeline_without_vae(pipe, tmp_path):
    from flextok_kit.flextok_core import vae_encode

    x = images(2)
    latents = vae_encode(pipe.vae, x, sample_posterior=False)
    assert torch.equal(pipe.tokenize(latents), pipe.tokenize(x, sample_posterior=False))  # latents in: VAE skipped
    bare = FlexTokPipeline(vae=None, flextok=pipe.flextok, scheduler=pipe.scheduler)
    assert bare.vae is None and bare.vae_scale_factor == pipe.vae_scale_factor == 8
    ids = bare.tokenize(latents)
    assert torch.equal(ids, pipe.tokenize(latents))
    kw = dict(num_inference_steps=2, latents=noise_for(2), output_type="latent")
    torch.testing.assert_close(bare.detokenize(ids[:, :4], **kw).images, pipe.detokenize(ids[:, :4], **kw).images,
                               atol=0, rtol=0)
    assert bare(image=latents, num_tokens=[1, 4], num_inference_steps=1, output_type="latent").images.shape == \
        (4, 16, 4, 4)
    for call in (lambda: bare.detokenize(ids, num_inference_steps=1, output_type="pil"),
                 lambda: bare.tokenize(x), lambda: bare(image=latents, output_type="pt"), bare.enable_vae_slicing):
        with pytest.raises(ValueError, match="no VAE"):
            call()
    bare.save_pretrained(tmp_path / "bare")
    loaded = FlexTokPipeline.from_pretrained(tmp_path / "bare")
    assert loaded.vae is None and torch.equal(loaded.tokenize(latents), ids)
    pipe.save_pretrained(tmp_path / "full")
    assert FlexTokPipeline.from_pretrained(tmp_path / "full", vae=None).vae is None  # drop it at load time
