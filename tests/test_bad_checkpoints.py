"""Bad checkpoints give clear errors that name the file, key, module or tensor and the problem.

Official release format (config.json + model.safetensors, read by a mapping), our diffusers-format folders,
VAE folders and save_pretrained targets. Every error test is paired with a positive control (the same path
with valid input works), so an implementation that rejects everything fails too.
"""
from __future__ import annotations

import copy
import json
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from flextok_kit.flextok_core import OfficialCheckpointError, load_official
from flextok_kit.pipelines import FlexTokPipeline

from .bad_input_common import _no_grad, base  # noqa: F401  (fixtures used by name)
from .bad_input_common import N, write
from .official_format import DEC, ENC, config_to_metadata


def test_valid_checkpoint_loads(base):
    ckpt = load_official(base.folder)
    assert ckpt.model.num_registers == N and not ckpt.sample_posterior

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
# config values of the wrong JSON type: the key path and the expected type are named
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top", [[1, 2], "flextok", 3, None])
def test_config_json_top_level_not_an_object(tmp_path, base, top):
    folder = write(tmp_path, base, metadata=False)
    (folder / "config.json").write_text(json.dumps(top))
    with pytest.raises(OfficialCheckpointError,
                       match=r"config\.json: config must be an object with the entries vae, encoder.*got"):
        load_official(folder)


def _set(config, path, value):
    *parents, last = path.split(".")
    node = config
    for key in parents:
        node = node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()
_T = "decoder.module_dict.dec_transformer"


@pytest.mark.parametrize("path, value, match", [
    ("encoder.module_dict.enc_transformer.depth", "twelve",
     r"encoder\.module_dict\.enc_transformer\.depth must be an integer >= 1, got 'twelve' \(a string\)"),
    (_T + ".depth", 1.5, r"dec_transformer\.depth must be an integer >= 1, got 1\.5 \(a number\)"),
    (_T + ".depth", True, r"dec_transformer\.depth must be an integer >= 1, got True \(a boolean\)"),
    (_T + ".depth", 0, r"dec_transformer\.depth must be an integer >= 1, got 0"),
    (_T + ".dim", [64], r"dec_transformer\.dim must be an integer >= 1, got \[64\] \(a list\)"),
    (_T + ".dim", _DELETE, r"dec_transformer\.dim is missing \(expected an integer >= 1\)"),
    (_T + ".mlp_ratio", "4", r"dec_transformer\.mlp_ratio must be a positive number, got '4' \(a string\)"),
    (_T + ".qkv_bias", "false", r"dec_transformer\.qkv_bias must be a boolean \(true/false\), got 'false'"),
    ("decoder.module_dict.dec_noise_patch_emb.patch_sizes", {"h": 2, "w": 2},
     r"dec_noise_patch_emb\.patch_sizes must be a list of 2 integers >= 1, got \{'h': 2, 'w': 2\} \(an object\)"),
    ("encoder.module_dict.enc_posemb_module.max_sizes", "4x4",
     r"enc_posemb_module\.max_sizes must be a list of 2 integers >= 1, got '4x4' \(a string\)"),
    ("encoder.module_dict.enc_register_module.n_max", "12",
     r"enc_register_module\.n_max must be an integer >= 1, got '12' \(a string\)"),
    ("regularizer.levels", {"levels": [8, 5]}, r"regularizer\.levels must be a list of integers >= 2, got \{"),
    ("regularizer.levels", [8, 1], r"regularizer\.levels must be a list of integers >= 2, got \[8, 1\]"),
    ("vae.sample_posterior", "yes", r"vae\.sample_posterior must be a boolean \(true/false\), got 'yes'"),
    ("vae.scaling_factor", "0.5", r"vae\.scaling_factor must be a positive number or null, got '0\.5' \(a string\)"),
    ("vae.hf_hub_path", 7, r"vae\.hf_hub_path must be a string or null, got 7 \(an integer\)"),
    ("decoder.module_dict.dec_time_embedder.max_timestep", "1000",
     r"dec_time_embedder\.max_timestep must be a positive number, got '1000'"),
    ("encoder.module_dict", [1, 2], r"encoder\.module_dict must be an object \(a dict\), got \[1, 2\] \(a list\)"),
    ("encoder.module_dict.enc_transformer", "FlexTransformer",
     r"encoder\.module_dict\.enc_transformer must be an object \(a dict\), got 'FlexTransformer' \(a string\)"),
    ("vae", ["x"], r"config\.vae must be an object \(a dict\), got \['x'\] \(a list\)"),
    ("decoder.module_dict.dec_noise_channels_to_last.per_sample_op", "channels_first_to_last",
     r"dec_noise_channels_to_last\.per_sample_op must be an object"),
])
def test_config_value_of_wrong_type(tmp_path, base, path, value, match):
    config = copy.deepcopy(base.config)
    _set(config, path, value)
    folder = write(tmp_path, base, config, metadata=False)
    with pytest.raises(OfficialCheckpointError, match=match) as info:
        load_official(folder)
    assert str(folder / "config.json") in str(info.value)  # the file is named too


def test_config_wrong_type_in_metadata_names_the_metadata(tmp_path, base):
    config = copy.deepcopy(base.config)
    _set(config, _T + ".depth", "twelve")
    folder = write(tmp_path, base, config, config_json=False)
    with pytest.raises(OfficialCheckpointError, match=r"model\.safetensors metadata: .*depth must be an integer"):
        load_official(folder)


@pytest.mark.parametrize("path, where", [
    (_T + ".norm_layer", _T + r"\.norm_layer"),
    ("encoder.module_dict.enc_patch_emb.per_sample_op", r"encoder\.module_dict\.enc_patch_emb\.per_sample_op"),
    ("regularizer.callbacks", r"regularizer\.callbacks\[0\]"),
    ("vae.extra", r"vae\.extra"),
])
def test_unexpected_nested_target(tmp_path, base, path, where):
    """A _target_ anywhere the mapping does not place one is refused, naming it and its key path."""
    config = copy.deepcopy(base.config)
    spec = {"_target_": "os.system", "command": "true"}
    _set(config, path, [spec] if path.endswith("callbacks") else spec)
    with pytest.raises(OfficialCheckpointError,
                       match=where + r": unexpected nested _target_ 'os\.system'; this reader maps only the known "
                                     r"FlexTok release modules.*refuses any other target"):
        load_official(write(tmp_path, base, config))
    assert "os.system" not in json.dumps(base.config)  # control: the valid config has no such target


def test_deeply_nested_target(tmp_path, base):
    config = copy.deepcopy(base.config)
    _set(config, _T + ".extra", {"a": [{"b": {"_target_": "evil.Deep"}}]})
    with pytest.raises(OfficialCheckpointError, match=re.escape(_T) + r"\.extra\.a\[0\]\.b: unexpected nested "
                                                                      r"_target_ 'evil\.Deep'"):
        load_official(write(tmp_path, base, config))
    assert "evil" not in sys.modules


# ---------------------------------------------------------------------------------------------------
# integer / bool weights are refused, naming the tensor
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key, dtype", [
    (ENC + "enc_register_module.registers", torch.int64),
    (DEC + "dec_transformer.blocks.0.attn.wq.weight", torch.int32),
    (DEC + "dec_latent_dropout.nullcond", torch.bool),
    ("vae.vae.decoder.conv_out.bias", torch.uint8),
])
def test_official_integer_weights(tmp_path, base, key, dtype):
    tensors = dict(base.tensors, **{key: (base.tensors[key] * 10).to(dtype)})
    with pytest.raises(OfficialCheckpointError,
                       match=rf"model\.safetensors: weight '{re.escape(key)}' has dtype {re.escape(str(dtype))}; "
                             r"weights must be floating point"):
        load_official(write(tmp_path, base, tensors=tensors))
    # control: a half-precision file is fine
    half = {k: v.half() for k, v in base.tensors.items()}
    assert load_official(write(tmp_path / "half", base, tensors=half)).model.num_registers == N


def test_official_vae_folder_with_integer_weights(tmp_path, base):
    """The VAE taken from an AutoencoderKL folder (no vae.vae.* in model.safetensors) is checked too."""
    vae_dir = tmp_path / "vae"
    base.vae.save_pretrained(str(vae_dir))
    config = copy.deepcopy(base.config)
    config["vae"]["hf_hub_path"] = str(vae_dir)
    tensors = {k: v for k, v in base.tensors.items() if not k.startswith("vae.")}
    folder = write(tmp_path, base, config, tensors)
    assert load_official(folder).vae is not None  # control
    weights = vae_dir / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state["encoder.conv_in.bias"] = state["encoder.conv_in.bias"].to(torch.int64)
    save_file(state, str(weights))
    with pytest.raises(OfficialCheckpointError, match=r"diffusion_pytorch_model\.safetensors: weight "
                                                      r"'encoder\.conv_in\.bias' has dtype I64"):
        load_official(folder)


@pytest.fixture(scope="module")
def ours(base, tmp_path_factory):
    """Our diffusers-format folder of the same model."""
    folder = tmp_path_factory.mktemp("ours") / "pipe"
    FlexTokPipeline.from_official(base.folder).save_pretrained(folder)
    return folder


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("component, key, dtype", [
    ("flextok", "decoder.mask_token", torch.int64),
    ("flextok", "encoder.registers", torch.bool),
    ("vae", "decoder.conv_out.weight", torch.int32),
])
@pytest.mark.parametrize("loader", ["from_pretrained", "load"])
def test_diffusers_folder_with_integer_weights(tmp_path, ours, component, key, dtype, loader):
    folder = _copy_tree(ours, tmp_path / "pipe")
    getattr(FlexTokPipeline, loader)(folder)  # control
    weights = folder / component / "diffusion_pytorch_model.safetensors"
    state = load_file(str(weights))
    state[key] = (state[key] * 10).to(dtype)
    save_file(state, str(weights))
    with pytest.raises(ValueError, match=rf"{component}/diffusion_pytorch_model\.safetensors: weight "
                                         rf"'{re.escape(key)}' has dtype \w+; {component} weights must be floating"):
        getattr(FlexTokPipeline, loader)(folder)


@pytest.mark.parametrize("file, text, match", [
    ("model_index.json", "[1, 2]", r"model_index\.json must be a JSON object, got a list"),
    ("model_index.json", '{"vae": [', r"model_index\.json is not valid JSON"),
    ("vae/config.json", '{"in_channels": 3,', r"vae/config\.json is not valid JSON"),
    ("vae/config.json", '"AutoencoderKL"', r"vae/config\.json must be a JSON object, got a str"),
    ("flextok/config.json", "[]", r"flextok/config\.json must be a JSON object, got a list"),
])
def test_diffusers_folder_with_broken_config(tmp_path, ours, file, text, match):
    folder = _copy_tree(ours, tmp_path / "pipe")
    (folder / file).write_text(text)
    with pytest.raises(ValueError, match=match):
        FlexTokPipeline.load(folder)


@pytest.mark.parametrize("file, key, value", [
    ("vae/config.json", "block_out_channels", "wide"),
    ("flextok/config.json", "fsq_levels", 7),
])
def test_diffusers_folder_with_wrong_config_type(tmp_path, ours, file, key, value):
    folder = _copy_tree(ours, tmp_path / "pipe")
    config = json.loads((folder / file).read_text())
    config[key] = value
    (folder / file).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=re.escape(file) + r": cannot build \w+ from it"):
        FlexTokPipeline.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------------
# VAE of an official checkpoint: broken config.json, wrong types, a path that does not exist
# ---------------------------------------------------------------------------------------------------
def _with_vae_folder(tmp_path, base, inside: bool):
    """A checkpoint whose vae.hf_hub_path is a copy of the VAE folder; VAE weights inside model.safetensors
    (the config alone is read) or not (the folder is loaded)."""
    vae_dir = _copy_tree(base.root / "vae", tmp_path / "vae")
    config = copy.deepcopy(base.config)
    config["vae"]["hf_hub_path"] = str(vae_dir)
    tensors = base.tensors if inside else {k: v for k, v in base.tensors.items() if not k.startswith("vae.")}
    return write(tmp_path, base, config, tensors), vae_dir


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("text, match", [
    ('{"in_channels": 3,', r"is not valid JSON"),
    ("[16]", r"must be a JSON object, got a list"),
])
def test_vae_config_invalid_json(tmp_path, base, inside, text, match):
    folder, vae_dir = _with_vae_folder(tmp_path, base, inside)
    load_official(folder)  # control
    (vae_dir / "config.json").write_text(text)
    with pytest.raises(OfficialCheckpointError, match=r"VAE config " + re.escape(str(vae_dir / "config.json")) + " "
                                                      + match):
        load_official(folder)


@pytest.mark.parametrize("inside", [True, False])
def test_vae_config_wrong_type(tmp_path, base, inside):
    folder, vae_dir = _with_vae_folder(tmp_path, base, inside)
    config = json.loads((vae_dir / "config.json").read_text())
    config["block_out_channels"] = "wide"
    (vae_dir / "config.json").write_text(json.dumps(config))
    match = (r"VAE config .*vae/config\.json: cannot build an AutoencoderKL" if inside else
             r"could not load the AutoencoderKL from .*vae \(its config\.json or weights are invalid\)")
    with pytest.raises(OfficialCheckpointError, match=match):
        load_official(folder)


@pytest.mark.parametrize("hub_path", ["/nonexistent/flextok_vae", "missing_vae", "./missing/vae"])
def test_vae_path_does_not_exist(tmp_path, base, hub_path):
    config = copy.deepcopy(base.config)
    config["vae"]["hf_hub_path"] = hub_path
    tensors = {k: v for k, v in base.tensors.items() if not k.startswith("vae.")}
    with pytest.raises(OfficialCheckpointError, match=rf"VAE folder '{re.escape(hub_path)}' \(the config's "
                                                      r"vae\.hf_hub_path\) does not exist"):
        load_official(write(tmp_path, base, config, tensors))


def test_vae_override_does_not_exist(tmp_path, base):
    with pytest.raises(OfficialCheckpointError, match=r"VAE folder '.*no_vae_here' \(the vae= argument\) does not "
                                                      r"exist"):
        load_official(base.folder, vae=str(tmp_path / "no_vae_here"))
    with pytest.raises(OfficialCheckpointError, match=r"VAE path .*config\.json \(the vae= argument\) is a file"):
        load_official(base.folder, vae=str(base.folder / "config.json"))
    assert load_official(base.folder, vae=str(base.root / "vae")).vae is not None  # control


# ---------------------------------------------------------------------------------------------------
# model paths and save targets
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/nonexistent/flextok/model", "./no_such_model", "no/such/deep/model"])
def test_load_missing_model_path(path):
    with pytest.raises(ValueError, match=rf"model path '{re.escape(path)}' does not exist"):
        FlexTokPipeline.load(path)


def test_load_file_instead_of_folder(base):
    with pytest.raises(ValueError, match=r"config\.json is a file; pass the model folder"):
        FlexTokPipeline.load(base.folder / "config.json")


def test_save_pretrained_onto_a_file(tmp_path, base):
    pipe = FlexTokPipeline.from_official(base.folder)
    target = tmp_path / "model"
    target.write_text("precious")
    with pytest.raises(FileExistsError, match=rf"{re.escape(str(target))} is an existing file, not a folder; "
                                              r"refusing to replace it"):
        pipe.save_pretrained(target)
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no temporary folder left behind
    pipe.save_pretrained(tmp_path / "folder")  # control: a new folder, then over an existing folder
    pipe.save_pretrained(tmp_path / "folder")
    assert (tmp_path / "folder" / "model_index.json").is_file()


def test_replace_dir_refuses_a_file(tmp_path):
    from flextok_kit.flextok_core.fileio import replace_dir

    (tmp_path / "new").mkdir()
    (tmp_path / "target").write_text("precious")
    with pytest.raises(FileExistsError, match=r"target is an existing file"):
        replace_dir(tmp_path / "new", tmp_path / "target")
    assert (tmp_path / "target").read_text() == "precious"
