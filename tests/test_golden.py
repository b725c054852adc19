"""Parity with the official FlexTok code: every tensor in shared/golden/flextok_tiny/vectors.json.

The golden folder is in the official release format; we load it through ``FlexTokPipeline.from_official`` and
reproduce the official intermediates through the public API wherever it reaches (tokenize, detokenize with
callbacks), and through the model's named stages for the internals.
"""
import json

import pytest
import torch
from safetensors.torch import load_file

from flextok_kit.flextok_core import apg_velocity, cfg_velocity, vae_decode, vae_encode
from flextok_kit.flextok_core.guidance import MomentumBuffer
from flextok_kit.pipelines import FlexTokPipeline

from .conftest import GOLDEN

META = json.loads((GOLDEN / "vectors.json").read_text())
SPECS = META["tensors"]


def check(name: str, actual: torch.Tensor):
    expected = GOLDEN_TENSORS[name]
    assert tuple(actual.shape) == tuple(expected.shape), name
    tol = SPECS[name]["tolerance"]
    if tol == "exact":
        assert torch.equal(actual.cpu(), expected), f"{name}: mismatch"
        return
    torch.testing.assert_close(actual.detach().float().cpu(), expected, atol=tol["atol"], rtol=tol["rtol"], msg=name)


GOLDEN_TENSORS = load_file(GOLDEN / "vectors.safetensors")


@pytest.fixture(scope="module")
def pipe():
    p = FlexTokPipeline.from_official(GOLDEN)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def v():
    return GOLDEN_TENSORS


def token_prefixes(v, ks):
    return [v["token_ids"][i, :k] for i, k in enumerate(ks)]


# -- encode chain -----------------------------------------------------------------------------------
def test_encode_chain(pipe, v):
    with torch.no_grad():
        posterior = pipe.vae.encode(v["images"]).latent_dist
        check("vae_posterior_mean", posterior.mean)
        check("vae_posterior_std", posterior.std)
        torch.manual_seed(META["seeds"]["posterior_seed"])
        check("vae_posterior_eps", torch.randn(posterior.mean.shape))
        torch.manual_seed(META["seeds"]["posterior_seed"])
        latents = vae_encode(pipe.vae, v["images"], sample_posterior=pipe.flextok.config.sample_posterior)
        check("vae_latents", latents)
        enc = pipe.flextok.encoder
        check("enc_patch_tokens", enc.embed_patches(v["vae_latents"]))
        check("enc_registers_out", enc.encode_registers(v["vae_latents"]))
        prequant = enc(v["vae_latents"])
        check("enc_latents_prequant", prequant)
        quants, ids = pipe.flextok.fsq(prequant)
        check("fsq_quants", quants)
        check("token_ids", ids)
        check("vae_decode_of_vae_latents", vae_decode(pipe.vae, v["vae_latents"]))


def test_tokenize_matches_official_under_same_seed(pipe, v):
    torch.manual_seed(META["seeds"]["posterior_seed"])
    check("token_ids", pipe.tokenize(v["images"]))
    # PIL-free tensor path with a prefix: causal registers make it the prefix of the full sequence
    torch.manual_seed(META["seeds"]["posterior_seed"])
    assert torch.equal(pipe.tokenize(v["images"], num_tokens=5), v["token_ids"][:, :5])


def test_fsq_ids_round_trip(pipe, v):
    values = pipe.flextok.fsq.ids_to_values(v["token_ids"])
    check("fsq_quants", values)
    assert torch.equal(pipe.flextok.fsq.values_to_ids(values), v["token_ids"])


# -- single decoder evaluations ---------------------------------------------------------------------
@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("k", [1, 2, 4, 32])
def test_decoder_single_step(pipe, v, k, fast):
    model = pipe.flextok
    ids = v["token_ids"][:, :k]
    with torch.no_grad():
        regs = model.prepare_registers(ids, torch.full((2,), k), guidance=True, fast=fast)
        v_cond, v_uncond = model(v["dec_xt"], v["dec_t"], regs).chunk(2)
    check(f"dec_v_cond_k{k}", v_cond)
    check(f"dec_v_uncond_k{k}", v_uncond)
    check(f"dec_v_cfg3_k{k}", cfg_velocity(v_cond, v_uncond, 3.0))
    check(f"dec_v_apg3_k{k}", apg_velocity(v_cond, v_uncond, 3.0, MomentumBuffer(-0.5)))


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
def test_decoder_mixed_keep_k(pipe, v, fast):
    ids = v["token_ids"][:, :27]
    with torch.no_grad():
        regs = pipe.flextok.prepare_registers(ids, torch.tensor([3, 27]), guidance=False, fast=fast)
        check("dec_v_cond_mixed", pipe.flextok(v["dec_xt"], v["dec_t"], regs))


def test_decoder_internals(pipe, v):
    dec = pipe.flextok.decoder
    n = pipe.flextok.config.num_registers
    with torch.no_grad():
        values = pipe.flextok.fsq.ids_to_values(torch.nn.functional.pad(v["token_ids"][:, :2], (0, n - 2)))
        check("dec_register_tokens_k2", dec.embed_registers(values, torch.tensor([2, 2])))
        plain = dec.prepare_registers(values, torch.tensor([2, 2]), guidance=True, fast=False)
        check("dec_register_tokens_k2", plain.tokens[0])
        check("dec_register_tokens_uncond_k2", plain.tokens[1])
        check("dec_patch_tokens", dec.embed_patches(v["dec_xt"]))
        check("dec_temb", dec.embed_timesteps(v["dec_t"]))


# -- full detokenize runs ---------------------------------------------------------------------------
RUNS = META["detok_runs"]


@pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])
@pytest.mark.parametrize("run", RUNS, ids=[r["name"] for r in RUNS])
def test_detokenize_runs(pipe, v, run, fast):
    name = run["name"]
    traj = {"x": [], "v_cond": [], "v_uncond": [], "t": []}
    state = {"x": v["detok_noise"]}

    def record(p, i, timestep, tensors):
        traj["x"].append(state["x"])
        traj["t"].append(timestep / p.scheduler.config.num_train_timesteps)
        if run["guidance_scale"] != 1.0:
            traj["v_cond"].append(tensors["velocity_cond"])
            traj["v_uncond"].append(tensors["velocity_uncond"])
        state["x"] = tensors["latents"]
        return {}

    inputs = ["latents", "velocity_cond", "velocity_uncond"]
    out = pipe.detokenize(
        token_prefixes(v, run["keep_ks"]), num_inference_steps=META["schedule"]["timesteps"],
        guidance_scale=run["guidance_scale"], use_apg=run["perform_norm_guidance"], latents=v["detok_noise"],
        output_type="latent", fast_decoding=fast, callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=inputs)
    check(f"detok_{name}_latents", out.images)
    if f"detok_{name}_traj_x" in SPECS:
        check(f"detok_{name}_traj_x", torch.stack(traj["x"]))
        check(f"detok_{name}_traj_t", torch.stack(traj["t"]).float())
        check(f"detok_{name}_traj_v_cond", torch.stack(traj["v_cond"]))
        check(f"detok_{name}_traj_v_uncond", torch.stack(traj["v_uncond"]))
    if f"detok_{name}_rgb" in SPECS:
        with torch.no_grad():
            check(f"detok_{name}_rgb", vae_decode(pipe.vae, out.images))
        pt = pipe.detokenize(
            token_prefixes(v, run["keep_ks"]), num_inference_steps=META["schedule"]["timesteps"],
            guidance_scale=run["guidance_scale"], use_apg=run["perform_norm_guidance"], latents=v["detok_noise"],
            output_type="pt", fast_decoding=fast).images
        expected = (GOLDEN_TENSORS[f"detok_{name}_rgb"] / 2 + 0.5).clamp(0, 1)
        torch.testing.assert_close(pt, expected, atol=2e-4, rtol=1e-4)


def test_initial_noise_from_generator(pipe, v):
    g = torch.Generator().manual_seed(META["seeds"]["detok_generator_seed"])
    noise = pipe.prepare_latents(2, 64, 64, torch.float32, torch.device("cpu"), g)
    check("detok_noise", noise)
    # the same generator through detokenize gives the run fed with detok_noise
    run = next(r for r in RUNS if r["name"] == "k2_apg3")
    out = pipe.detokenize(token_prefixes(v, run["keep_ks"]), num_inference_steps=4, guidance_scale=3.0, use_apg=True,
                          height=64, width=64, output_type="latent",
                          generator=torch.Generator().manual_seed(META["seeds"]["detok_generator_seed"]))
    check("detok_k2_apg3_latents", out.images)
