"""The official-format reader honours every variant the golden README lists as uncertain (sections 2-3, 9).

Each test writes a tiny random model in the official release format (``tests/official_format.py``), loads it
with ``load_official`` / ``FlexTokPipeline.from_official`` and checks behaviour that only holds if the variant is
read correctly: outputs equal those of the original model built with that setting, and differ from the outputs
of the other setting.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from flextok_kit.flextok_core import FlexTokModel, RegisterSequences, load_official
from flextok_kit.flextok_core.vae import vae_decode, vae_encode
from flextok_kit.pipelines import FlexTokPipeline

from .official_format import (
    GOLDEN_DIR, ZERO_NULL_COND, config_to_metadata, decoder_inputs, golden_config,
    official_config, official_state_dict, random_images, random_model, random_vae, vae_state_dict, velocities,
    write_official,
)



@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in this module's tests (scoped: a module-level switch would leak into other modules)."""
    with torch.no_grad():
        yield

EXACT = dict(rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def vae():
    return random_vae(100)


def _state_equal(a: torch.nn.Module, b: torch.nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def _differs(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-3):
    assert (a - b).abs().max().item() > min_diff


def assert_same_outputs(original: FlexTokModel, loaded: FlexTokModel):
    """Encoder (values and ids) and decoder velocities (cond + uncond, fast and plain) agree."""
    latents = torch.randn(2, original.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(11))
    (q0, ids0), (q1, ids1) = original.encode(latents), loaded.encode(latents)
    torch.testing.assert_close(q1, q0, **EXACT)
    assert torch.equal(ids1, ids0)
    z0, z1 = original.encoder(latents), loaded.encoder(latents)
    torch.testing.assert_close(z1, z0, **EXACT)
    x_t, t, ids, keep_k = decoder_inputs(original)
    for fast in (True, False):
        for v0, v1 in zip(velocities(original, x_t, t, ids, keep_k, fast), velocities(loaded, x_t, t, ids, keep_k, fast)):
            torch.testing.assert_close(v1, v0, **EXACT)


# ---------------------------------------------------------------------------------------------------
# the helper itself writes the release format
# ---------------------------------------------------------------------------------------------------
def test_writer_reproduces_golden_release():
    """Loading the golden (official) checkpoint and writing it back with our helper gives the golden files:
    same config.json (content and order), same metadata strings, bit-identical tensors under the same keys."""
    ckpt = load_official(GOLDEN_DIR)
    config = official_config(ckpt.model, hf_hub_path="vae", scaling_factor=None)
    golden = golden_config()
    assert json.dumps(config) == json.dumps(golden)  # order included
    with safe_open(str(GOLDEN_DIR / "model.safetensors"), "pt") as f:
        assert config_to_metadata(config) == f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    ours = official_state_dict(ckpt.model)
    ours.update(vae_state_dict(ckpt.vae))
    assert ours.keys() == tensors.keys()
    for k in tensors:
        assert torch.equal(ours[k], tensors[k]), k


# ---------------------------------------------------------------------------------------------------
# round trip, null condition
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("vae_in_model", [True, False], ids=["vae_inside", "vae_folder"])
def test_round_trip_learned_null_cond(tmp_path, vae, vae_in_model):
    model = random_model(0)
    write_official(tmp_path, model, vae, vae_in_model=vae_in_model)
    ckpt = load_official(tmp_path)
    assert ckpt.model.config.null_condition == "learned"
    for key in ("num_registers", "encoder_dim", "decoder_dim", "encoder_depth", "decoder_depth",
                "encoder_head_dim", "decoder_head_dim", "max_timestep", "grid_size"):
        assert ckpt.model.config[key] == model.config[key], key
    _state_equal(model, ckpt.model)
    _state_equal(vae, ckpt.vae)
    assert_same_outputs(model, ckpt.model)
    # the unconditional pass uses the stored nullcond vector on every register
    x_t, t, ids, keep_k = decoder_inputs(model)
    _, v_uncond = velocities(ckpt.model, x_t, t, ids, keep_k)
    n, d = model.config.num_registers, model.config.decoder_dim
    null = model.decoder.null_cond.detach().expand(2, n, d)
    manual = model(x_t, t, RegisterSequences([null], [None]))
    torch.testing.assert_close(v_uncond, manual, rtol=0, atol=1e-5)


def test_zero_null_cond(tmp_path, vae):
    model = random_model(0, null_condition="zero")
    write_official(tmp_path, model, vae)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if "nullcond" in k]
    assert json.loads((tmp_path / "config.json").read_text())["decoder"]["module_dict"]["dec_latent_dropout"][
        "_target_"] == ZERO_NULL_COND
    ckpt = load_official(tmp_path)
    assert ckpt.model.config.null_condition == "zero"
    assert_same_outputs(model, ckpt.model)

    x_t, t, ids, keep_k = decoder_inputs(model)
    v_cond, v_uncond = velocities(ckpt.model, x_t, t, ids, keep_k)
    # unconditional = every register token zero
    n, d = model.config.num_registers, model.config.decoder_dim
    manual = ckpt.model(x_t, t, RegisterSequences([torch.zeros(2, n, d)], [None]))
    torch.testing.assert_close(v_uncond, manual, rtol=0, atol=1e-5)
    # ... and not what a learned null vector (same other weights) would give
    learned = random_model(0, null_condition="learned")
    learned.load_state_dict(model.state_dict(), strict=False)
    _, v_uncond_learned = velocities(learned, x_t, t, ids, keep_k)
    _differs(v_uncond, v_uncond_learned)
    torch.testing.assert_close(velocities(learned, x_t, t, ids, keep_k)[0], v_cond, **EXACT)


# ---------------------------------------------------------------------------------------------------
# values invisible in the state dict: max_timestep, head_dim
# ---------------------------------------------------------------------------------------------------
def test_max_timestep_is_read_from_config(tmp_path, vae):
    loaded = {}
    for mt in (1.0, 1000.0):
        model = random_model(0, max_timestep=mt)
        write_official(tmp_path / str(mt), model, vae)
        ckpt = load_official(tmp_path / str(mt))
        assert ckpt.model.config.max_timestep == mt
        assert_same_outputs(model, ckpt.model)
        loaded[mt] = ckpt.model
    # identical weights, different max_timestep -> different velocities
    _state_equal(loaded[1.0], loaded[1000.0])
    x_t, t, ids, keep_k = decoder_inputs(loaded[1.0])
    _differs(velocities(loaded[1.0], x_t, t, ids, keep_k)[0], velocities(loaded[1000.0], x_t, t, ids, keep_k)[0])


def test_head_dim_is_read_from_config(tmp_path, vae):
    # encoder 4 heads of 16, decoder 2 heads of 32: invisible in the weight shapes
    model = random_model(0, encoder_head_dim=16, decoder_head_dim=32)
    write_official(tmp_path / "right", model, vae)
    ckpt = load_official(tmp_path / "right")
    assert (ckpt.model.config.encoder_head_dim, ckpt.model.config.decoder_head_dim) == (16, 32)
    assert_same_outputs(model, ckpt.model)

    # the same weights with the head_dim entries left out -> official default 64 (one head): loads, but differs
    write_official(tmp_path / "default", model, vae, write_head_dim=False)
    spec = json.loads((tmp_path / "default" / "config.json").read_text())["encoder"]["module_dict"]["enc_transformer"]
    assert "head_dim" not in spec
    wrong = load_official(tmp_path / "default").model
    assert (wrong.config.encoder_head_dim, wrong.config.decoder_head_dim) == (64, 64)
    _state_equal(model, wrong)
    latents = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    _differs(wrong.encoder(latents), model.encoder(latents))
    x_t, t, ids, keep_k = decoder_inputs(model)
    _differs(velocities(wrong, x_t, t, ids, keep_k)[0], velocities(model, x_t, t, ids, keep_k)[0])


@pytest.mark.parametrize("n", [12, 5])
def test_register_count(tmp_path, vae, n):
    model = random_model(0, num_registers=n)
    write_official(tmp_path, model, vae)
    pipe = FlexTokPipeline.from_official(tmp_path, sample_posterior=False)
    assert pipe.num_registers == n and pipe.flextok.vocab_size == 64000
    assert_same_outputs(model, pipe.flextok)
    images = random_images()
    ids = pipe.tokenize(images)
    assert ids.shape == (2, n) and ids.dtype == torch.long
    expected = model.encode(vae_encode(vae, images, False))[1]
    assert torch.equal(ids, expected)
    assert torch.equal(pipe.tokenize(images, num_tokens=3), ids[:, :3])
    out = pipe.detokenize(ids, num_inference_steps=1, guidance_scale=1.0, output_type="latent", height=32,
                          width=32, generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 16, 4, 4)
    with pytest.raises(ValueError, match=f"1..{n}"):
        pipe.detokenize(torch.zeros(1, n + 1, dtype=torch.long), num_inference_steps=1)


# ---------------------------------------------------------------------------------------------------
# VAE settings: sample_posterior, scaling_factor, where the weights are
# ---------------------------------------------------------------------------------------------------
def _mean_latents(vae, images, scaling):
    # image by image, as vae_encode runs the VAE on the CPU (vae.vae_chunks): a batched convolution's last bits differ
    return torch.cat([vae.encode(image[None]).latent_dist.mean for image in images]) * scaling


def test_sample_posterior_false_is_deterministic(tmp_path, vae):
    model = random_model(0, sample_posterior=False)
    write_official(tmp_path, model, vae)
    assert json.loads((tmp_path / "config.json").read_text())["vae"]["sample_posterior"] is False
    pipe = FlexTokPipeline.from_official(tmp_path)
    assert pipe.flextok.config.sample_posterior is False
    images = random_images()
    torch.manual_seed(0)
    a = pipe.tokenize(images)
    torch.manual_seed(1)
    b = pipe.tokenize(images)
    assert torch.equal(a, b)
    assert torch.equal(a, model.encode(_mean_latents(vae, images, 0.75))[1])


def test_sample_posterior_true_depends_on_seed(tmp_path, vae):
    model = random_model(0, sample_posterior=True)
    write_official(tmp_path, model, vae)
    pipe = FlexTokPipeline.from_official(tmp_path)
    assert pipe.flextok.config.sample_posterior is True
    images = random_images()
    runs = {}
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.setdefault(seed, []).append(pipe.tokenize(images))
    assert torch.equal(runs[0][0], runs[0][1])  # same global seed -> same tokens
    assert not torch.equal(runs[0][0], runs[1][0])  # another seed -> other tokens
    # the release's semantics: (mean + std * eps) * scaling_factor, eps one global-RNG draw for the batch
    posterior = vae.encode(images).latent_dist
    torch.manual_seed(0)
    eps = torch.randn(posterior.mean.shape)
    expected = model.encode((posterior.mean + posterior.std * eps) * 0.75)[1]
    assert torch.equal(runs[0][0], expected)
    # the override of load_official / from_official wins over the config
    det = FlexTokPipeline.from_official(tmp_path, sample_posterior=False)
    assert det.flextok.config.sample_posterior is False
    torch.manual_seed(0)
    a = det.tokenize(images)
    torch.manual_seed(1)
    assert torch.equal(a, det.tokenize(images))
    assert load_official(tmp_path, sample_posterior=False).sample_posterior is False


@pytest.mark.parametrize("vae_in_model", [True, False], ids=["vae_inside", "vae_folder"])
def test_scaling_factor_override_vs_vae_config(tmp_path, vae, vae_in_model):
    model = random_model(0, sample_posterior=False)
    images = random_images()
    pipes = {}
    for name, override in (("from_vae", None), ("override", 0.5)):
        write_official(tmp_path / name, model, vae, vae_in_model=vae_in_model, scaling_factor=override)
        ckpt = load_official(tmp_path / name)
        expected = 0.75 if override is None else 0.5
        assert ckpt.scaling_factor == expected
        pipe = FlexTokPipeline.from_official(tmp_path / name)
        assert pipe.vae.config.scaling_factor == expected
        # latents are scaled by the effective factor, and tokens come from those latents
        torch.testing.assert_close(vae_encode(pipe.vae, images, False), _mean_latents(vae, images, expected), **EXACT)
        assert torch.equal(pipe.tokenize(images), model.encode(_mean_latents(vae, images, expected))[1])
        # decoding divides by the same factor
        z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(vae_decode(pipe.vae, z), vae.decode(z / expected).sample, rtol=0, atol=1e-5)
        pipes[name] = pipe
    assert vae.config.scaling_factor == 0.75  # the source VAE was not modified
    ratio = vae_encode(pipes["override"].vae, images, False) / vae_encode(pipes["from_vae"].vae, images, False)
    torch.testing.assert_close(ratio, torch.full_like(ratio, 0.5 / 0.75))


def test_vae_weights_inside_model_safetensors(tmp_path, vae, monkeypatch):
    """vae.vae.* in model.safetensors are the weights; the hf_hub_path folder only supplies the config."""
    other = random_vae(200)  # same architecture, other weights, in the folder
    model = random_model(0)
    write_official(tmp_path / "ckpt", model, vae, vae_in_model=True, folder_vae=other)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative hf_hub_path is resolved against the checkpoint, not the cwd
    pipe = FlexTokPipeline.from_official(tmp_path / "ckpt")
    _state_equal(vae, pipe.vae)
    images = random_images()
    torch.testing.assert_close(pipe.vae.encode(images).latent_dist.mean, vae.encode(images).latent_dist.mean, **EXACT)


@pytest.mark.parametrize("hub_path", ["vae", "weights/vae_c16"])
def test_vae_only_in_separate_folder(tmp_path, vae, monkeypatch, hub_path):
    model = random_model(0)
    write_official(tmp_path / "ckpt", model, vae, vae_in_model=False, vae_dir=hub_path)
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("vae.")]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pipe = FlexTokPipeline.from_official(tmp_path / "ckpt")
    _state_equal(vae, pipe.vae)
    assert pipe.vae.config.scaling_factor == 0.75
    _state_equal(model, pipe.flextok)


@pytest.mark.parametrize("vae_in_model", [False, True], ids=["vae_folder", "vae_inside"])
def test_relative_hf_hub_path_prefers_checkpoint_folder_over_cwd(tmp_path, vae, monkeypatch, vae_in_model):
    model = random_model(0)
    write_official(tmp_path / "ckpt", model, vae, vae_in_model=vae_in_model)
    decoy_dir = tmp_path / "cwd"
    # a decoy VAE with another architecture/scaling in ./vae of the working directory
    random_vae(300, scaling_factor=0.1).save_pretrained(str(decoy_dir / "vae"))
    monkeypatch.chdir(decoy_dir)
    pipe = FlexTokPipeline.from_official(tmp_path / "ckpt")
    assert pipe.vae.config.scaling_factor == 0.75
    _state_equal(vae, pipe.vae)


# ---------------------------------------------------------------------------------------------------
# config only in the metadata; vae= override; REPA keys
# ---------------------------------------------------------------------------------------------------
def test_config_only_in_safetensors_metadata(tmp_path, vae):
    """Every non-default setting must come from the metadata (there is no config.json)."""
    model = random_model(0, null_condition="zero", max_timestep=1.0, encoder_head_dim=16, decoder_head_dim=32,
                         num_registers=5, sample_posterior=False, grid_size=(8, 8))
    write_official(tmp_path, model, vae, config_location="metadata", scaling_factor=0.5)
    assert not (tmp_path / "config.json").exists()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["_target_"] == "flextok.flextok_wrapper.FlexTok" and "'scaling_factor': 0.5" in md["vae"]
    ckpt = load_official(tmp_path)
    assert "metadata" in ckpt.source
    c = ckpt.model.config
    assert (c.null_condition, c.max_timestep, c.encoder_head_dim, c.decoder_head_dim, c.num_registers,
            tuple(c.grid_size), c.sample_posterior) == ("zero", 1.0, 16, 32, 5, (8, 8), False)
    assert ckpt.scaling_factor == 0.5 and ckpt.vae.config.scaling_factor == 0.5
    assert_same_outputs(model, ckpt.model)


def test_metadata_and_json_agree(tmp_path, vae):
    model = random_model(0, max_timestep=1.0, num_registers=5)
    write_official(tmp_path / "json", model, vae, config_location="json")
    write_official(tmp_path / "md", model, vae, config_location="metadata")
    with safe_open(str(tmp_path / "json" / "model.safetensors"), "pt") as f:
        assert not f.metadata()
    a, b = load_official(tmp_path / "json"), load_official(tmp_path / "md")
    assert dict(a.model.config) == dict(b.model.config)
    assert_same_outputs(a.model, b.model)


def test_vae_override_instance(tmp_path, vae):
    model = random_model(0, sample_posterior=False)
    write_official(tmp_path, model, vae, vae_in_model=False)
    mine = random_vae(400, scaling_factor=0.25)
    pipe = FlexTokPipeline.from_official(tmp_path, vae=mine)
    assert pipe.vae is mine and pipe.vae.config.scaling_factor == 0.25
    images = random_images()
    assert torch.equal(pipe.tokenize(images), model.encode(_mean_latents(mine, images, 0.25))[1])


@pytest.mark.parametrize("vae_in_model", [False, True], ids=["vae_folder", "vae_inside"])
def test_vae_override_folder(tmp_path, vae, vae_in_model):
    model = random_model(0)
    write_official(tmp_path / "ckpt", model, vae, vae_in_model=vae_in_model)
    mine = random_vae(500)
    mine.save_pretrained(str(tmp_path / "my_vae"))
    pipe = FlexTokPipeline.from_official(tmp_path / "ckpt", vae=str(tmp_path / "my_vae"))
    _state_equal(mine, pipe.vae)


def test_repa_training_weights_are_skipped(tmp_path, vae):
    model = random_model(0)
    g = torch.Generator().manual_seed(9)
    d = model.config.decoder_dim
    extra = {
        "decoder.module_dict.dec_repa_projector.0.weight": torch.randn(32, d, generator=g),
        "decoder.module_dict.dec_repa_projector.0.bias": torch.randn(32, generator=g),
        "decoder.module_dict.dec_repa_projector.2.weight": torch.randn(48, 32, generator=g),
        "repa_proj.mlp.weight": torch.randn(8, d, generator=g),
    }
    write_official(tmp_path, model, vae, extra_tensors=extra)
    ckpt = load_official(tmp_path)
    assert any("skipped 4 training-only REPA weights" in n for n in ckpt.notes)
    assert not any("repa" in k for k in ckpt.model.state_dict())
    _state_equal(model, ckpt.model)
    assert_same_outputs(model, ckpt.model)


# ---------------------------------------------------------------------------------------------------
# fast and plain decoding agree on every variant
# ---------------------------------------------------------------------------------------------------
VARIANTS = {
    "learned": dict(),
    "zero_null": dict(null_condition="zero"),
    "max_timestep_1": dict(max_timestep=1.0),
    "head_dim_16_64": dict(encoder_head_dim=16, decoder_head_dim=64),
    "registers_5": dict(num_registers=5),
    "registers_12_depth_2": dict(encoder_depth=2, decoder_depth=2),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fast_and_plain_decoding_agree(tmp_path, vae, variant):
    model = random_model(1, **VARIANTS[variant])
    write_official(tmp_path, model, vae, config_location="metadata" if variant == "zero_null" else "both")
    pipe = FlexTokPipeline.from_official(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    n = pipe.num_registers
    g = torch.Generator().manual_seed(2)
    tokens = [torch.randint(0, 64000, (k,), generator=g) for k in (1, min(3, n), n)]
    noise = torch.randn(3, 16, 4, 4, generator=g)
    # velocities (cond and uncond, ragged keep_k)
    x_t, t, ids, keep_k = decoder_inputs(model)
    for vf, vp in zip(velocities(pipe.flextok, x_t, t, ids, keep_k, True), velocities(pipe.flextok, x_t, t, ids, keep_k, False)):
        torch.testing.assert_close(vf, vp, rtol=0, atol=1e-5)
    for kwargs in (dict(guidance_scale=3.0, use_apg=True), dict(guidance_scale=3.0, use_apg=False),
                   dict(guidance_scale=1.0)):
        fast, plain = (pipe.detokenize(tokens, num_inference_steps=2, latents=noise.clone(), output_type="latent",
                                       fast_decoding=f, **kwargs).images for f in (True, False))
        torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)
        _differs(fast, noise)
