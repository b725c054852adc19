"""Reader for the official FlexTok release format (``config.json`` + ``model.safetensors``).

The official config names Python classes through hydra ``_target_`` entries. They are never imported or
instantiated here: each known target is mapped onto our modules by its role, in the config's own module
order (the release runs its modules in mapping order, so the order carries meaning). Unknown targets,
unsupported values, missing weights and unexpected weights are errors that name the culprit.
"""
from __future__ import annotations

import ast
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .fileio import read_json_object
from .model import FlexTokModel

logger = logging.getLogger(__name__)

LICENSE_NOTICE = (
    "The released FlexTok weights (EPFL-VILAB/flextok_*) are licensed under the Apple Machine Learning Research "
    "Model License: research purposes only, no commercial use; redistribution must keep the licence and attribution."
)


class OfficialCheckpointError(ValueError):
    """The official checkpoint cannot be read: the message names the file, module, key or value."""


# Roles of the encoder / decoder modules, in execution order: (role, accepted targets, required).
_P = "flextok.model."
ENCODER_ROLES = [
    ("to_channels_last", {_P + "utils.dict_ops.PerSampleOp"}, True),
    ("patch_emb", {_P + "preprocessors.patching.PatchEmbedder"}, True),
    ("posemb", {_P + "utils.posembs.PositionalEmbeddingAdder"}, True),
    ("registers", {_P + "preprocessors.registers.Registers1D"}, True),
    ("packer", {_P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker"}, True),
    ("transformer", {_P + "trunks.transformers.FlexTransformer"}, True),
    ("unpacker", {_P + "postprocessors.seq_unpacking.SequenceUnpacker"}, True),
    ("to_latents", {_P + "postprocessors.heads.LinearHead"}, True),
]
NULL_COND_TARGETS = {
    _P + "preprocessors.nullcond.LearnedNullCond": "learned",
    _P + "preprocessors.nullcond.ZeroNullCond": "zero",
}
DECODER_ROLES = [
    ("from_latents", {_P + "preprocessors.linear.LinearLayer"}, True),
    ("register_posemb", {_P + "utils.posembs.PositionalEmbeddingAdder"}, True),
    ("nested_dropout", {_P + "preprocessors.token_dropout.MaskedNestedDropout"}, True),
    ("null_cond", set(NULL_COND_TARGETS), True),
    ("to_channels_last", {_P + "utils.dict_ops.PerSampleOp"}, True),
    ("patch_emb", {_P + "preprocessors.patching.PatchEmbedder"}, True),
    ("posemb", {_P + "utils.posembs.PositionalEmbeddingAdder"}, True),
    ("packer", {_P + "preprocessors.flex_seq_packing.BlockWiseSequencePacker"}, True),
    ("time_embedder", {_P + "preprocessors.time_embedding.TimestepEmbedder"}, True),
    ("transformer", {_P + "trunks.transformers.FlexTransformer"}, True),
    ("unpacker", {_P + "postprocessors.seq_unpacking.SequenceUnpacker"}, True),
    ("repa_unpacker", {_P + "postprocessors.seq_unpacking.SequenceUnpacker"}, False),  # REPA training only
    ("to_patches", {_P + "postprocessors.heads.ToPatchesLinearHead"}, True),
    ("to_channels_first", {_P + "utils.dict_ops.PerSampleOp"}, True),
]
PER_SAMPLE_OPS = {
    "to_channels_last": _P + "utils.dict_ops.channels_first_to_last",
    "to_channels_first": _P + "utils.dict_ops.channels_last_to_first",
}
TOP_LEVEL_TARGETS = {
    "vae": {"flextok.vae_wrapper.StableDiffusionVAE"},
    "encoder": {_P + "utils.wrappers.SequentialModuleDictWrapper"},
    "decoder": {_P + "utils.wrappers.SequentialModuleDictWrapper"},
    "regularizer": {"flextok.regularizers.quantize_fsq.FSQ"},
    # training-only (noise sampling) and the sampler, whose numerics we implement ourselves
    "flow_matching_noise_module": {"flextok.flow_matching.noise_modules.MinRFNoiseModule"},
    "pipeline": {"flextok.flow_matching.pipelines.MinRFPipeline"},
}
WRAPPER_TARGET = "flextok.flextok_wrapper.FlexTok"
# Weights of modules that only exist for training (REPA projectors); skipped with a log line.
TRAINING_ONLY_KEY = re.compile(r"(^|\.)[^.]*repa[^.]*\.")

# The VAE the official wrapper builds when ``hf_hub_path`` is null (SD-VAE-like, f8).
BASE_VAE_CONFIG = dict(
    in_channels=3, out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", norm_num_groups=32,
    sample_size=256,
)


@dataclass
class OfficialCheckpoint:
    """What :func:`load_official` returns: our model, the VAE, and the settings read from the config."""

    model: FlexTokModel
    vae: object  # diffusers.AutoencoderKL
    scaling_factor: float
    sample_posterior: bool
    vae_dtype: str | None
    source: str
    notes: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------------
def _resolve_folder(path_or_repo: str | os.PathLike, allow_patterns=None) -> Path:
    p = Path(path_or_repo)
    if p.is_dir():
        return p
    if p.exists():
        raise OfficialCheckpointError(f"{p} is a file; pass the folder that holds config.json and model.safetensors")
    text = str(path_or_repo)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise OfficialCheckpointError(f"{text!r} is neither an existing folder nor a Hugging Face repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as e:  # offline, unknown repo, gated repo ...
        raise OfficialCheckpointError(f"could not download {text!r} from the Hugging Face Hub: {e}") from e


def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open

    if not path.is_file():
        raise OfficialCheckpointError(f"missing weights file {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise OfficialCheckpointError(f"{path} is not a readable safetensors file (truncated or corrupted?): {e}") from e
    return tensors, metadata


def non_floating_weights(path: str | os.PathLike) -> list[tuple[str, str]]:
    """``(name, dtype)`` of every tensor of a safetensors file whose dtype is not floating point, read from the
    header alone. Model weights are floats; an integer or bool tensor would be silently cast by
    ``load_state_dict`` into nonsense weights (a corrupted or mis-converted file), so loaders refuse it."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    return sorted((k, d) for k, d in dtypes.items() if not d.upper().startswith(("F", "BF")))


def _check_floating(tensors: dict, where: str):
    bad = sorted(((k, v.dtype) for k, v in tensors.items() if not v.is_floating_point()), key=lambda kv: kv[0])
    if bad:
        key, dtype = bad[0]
        more = f" (and {len(bad) - 1} more: {[k for k, _ in bad[1:4]]})" if len(bad) > 1 else ""
        raise OfficialCheckpointError(f"{where}: weight {key!r} has dtype {dtype}; weights must be floating point "
                                      f"(a corrupted or mis-converted checkpoint?){more}")


def _config_from_metadata(metadata: dict, path: Path) -> dict:
    """The release's safetensors metadata: one entry per top-level key, each the Python repr of a dict."""
    config = {}
    for key, text in metadata.items():
        if key == "_target_":
            if text != WRAPPER_TARGET:
                raise OfficialCheckpointError(f"{path}: metadata _target_ {text!r} is not {WRAPPER_TARGET}")
            continue
        if key == "format":  # safetensors' own tag
            continue
        try:
            config[key] = ast.literal_eval(text)  # literals only: nothing is executed
        except (ValueError, SyntaxError) as e:
            raise OfficialCheckpointError(f"{path}: metadata entry {key!r} is not a literal dict: {e}") from e
    return config


# ---------------------------------------------------------------------------------------------------
# config parsing
# ---------------------------------------------------------------------------------------------------
def _match_roles(module_dict: dict, roles: list, where: str) -> dict:
    """Assign each configured module (in the config's order) to the next role whose target it has."""
    if module_dict is None or module_dict == {}:
        raise OfficialCheckpointError(f"{where}.module_dict is missing or empty")
    _object(module_dict, f"{where}.module_dict")
    found, i = {}, 0
    for name, spec in module_dict.items():
        target = _object(spec, f"{where}.module_dict.{name}").get("_target_")
        if target is None:
            raise OfficialCheckpointError(f"{where}.module_dict.{name} has no _target_")
        if not isinstance(target, str):
            _bad_value(f"{where}.module_dict.{name}._target_", "a string", target)
        while i < len(roles) and target not in roles[i][1]:
            if roles[i][2]:
                known = {t for _, ts, _ in roles for t in ts}
                if target not in known:
                    raise OfficialCheckpointError(f"{where}.module_dict.{name}: unknown _target_ {target!r}")
                raise OfficialCheckpointError(
                    f"{where}.module_dict.{name} ({target.rsplit('.', 1)[-1]}) comes where a "
                    f"{sorted(roles[i][1])[0].rsplit('.', 1)[-1]} module ({roles[i][0]}) is expected; the release "
                    f"runs modules in config order, so this order is not a FlexTok model (was config.json key-sorted?)"
                )
            i += 1
        if i == len(roles):
            raise OfficialCheckpointError(f"{where}.module_dict.{name}: unexpected extra module {target!r}")
        found[roles[i][0]] = (name, spec)
        i += 1
    missing = [r for r, _, req in roles[i:] if req]
    if missing:
        raise OfficialCheckpointError(f"{where}.module_dict lacks required modules: {missing}")
    return found


# Typed accessors: every value the mapping reads from the config goes through one of these, so a wrong JSON type
# ("depth": "twelve", a dict where a list belongs, a missing key) names the key path and the expected type.
_REQUIRED = object()


def _json_type(value) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            tuple: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad_value(path: str, expected: str, value):
    raise OfficialCheckpointError(f"{path} must be {expected}, got {_short(value)} ({_json_type(value)})")


def _object(value, path: str) -> dict:
    if not isinstance(value, dict):
        _bad_value(path, "an object (a dict)", value)
    return value


def _raw(spec: dict, key: str, path: str, default, expected: str):
    if key in spec:
        return spec[key]
    if default is _REQUIRED:
        raise OfficialCheckpointError(f"{path}.{key} is missing (expected {expected})")
    return default


def _int(spec: dict, key: str, path: str, default=_REQUIRED, minimum: int | None = None) -> int:
    expected = "an integer" + ("" if minimum is None else f" >= {minimum}")
    value = _raw(spec, key, path, default, expected)
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        _bad_value(f"{path}.{key}", expected, value)
    return value


def _float(spec: dict, key: str, path: str, default=_REQUIRED, positive: bool = False, allow_none: bool = False):
    expected = ("a positive" if positive else "a finite") + " number" + (" or null" if allow_none else "")
    value = _raw(spec, key, path, default, expected)
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value in (float("inf"), float("-inf")) or (positive and value <= 0):
        _bad_value(f"{path}.{key}", expected, value)
    return float(value)


def _bool(spec: dict, key: str, path: str, default=_REQUIRED) -> bool:
    value = _raw(spec, key, path, default, "a boolean (true/false)")
    if not isinstance(value, bool):
        _bad_value(f"{path}.{key}", "a boolean (true/false)", value)
    return value


def _str(spec: dict, key: str, path: str, default=_REQUIRED, allow_none: bool = False):
    expected = "a string" + (" or null" if allow_none else "")
    value = _raw(spec, key, path, default, expected)
    if not (isinstance(value, str) or (value is None and allow_none)):
        _bad_value(f"{path}.{key}", expected, value)
    return value


def _int_list(spec: dict, key: str, path: str, default=_REQUIRED, length: int | None = None,
              minimum: int = 1) -> list[int]:
    expected = (f"a list of {length} integers" if length else "a list of integers") + f" >= {minimum}"
    value = _raw(spec, key, path, default, expected)
    if not isinstance(value, (list, tuple)) or (length is not None and len(value) != length) or not value \
            or any(isinstance(x, bool) or not isinstance(x, int) or x < minimum for x in value):
        _bad_value(f"{path}.{key}", expected, value)
    return [int(x) for x in value]


def _check_nested_targets(value, path: str, allowed: set):
    """Refuse any ``_target_`` the mapping does not know the place of: the loader maps only the release's
    modules (and the per_sample_op of its PerSampleOp modules); a target nested anywhere else would be a class
    the official code instantiates and this reader would silently ignore."""
    if isinstance(value, dict):
        for key, item in value.items():
            here = f"{path}.{key}" if path else str(key)
            if key == "_target_" and path not in allowed:
                raise OfficialCheckpointError(
                    f"{path}: unexpected nested _target_ {_short(item)}; this reader maps only the known FlexTok "
                    f"release modules (top-level entries, module_dict modules and their per_sample_op) and "
                    f"refuses any other target")
            _check_nested_targets(item, here, allowed)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_nested_targets(item, f"{path}[{i}]", allowed)


def _require(cond: bool, message: str):
    if not cond:
        raise OfficialCheckpointError(message)


def _check_per_sample_ops(found: dict, where: str):
    for role, expected in PER_SAMPLE_OPS.items():
        if role in found:
            name, spec = found[role]
            op = _object(spec.get("per_sample_op") or {}, f"{where}.module_dict.{name}.per_sample_op").get("_target_")
            _require(op == expected, f"{where}.module_dict.{name}.per_sample_op: expected {expected}, got {op!r}")


def _transformer_args(spec: dict, where: str) -> dict:
    for flag in ("qkv_bias", "proj_bias", "mlp_bias"):
        _require(not _bool(spec, flag, where, False),
                 f"{where}: {flag}=True is not supported (the release has no biases)")
    return dict(dim=_int(spec, "dim", where, minimum=1), depth=_int(spec, "depth", where, minimum=1),
                head_dim=_int(spec, "head_dim", where, 64, minimum=1),
                mlp_ratio=_float(spec, "mlp_ratio", where, 4.0, positive=True))


def _patch_size(spec: dict, where: str) -> int:
    ps = _int_list(spec, "patch_sizes", where, [2, 2], length=2)
    _require(ps[0] == ps[1], f"{where}.patch_sizes must be square [p, p], got {ps}")
    return ps[0]


def _match_modules(config: dict) -> tuple[dict, dict]:
    """The config's top-level entries and targets checked; -> the encoder's and decoder's modules by role
    ``{role: (name, spec)}``. Any ``_target_`` outside the places the mapping knows is refused."""
    if not isinstance(config, dict):
        _bad_value("config", "an object with the entries vae, encoder, decoder, regularizer, ...", config)
    for key, spec in config.items():
        if key not in TOP_LEVEL_TARGETS:
            raise OfficialCheckpointError(f"config: unknown top-level entry {key!r}")
        _object(spec, f"config.{key}")
        target = spec.get("_target_")
        _require(isinstance(target, str) and target in TOP_LEVEL_TARGETS[key],
                 f"config.{key}: unknown _target_ {target!r}")
    for key in ("vae", "encoder", "decoder", "regularizer"):
        _require(key in config, f"config lacks the {key!r} entry")

    enc = _match_roles(config["encoder"].get("module_dict"), ENCODER_ROLES, "encoder")
    dec = _match_roles(config["decoder"].get("module_dict"), DECODER_ROLES, "decoder")
    _check_per_sample_ops(enc, "encoder")
    _check_per_sample_ops(dec, "decoder")
    allowed = set(config)
    for half, found in (("encoder", enc), ("decoder", dec)):
        for role, (name, _) in found.items():
            allowed.add(f"{half}.module_dict.{name}")
            if role in PER_SAMPLE_OPS:
                allowed.add(f"{half}.module_dict.{name}.per_sample_op")
    _check_nested_targets(config, "", allowed)
    return enc, dec


def parse_config(config: dict) -> tuple[dict, dict]:
    """Official config -> (FlexTokModel config kwargs, VAE settings). Nothing named in it is executed.

    Every value is read through a typed accessor, so a wrong JSON type names its key path and the expected type.
    """
    enc, dec = _match_modules(config)
    vae = config["vae"]
    levels = _int_list(config["regularizer"], "levels", "regularizer", [8, 8, 8, 5, 5, 5], minimum=2)

    e = {role: spec for role, (_, spec) in enc.items()}
    d = {role: spec for role, (_, spec) in dec.items()}
    ep = {role: f"encoder.module_dict.{name}" for role, (name, _) in enc.items()}  # key paths, for messages
    dp = {role: f"decoder.module_dict.{name}" for role, (name, _) in dec.items()}
    enc_t = _transformer_args(e["transformer"], ep["transformer"])
    dec_t = _transformer_args(d["transformer"], dp["transformer"])

    for where, spec, path in (("encoder", e["posemb"], ep["posemb"]), ("decoder", d["posemb"], dp["posemb"])):
        kind = _str(spec, "posemb_type", path, "sincos")
        scaling = _str(spec, "posemb_scaling", path, "absolute")
        _require(kind == "sincos" and scaling == "absolute",
                 f"{where} patch position embedding must be sincos/absolute, got {kind}/{scaling}")
    grid = _int_list(e["posemb"], "max_sizes", ep["posemb"], length=2)
    dec_grid = _int_list(d["posemb"], "max_sizes", dp["posemb"], length=2)
    _require(grid == dec_grid, f"encoder ({grid}) and decoder ({dec_grid}) position tables differ in size: unsupported")

    regs = e["registers"]
    n_max = _int(regs, "n_max", ep["registers"], minimum=1)
    _require(_str(regs, "ordering_mode", ep["registers"], "nested") == "nested",
             "encoder registers ordering_mode must be 'nested'")
    enc_mask = _str(e["packer"], "mask_mode", ep["packer"], None, allow_none=True)
    dec_mask = _str(d["packer"], "mask_mode", dp["packer"], None, allow_none=True)
    _require(enc_mask == "causal_last", f"encoder packer mask_mode must be 'causal_last', got {enc_mask!r}")
    _require(dec_mask == "full", f"decoder packer mask_mode must be 'full', got {dec_mask!r}")
    dim_out = _int(e["to_latents"], "dim_out", ep["to_latents"], len(levels), minimum=1)
    _require(dim_out == len(levels), f"encoder head dim_out {dim_out} != number of FSQ levels {len(levels)}")
    _require(not _bool(e["to_latents"], "use_mup_readout", ep["to_latents"], False),
             "use_mup_readout=True is not supported")
    _require(not _bool(d["to_patches"], "use_mup_readout", dp["to_patches"], False),
             "use_mup_readout=True is not supported")
    rp = d["register_posemb"]
    rp_type = _str(rp, "posemb_type", dp["register_posemb"], None, allow_none=True)
    _require(rp_type == "learnable_sum",
             f"decoder register position embedding must be 'learnable_sum', got {rp_type!r}")
    rp_sizes = _int_list(rp, "max_sizes", dp["register_posemb"], length=1)
    _require(rp_sizes == [n_max], f"decoder register table size {rp_sizes} != number of registers {n_max}")

    latent_channels = _int(e["patch_emb"], "channels_in", ep["patch_emb"], minimum=1)
    _require(_int(d["patch_emb"], "channels_in", dp["patch_emb"], minimum=1) == latent_channels
             == _int(d["to_patches"], "channels_out", dp["to_patches"], minimum=1),
             "latent channels differ between encoder, decoder and head")
    vae_channels = _int(vae, "latent_channels", "vae", latent_channels, minimum=1)
    _require(vae_channels == latent_channels,
             f"vae.latent_channels {vae_channels} != encoder channels_in {latent_channels}")
    patch = _patch_size(e["patch_emb"], ep["patch_emb"])
    _require(_patch_size(d["patch_emb"], dp["patch_emb"]) == patch == _patch_size(d["to_patches"], dp["to_patches"]),
             "encoder and decoder patch sizes differ: unsupported")
    expansion = _int(d["transformer"], "adaLN_expansion", dp["transformer"], 1)
    _require(expansion in (1, 2), f"adaLN_expansion {expansion} unsupported (1 or 2)")
    temb, tp = d["time_embedder"], dp["time_embedder"]

    model_config = dict(
        latent_channels=latent_channels, patch_size=patch, grid_size=tuple(grid), num_registers=n_max,
        fsq_levels=tuple(levels),
        encoder_dim=enc_t["dim"], encoder_depth=enc_t["depth"], encoder_head_dim=enc_t["head_dim"],
        encoder_mlp_ratio=enc_t["mlp_ratio"],
        decoder_dim=dec_t["dim"], decoder_depth=dec_t["depth"], decoder_head_dim=dec_t["head_dim"],
        decoder_mlp_ratio=dec_t["mlp_ratio"],
        null_condition=NULL_COND_TARGETS[d["null_cond"]["_target_"]], adaln_expansion=expansion,
        time_embed_dim=_int(temb, "frequency_embedding_size", tp, 256, minimum=2),
        max_timestep=_float(temb, "max_timestep", tp, 1000.0, positive=True),
        sample_posterior=_bool(vae, "sample_posterior", "vae", True),
    )
    vae_settings = dict(
        hf_hub_path=_str(vae, "hf_hub_path", "vae", None, allow_none=True),
        scaling_factor=_float(vae, "scaling_factor", "vae", None, positive=True, allow_none=True),
        latent_channels=latent_channels, dtype_override=_str(vae, "dtype_override", "vae", None, allow_none=True),
    )
    names = dict(encoder={r: n for r, (n, _) in enc.items()}, decoder={r: n for r, (n, _) in dec.items()})
    return model_config, dict(vae_settings, module_names=names)


# ---------------------------------------------------------------------------------------------------
# state-dict mapping
# ---------------------------------------------------------------------------------------------------
def map_state_dict(tensors: dict, names: dict, model_config: dict) -> tuple[dict, set]:
    """Official FlexTok keys -> FlexTokModel keys. Returns (our state dict, official keys consumed).

    Every official tensor is checked against the shape the config implies, so a mismatch names the official key.
    """
    from .layers import swiglu_hidden_dim

    out, used = {}, set()
    cfg = model_config
    n, (gh, gw), f = cfg["num_registers"], cfg["grid_size"], len(cfg["fsq_levels"])
    patch_in = cfg["latent_channels"] * cfg["patch_size"] ** 2

    def take(key, shape):
        if key not in tensors:
            raise OfficialCheckpointError(f"model.safetensors lacks the weight {key!r}")
        tensor = tensors[key]
        if tuple(tensor.shape) != tuple(shape):
            raise OfficialCheckpointError(
                f"weight {key!r} has shape {tuple(tensor.shape)}, the config implies {tuple(shape)}")
        used.add(key)
        return tensor

    def linear(src: str, dst: str, d_out: int, d_in: int, bias: bool = True):
        out[f"{dst}.weight"] = take(f"{src}.weight", (d_out, d_in))
        if bias:
            out[f"{dst}.bias"] = take(f"{src}.bias", (d_out,))

    def block_weights(src: str, dst: str, dim: int, depth: int, mlp_ratio: float, adaln: bool):
        hidden = swiglu_hidden_dim(dim, mlp_ratio)
        for i in range(depth):
            s, t = f"{src}.blocks.{i}", f"{dst}.blocks.{i}"
            out[f"{t}.attn.qkv.weight"] = torch.cat([take(f"{s}.attn.w{c}.weight", (dim, dim)) for c in "qkv"])
            out[f"{t}.attn.proj.weight"] = take(f"{s}.attn.proj.weight", (dim, dim))
            out[f"{t}.mlp.gate_up.weight"] = torch.cat([take(f"{s}.mlp.fc1.weight", (hidden, dim)),
                                                        take(f"{s}.mlp.fc3.weight", (hidden, dim))])
            out[f"{t}.mlp.down.weight"] = take(f"{s}.mlp.fc2.weight", (dim, hidden))
            if adaln:
                linear(f"{s}.adaLN_modulation.1", f"{t}.adaLN", cfg["adaln_expansion"] * 6 * dim, dim)
        extra = [k for k in tensors if k.startswith(f"{src}.blocks.{depth}.")]
        if extra:
            raise OfficialCheckpointError(f"model.safetensors has more blocks than the config's depth {depth}: {extra[0]!r}")

    en = {r: f"encoder.module_dict.{n_}" for r, n_ in names["encoder"].items()}
    de = {r: f"decoder.module_dict.{n_}" for r, n_ in names["decoder"].items()}
    de_dim, en_dim = cfg["decoder_dim"], cfg["encoder_dim"]

    linear(f"{en['patch_emb']}.patch_proj", "encoder.patch_embed", en_dim, patch_in)
    out["encoder.pos_embed"] = take(f"{en['posemb']}.posembs", (1, en_dim, gh, gw))[0].permute(1, 2, 0)  # [Gh,Gw,D]
    out["encoder.registers"] = take(f"{en['registers']}.registers", (n, en_dim))
    block_weights(en["transformer"], "encoder", en_dim, cfg["encoder_depth"], cfg["encoder_mlp_ratio"], adaln=False)
    linear(f"{en['to_latents']}.proj", "encoder.to_latents", f, en_dim)

    linear(f"{de['from_latents']}.proj", "decoder.from_latents", de_dim, f)
    out["decoder.register_pos_embed"] = take(f"{de['register_posemb']}.posembs", (1, 1, de_dim, n))[0, 0].t()  # [N,D]
    out["decoder.mask_token"] = take(f"{de['nested_dropout']}.dropout_mask_token", (de_dim,))
    if cfg["null_condition"] == "learned":
        out["decoder.null_cond"] = take(f"{de['null_cond']}.nullcond", (de_dim,))
    linear(f"{de['patch_emb']}.patch_proj", "decoder.patch_embed", de_dim, patch_in)
    out["decoder.pos_embed"] = take(f"{de['posemb']}.posembs", (1, de_dim, gh, gw))[0].permute(1, 2, 0)
    linear(f"{de['time_embedder']}.mlp.0", "decoder.time_embed.linear_1", de_dim, cfg["time_embed_dim"])
    linear(f"{de['time_embedder']}.mlp.2", "decoder.time_embed.linear_2", de_dim, de_dim)
    block_weights(de["transformer"], "decoder", de_dim, cfg["decoder_depth"], cfg["decoder_mlp_ratio"], adaln=True)
    linear(f"{de['to_patches']}.adaLN_modulation.1", "decoder.final_adaLN", 2 * de_dim, de_dim)
    linear(f"{de['to_patches']}.proj", "decoder.proj_out", patch_in, de_dim)
    return {k: v.contiguous() for k, v in out.items()}, used


def _load_into(module: torch.nn.Module, state: dict, what: str):
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise OfficialCheckpointError(f"{what}: missing weights {missing[:5]}, unexpected weights {unexpected[:5]}")
    for k, v in state.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise OfficialCheckpointError(
                f"{what}: weight {k!r} has shape {tuple(v.shape)}, the config implies {tuple(expected[k].shape)}")
    module.load_state_dict(state, strict=True)


# ---------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------
def _read_vae_config(path: Path) -> dict:
    try:
        return read_json_object(path, "VAE config")
    except ValueError as e:
        raise OfficialCheckpointError(f"{e} (AutoencoderKL settings)") from e


def _load_vae(settings: dict, folder: Path, vae_tensors: dict, vae_override=None):
    from diffusers import AutoencoderKL

    if isinstance(vae_override, AutoencoderKL):
        return vae_override, "given AutoencoderKL"
    if vae_override is not None:
        # an explicit VAE replaces the one in model.safetensors entirely (config and weights)
        vae_tensors = {}
        hub_path = vae_override
        candidates = [Path(hub_path)]
    else:
        hub_path = settings["hf_hub_path"]
        # a relative hf_hub_path belongs to the checkpoint: look beside it before the working directory
        candidates = [] if hub_path is None else (
            [Path(hub_path)] if Path(hub_path).is_absolute() else [folder / str(hub_path), Path(hub_path)])
    vae_folder = None
    what = "the vae= argument" if vae_override is not None else "the config's vae.hf_hub_path"
    if hub_path is not None:
        for candidate in candidates:
            if candidate.is_dir():
                vae_folder = candidate
                break
            if candidate.exists():
                raise OfficialCheckpointError(f"VAE path {candidate} ({what}) is a file; pass the AutoencoderKL "
                                              f"folder (config.json + diffusion_pytorch_model.safetensors)")
        else:
            text = str(hub_path)
            if text.count("/") != 1 or text.startswith((".", "/", "~")) or Path(text).is_absolute():
                looked = " and ".join(str(c) for c in candidates)
                raise OfficialCheckpointError(f"VAE folder {text!r} ({what}) does not exist (looked for {looked}) "
                                              f"and is not a Hugging Face repo id (owner/name)")
            if vae_tensors and str(hub_path).count("/") == 1:
                # weights are in model.safetensors; only the small config is needed from the hub
                vae_folder = _resolve_folder(hub_path, allow_patterns=["config.json"])
            elif not vae_tensors:
                vae_folder = _resolve_folder(hub_path)
            else:
                raise OfficialCheckpointError(f"VAE folder {hub_path!r} not found next to {folder} or as a hub repo")
    if vae_tensors:
        if vae_folder is not None:
            cfg_path = vae_folder / "config.json"
            if not cfg_path.is_file():
                raise OfficialCheckpointError(f"VAE config {cfg_path} is missing")
            cfg = _read_vae_config(cfg_path)
        else:
            cfg_path = "the built-in base VAE config"
            cfg = dict(BASE_VAE_CONFIG, latent_channels=settings["latent_channels"])
        cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
        try:
            vae = AutoencoderKL.from_config(cfg)
        except Exception as e:  # wrong types or values in the file: diffusers fails somewhere inside
            raise OfficialCheckpointError(f"VAE config {cfg_path}: cannot build an AutoencoderKL from it "
                                          f"({type(e).__name__}: {e})") from e
        _load_into(vae, vae_tensors, "VAE weights in model.safetensors (vae.vae.*)")
        return vae, f"model.safetensors (config from {vae_folder or 'the built-in base config'})"
    if vae_folder is None:
        raise OfficialCheckpointError(
            "model.safetensors has no VAE weights (vae.vae.*) and the config's vae.hf_hub_path is null: "
            "pass vae=<AutoencoderKL folder or repo id>")
    cfg_path = vae_folder / "config.json"
    if cfg_path.is_file():
        _read_vae_config(cfg_path)  # a clear message for broken JSON or a wrong top-level type
    for weights in sorted(vae_folder.glob("*.safetensors")):
        try:
            bad = non_floating_weights(weights)
        except Exception as e:
            raise OfficialCheckpointError(f"{weights} is not a readable safetensors file (truncated or "
                                          f"corrupted?): {e}") from e
        if bad:
            raise OfficialCheckpointError(f"{weights}: weight {bad[0][0]!r} has dtype {bad[0][1]}; weights must "
                                          f"be floating point (a corrupted or mis-converted checkpoint?)")
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_folder), use_safetensors=True)
    except Exception as e:
        raise OfficialCheckpointError(f"could not load the AutoencoderKL from {vae_folder} (its config.json or "
                                      f"weights are invalid): {type(e).__name__}: {e}") from e
    return vae, str(vae_folder)


# ---------------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------------
def load_official(path_or_repo, vae=None, sample_posterior: bool | None = None) -> OfficialCheckpoint:
    """Read an official FlexTok checkpoint (folder or hub id) into our model + AutoencoderKL.

    vae: optional AutoencoderKL, or a folder / repo id to take it from instead of ``vae.hf_hub_path``.
    sample_posterior: override the config's ``vae.sample_posterior``.
    """
    folder = _resolve_folder(path_or_repo, allow_patterns=["config.json", "model.safetensors"])
    tensors, metadata = _read_safetensors(folder / "model.safetensors")
    _check_floating(tensors, str(folder / "model.safetensors"))
    config_path = folder / "config.json"
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text())  # dicts keep the file's order
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OfficialCheckpointError(f"{config_path} is not valid JSON: {e}") from e
        source = str(config_path)
    elif metadata:
        config = _config_from_metadata(metadata, folder / "model.safetensors")
        source = f"{folder / 'model.safetensors'} metadata"
    else:
        raise OfficialCheckpointError(f"{folder} has no config.json and model.safetensors carries no config metadata")

    try:
        model_config, vae_settings = parse_config(config)
    except OfficialCheckpointError as e:
        raise OfficialCheckpointError(f"{source}: {e}") from None
    if sample_posterior is not None:
        model_config["sample_posterior"] = bool(sample_posterior)

    notes = []
    vae_tensors = {k[len("vae.vae."):]: v for k, v in tensors.items() if k.startswith("vae.vae.")}
    rest = {k: v for k, v in tensors.items() if not k.startswith("vae.vae.")}
    state, used = map_state_dict(rest, vae_settings["module_names"], model_config)
    leftover = sorted(set(rest) - used)
    skipped = [k for k in leftover if TRAINING_ONLY_KEY.search(k)]
    unexpected = [k for k in leftover if k not in skipped]
    if unexpected:
        raise OfficialCheckpointError(
            f"model.safetensors has {len(unexpected)} weights the config does not explain, e.g. {unexpected[:3]}")
    if skipped:
        notes.append(f"skipped {len(skipped)} training-only REPA weights")

    model = FlexTokModel(**model_config)
    _load_into(model, state, "FlexTok weights")
    model.eval()

    vae_model, vae_source = _load_vae(vae_settings, folder, vae_tensors, vae)
    notes.append(f"VAE from {vae_source}")
    scaling = vae_settings["scaling_factor"]
    if scaling is None:
        scaling = vae_model.config.scaling_factor
    vae_model.register_to_config(scaling_factor=float(scaling))
    if getattr(vae_model.config, "shift_factor", None):
        notes.append("the VAE config's shift_factor is ignored, as in the release")
    vae_model.eval()
    return OfficialCheckpoint(model, vae_model, float(scaling), model_config["sample_posterior"],
                              vae_settings["dtype_override"], source, notes)
