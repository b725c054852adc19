"""Bad checkpoints and bad pipeline inputs give clear errors that name the problem.

Every error test is paired with a positive control (the same path with valid input works), so an
implementation that rejects everything fails too.
"""
from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from flextok_kit.flextok_core import OfficialCheckpointError, load_official
from flextok_kit.pipelines import FlexTokPipeline

from .official_format import (
    DEC, ENC, config_to_metadata, official_config, official_state_dict, random_images, random_model, random_vae,
    save_official, vae_state_dict,
)



@pytest.fixture(autouse=True)
def _no_grad():
    """No autograd in this module's tests (scoped: a module-level switch would leak into other modules)."""
    with torch.no_grad():
        yield

N = 12  # registers of the tiny model


# ---------------------------------------------------------------------------------------------------
# fixtures: one valid checkpoint, variants are written from its config and tensors
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("base")
    model, vae = random_model(0, num_registers=N, sample_posterior=False), random_vae(100)
    vae.save_pretrained(str(root / "vae"))
    config = official_config(model, hf_hub_path=str(root / "vae"))  # absolute: variants live elsewhere
    tensors = official_state_dict(model)
    tensors.update(vae_state_dict(vae))
    folder = save_official(root / "ckpt", tensors, config)
    return SimpleNamespace(model=model, vae=vae, config=config, tensors=tensors, folder=folder, root=root)


def write(tmp_path, base, config=None, tensors=None, **kwargs) -> Path:
    return save_official(tmp_path / "ckpt", base.tensors if tensors is None else tensors,
                         base.config if config is None else config, **kwargs)


def test_valid_checkpoint_loads(base):
    ckpt = load_official(base.folder)
    assert ckpt.model.num_registers == N and not ckpt.sample_posterior


@pytest.fixture(scope="module")
def pipe(base):
    p = FlexTokPipeline.from_official(base.folder)
    p.set_progress_bar_config(disable=True)
    return p


# ---------------------------------------------------------------------------------------------------
# config errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("half, module, target", [
    ("encoder", "enc_patch_emb", "evil.module.Exploit"),
    ("decoder", "dec_latent_dropout", "flextok.model.preprocessors.nullcond.MysteryNullCond"),
    ("decoder", "dec_transformer", "os.system"),
])
def test_unknown_target_in_module_dict(tmp_path, base, half, module, target):
    config = copy.deepcopy(base.config)
    config[half]["module_dict"][module]["_target_"] = target
    folder = write(tmp_path, base, config)
    with pytest.raises(OfficialCheckpointError, match=rf"{half}\.module_dict\.{module}: unknown _target_ '{target}'"):
        load_official(folder)
    assert "evil" not in sys.modules  # nothing named in a config is ever imported


def test_unknown_per_sample_op(tmp_path, base):
    config = copy.deepcopy(base.config)
    config["encoder"]["module_dict"]["enc_channels_to_last"]["per_sample_op"]["_target_"] = "builtins.eval"
    with pytest.raises(OfficialCheckpointError, match=r"enc_channels_to_last\.per_sample_op.*'builtins\.eval'"):
        load_official(write(tmp_path, base, config))


@pytest.mark.parametrize("entry", ["vae", "encoder", "regularizer", "pipeline"])
def test_unknown_top_level_target(tmp_path, base, entry):
    config = copy.deepcopy(base.config)
    config[entry]["_target_"] = "subprocess.Popen"
    with pytest.raises(OfficialCheckpointError, match=rf"config\.{entry}: unknown _target_ 'subprocess\.Popen'"):
        load_official(write(tmp_path, base, config))


def test_unknown_top_level_entry(tmp_path, base):
    config = dict(copy.deepcopy(base.config), evil={"_target_": "os.system", "command": "true"})
    with pytest.raises(OfficialCheckpointError, match=r"unknown top-level entry 'evil'"):
        load_official(write(tmp_path, base, config))


def test_unknown_wrapper_target_in_metadata(tmp_path, base):
    folder = write(tmp_path, base, config_json=False)
    load_official(folder)  # control: the metadata route works
    md = dict(config_to_metadata(base.config), _target_="evil.Wrapper")
    save_file(base.tensors, str(folder / "model.safetensors"), metadata=md)
    with pytest.raises(OfficialCheckpointError, match=r"metadata _target_ 'evil\.Wrapper'"):
        load_official(folder)


def test_key_sorted_config_json_is_rejected(tmp_path, base):
    """The hub mixin's json.dumps(sort_keys=True) reorders the modules; the release runs them in order."""
    folder = write(tmp_path, base, sort_keys=True, metadata=False)
    order = list(json.loads((folder / "config.json").read_text())["encoder"]["module_dict"])
    assert order == sorted(order)
    with pytest.raises(OfficialCheckpointError, match=r"order.*key-sorted"):
        load_official(folder)


def test_invalid_json(tmp_path, base):
    folder = write(tmp_path, base)
    (folder / "config.json").write_text('{"vae": {')
    with pytest.raises(OfficialCheckpointError, match=r"config\.json is not valid JSON"):
        load_official(folder)


def test_no_config_anywhere(tmp_path, base):
    folder = write(tmp_path, base, config_json=False, metadata=False)
    with pytest.raises(OfficialCheckpointError, match=r"no config\.json and model\.safetensors carries no config"):
        load_official(folder)


# ---------------------------------------------------------------------------------------------------
# weight errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", [
    ENC + "enc_to_latents.proj.bias",
    ENC + "enc_transformer.blocks.0.attn.wk.weight",
    DEC + "dec_latent_dropout.nullcond",
    DEC + "dec_time_embedder.mlp.2.weight",
])
def test_missing_weight(tmp_path, base, key):
    tensors = {k: v for k, v in base.tensors.items() if k != key}
    with pytest.raises(OfficialCheckpointError, match=rf"lacks the weight '{key}'"):
        load_official(write(tmp_path, base, tensors=tensors))


def test_missing_vae_weight(tmp_path, base):
    tensors = {k: v for k, v in base.tensors.items() if k != "vae.vae.decoder.conv_out.bias"}
    with pytest.raises(OfficialCheckpointError, match=r"VAE weights.*missing weights \['decoder\.conv_out\.bias'\]"):
        load_official(write(tmp_path, base, tensors=tensors))


@pytest.mark.parametrize("key, match", [
    (ENC + "enc_mystery.weight", r"does not explain.*enc_mystery"),
    ("mystery_head.weight", r"does not explain.*mystery_head"),
    (DEC + "dec_transformer.blocks.1.attn.wq.weight", r"more blocks than the config's depth 1"),
    ("vae.quant.weight", r"does not explain.*vae\.quant\.weight"),
    ("vae.vae.encoder.extra.weight", r"VAE weights.*unexpected weights \['encoder\.extra\.weight'\]"),
])
def test_unexpected_weight(tmp_path, base, key, match):
    tensors = dict(base.tensors, **{key: torch.zeros(64, 64)})
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official(write(tmp_path, base, tensors=tensors))


def test_learned_null_vector_with_zero_null_cond_config(tmp_path, base):
    """A nullcond vector under a ZeroNullCond config is a contradiction, not something to drop silently."""
    config = copy.deepcopy(base.config)
    spec = config["decoder"]["module_dict"]["dec_latent_dropout"]
    spec["_target_"] = "flextok.model.preprocessors.nullcond.ZeroNullCond"
    spec.pop("dim")
    with pytest.raises(OfficialCheckpointError, match=r"does not explain.*dec_latent_dropout\.nullcond"):
        load_official(write(tmp_path, base, config))


@pytest.mark.parametrize("key, shape, match", [
    (ENC + "enc_register_module.registers", (N + 1, 64), r"registers.*shape \(13, 64\).*\(12, 64\)"),
    (DEC + "dec_to_patches.proj.bias", (65,), r"dec_to_patches\.proj\.bias.*shape \(65,\).*\(64,\)"),
    (DEC + "dec_transformer.blocks.0.attn.wv.weight", (65, 64), r"blocks\.0\.attn\.wv\.weight.*shape \(65, 64\)"),
    ("vae.vae.encoder.conv_in.weight", (8, 3, 5, 5), r"VAE weights.*encoder\.conv_in\.weight.*shape \(8, 3, 5, 5\)"),
])
def test_wrong_shape(tmp_path, base, key, shape, match):
    tensors = dict(base.tensors, **{key: torch.zeros(shape)})
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official(write(tmp_path, base, tensors=tensors))


@pytest.mark.parametrize("key, shape", [
    (ENC + "enc_transformer.blocks.0.attn.wk.weight", (64, 65)),
    (ENC + "enc_transformer.blocks.0.mlp.fc3.weight", (170, 63)),
    (ENC + "enc_posemb_module.posembs", (64, 4, 4)),  # no leading 1
    (DEC + "dec_registers_posemb_module.posembs", (64, N)),
])
def test_wrong_shape_names_official_key(tmp_path, base, key, shape):
    tensors = dict(base.tensors, **{key: torch.zeros(shape)})
    with pytest.raises(OfficialCheckpointError, match=re.escape(key) + r".*shape"):
        load_official(write(tmp_path, base, tensors=tensors))


# ---------------------------------------------------------------------------------------------------
# file errors
# ---------------------------------------------------------------------------------------------------
def test_truncated_safetensors(tmp_path, base):
    folder = write(tmp_path, base)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(OfficialCheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_official(folder)


@pytest.mark.parametrize("how", ["header_json", "header_length"])
def test_corrupted_header(tmp_path, base, how):
    folder = write(tmp_path, base)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    if how == "header_json":
        data[8:24] = b"\x00garbage}{[]:,\xff\xfe"  # the JSON header starts at byte 8
    else:
        data[0:8] = (2 ** 62).to_bytes(8, "little")  # header length far beyond the file
    path.write_bytes(bytes(data))
    with pytest.raises(OfficialCheckpointError, match=r"not a readable safetensors file"):
        load_official(folder)


def test_folder_without_model_safetensors(tmp_path, base):
    folder = write(tmp_path, base)
    (folder / "model.safetensors").unlink()
    with pytest.raises(OfficialCheckpointError, match=r"missing weights file .*model\.safetensors"):
        load_official(folder)


@pytest.mark.parametrize("path", ["/nonexistent/flextok/ckpt", "./no_such_folder", "no/such/deep/folder",
                                  "just_a_name"])
def test_nonexistent_path_that_is_not_a_repo_id(path):
    with pytest.raises(OfficialCheckpointError, match=r"neither an existing folder nor a Hugging Face repo id"):
        load_official(path)


def test_unknown_repo_id_offline(monkeypatch, tmp_path):
    """An owner/name that is not a folder is a hub id; offline (as in tests) the error says so and names it."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OfficialCheckpointError, match=r"could not download 'no-such-owner/no-such-flextok' from the"):
        load_official("no-such-owner/no-such-flextok")


def test_file_instead_of_folder(tmp_path, base):
    folder = write(tmp_path, base)
    with pytest.raises(OfficialCheckpointError, match=r"is a file; pass the folder"):
        load_official(folder / "model.safetensors")


def test_no_vae_anywhere(tmp_path, base):
    config = copy.deepcopy(base.config)
    config["vae"]["hf_hub_path"] = None
    tensors = {k: v for k, v in base.tensors.items() if not k.startswith("vae.")}
    folder = write(tmp_path, base, config, tensors)
    with pytest.raises(OfficialCheckpointError, match=r"no VAE weights .*hf_hub_path is null.*pass vae="):
        load_official(folder)
    assert load_official(folder, vae=base.vae).vae is base.vae  # control: the override fixes it


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
    with pytest.raises(ValueError, match=rf"num_tokens must be in 1\.\.{N}, got {k}"):
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
# packaging
# ---------------------------------------------------------------------------------------------------
_COMFY = ("comfy", "comfy_extras", "folder_paths", "comfy_execution")


def _comfy_modules(names):
    return sorted(m for m in names if m.split(".")[0] in _COMFY)


def test_import_does_not_import_comfyui():
    """``import flextok_kit`` in a fresh interpreter (outside ComfyUI) neither fails nor imports ComfyUI."""
    code = (
        "import sys, flextok_kit\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {_COMFY!r})\n"
        "assert not bad, bad\n"
        "assert flextok_kit.NODE_CLASS_MAPPINGS == {}, flextok_kit.NODE_CLASS_MAPPINGS\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_library_modules_do_not_import_comfyui():
    """This test process imported flextok_kit.flextok_core and flextok_kit.pipelines (at the top of this file)."""
    assert "flextok_kit.pipelines" in sys.modules and "flextok_kit.flextok_core.official" in sys.modules
    assert not _comfy_modules(sys.modules)
