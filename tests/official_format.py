"""Test helper: write a checkpoint in the official FlexTok release format from one of our models.

This is the inverse of ``flextok_core.official.map_state_dict`` / ``parse_config`` (written independently of
them, from the golden README, sections 2-4): our ``FlexTokModel`` keys -> official keys, our config -> the
official hydra config (built from the golden ``config.json`` as a template, so module names, order and every
other argument are exactly the release's), and the VAE either inside ``model.safetensors`` (``vae.vae.*``) or
as a separate diffusers ``AutoencoderKL`` folder named by ``vae.hf_hub_path``.

Everything is tiny (dim 64, depth 1, 12 registers, a 4-block VAE with 8-16 channels) so that one
write + load + forward takes a few tens of milliseconds.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

from flextok_kit.flextok_core import FlexTokModel

REPO_ROOT = Path(__file__).resolve().parents[1]


def _find_golden() -> Path:
    # shared/ sits beside the checkout (../shared); FLEXTOK_SHARED overrides it (as in conftest.py)
    shared = Path(os.environ.get("FLEXTOK_SHARED", REPO_ROOT.parent / "shared"))
    golden = shared / "golden" / "flextok_tiny"
    if not (golden / "config.json").is_file():
        raise FileNotFoundError(f"golden folder not found at {golden}; set FLEXTOK_SHARED to the shared/ folder")
    return golden


GOLDEN_DIR = _find_golden()
WRAPPER_TARGET = "flextok.flextok_wrapper.FlexTok"
ZERO_NULL_COND = "flextok.model.preprocessors.nullcond.ZeroNullCond"
LEARNED_NULL_COND = "flextok.model.preprocessors.nullcond.LearnedNullCond"

# Tiny sizes used by the tests: 32x32 images -> 4x4 latents -> 2x2 patches; tables support up to 64x64 images.
TINY = dict(
    latent_channels=16, patch_size=2, grid_size=(4, 4), num_registers=12, fsq_levels=(8, 8, 8, 5, 5, 5),
    encoder_dim=64, encoder_depth=1, encoder_head_dim=32, decoder_dim=64, decoder_depth=1, decoder_head_dim=32,
    null_condition="learned", adaln_expansion=2, time_embed_dim=256, max_timestep=1000.0, sample_posterior=True,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[8, 16, 16, 16], layers_per_block=1, act_fn="silu", norm_num_groups=8, latent_channels=16,
    sample_size=32, scaling_factor=0.75,
)


def golden_config() -> dict:
    """The golden ``config.json`` (execution order preserved)."""
    return json.loads((GOLDEN_DIR / "config.json").read_text())


# ---------------------------------------------------------------------------------------------------
# random tiny models
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Re-draw every parameter from a seeded generator (as the golden generator does): matrices N(0, 1/fan_in),
    biases N(0, 0.1^2), other vectors/tables N(0, 0.5^2). Zero-initialised heads and adaLN become non-zero.
    Buffers (the sin-cos tables) are kept as built."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        if p.dim() >= 2 and not name.endswith(("registers", "register_pos_embed")):
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        elif name.endswith("weight"):  # norm scales (VAE GroupNorms)
            p.copy_(1 + torch.randn(p.shape, generator=g) * 0.1)
        else:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return module


def random_model(seed: int = 0, **overrides) -> FlexTokModel:
    """A tiny random :class:`FlexTokModel` (``TINY`` with ``overrides``), in eval mode."""
    cfg = dict(TINY, **overrides)
    return randomize_(FlexTokModel(**cfg), seed).eval()


def random_vae(seed: int = 100, **overrides) -> AutoencoderKL:
    """A tiny random diffusers ``AutoencoderKL`` (f8, 16 latent channels), in eval mode."""
    return randomize_(AutoencoderKL(**dict(TINY_VAE, **overrides)), seed).eval()


def random_images(batch: int = 2, size: int = 32, seed: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------------------------------
# our model -> official state dict
# ---------------------------------------------------------------------------------------------------
ENC = "encoder.module_dict."
DEC = "decoder.module_dict."


def official_state_dict(model: FlexTokModel) -> dict:
    """Our ``FlexTokModel`` state dict -> the official key names and layouts (VAE not included).

    Every key of our state dict must be consumed: a new parameter without an official counterpart fails here.
    """
    ours = {k: v.detach().clone() for k, v in model.state_dict().items()}
    used = set()
    out = {}

    def get(key):
        used.add(key)
        return ours[key]

    def put(key, tensor):
        assert key not in out, key
        out[key] = tensor.contiguous().clone()

    def linear(src, dst, bias=True):
        put(f"{dst}.weight", get(f"{src}.weight"))
        if bias:
            put(f"{dst}.bias", get(f"{src}.bias"))

    def blocks(src, dst, depth, adaln):
        for i in range(depth):
            s, d = f"{src}.blocks.{i}", f"{dst}.blocks.{i}"
            wq, wk, wv = get(f"{s}.attn.qkv.weight").chunk(3, dim=0)
            put(f"{d}.attn.wq.weight", wq)
            put(f"{d}.attn.wk.weight", wk)
            put(f"{d}.attn.wv.weight", wv)
            put(f"{d}.attn.proj.weight", get(f"{s}.attn.proj.weight"))
            fc1, fc3 = get(f"{s}.mlp.gate_up.weight").chunk(2, dim=0)  # gate (SiLU branch), linear branch
            put(f"{d}.mlp.fc1.weight", fc1)
            put(f"{d}.mlp.fc3.weight", fc3)
            put(f"{d}.mlp.fc2.weight", get(f"{s}.mlp.down.weight"))
            if adaln:
                linear(f"{s}.adaLN", f"{d}.adaLN_modulation.1")

    c = model.config
    linear("encoder.patch_embed", ENC + "enc_patch_emb.patch_proj")
    put(ENC + "enc_posemb_module.posembs", get("encoder.pos_embed").permute(2, 0, 1)[None])  # [Gh,Gw,D]->[1,D,Gh,Gw]
    put(ENC + "enc_register_module.registers", get("encoder.registers"))
    blocks("encoder", ENC + "enc_transformer", c.encoder_depth, adaln=False)
    linear("encoder.to_latents", ENC + "enc_to_latents.proj")

    linear("decoder.from_latents", DEC + "dec_from_latents.proj")
    put(DEC + "dec_registers_posemb_module.posembs", get("decoder.register_pos_embed").t()[None, None])  # [N,D]->[1,1,D,N]
    put(DEC + "dec_nested_dropout.dropout_mask_token", get("decoder.mask_token"))
    if c.null_condition == "learned":
        put(DEC + "dec_latent_dropout.nullcond", get("decoder.null_cond"))
    linear("decoder.patch_embed", DEC + "dec_noise_patch_emb.patch_proj")
    put(DEC + "dec_patches_posemb_module.posembs", get("decoder.pos_embed").permute(2, 0, 1)[None])
    linear("decoder.time_embed.linear_1", DEC + "dec_time_embedder.mlp.0")
    linear("decoder.time_embed.linear_2", DEC + "dec_time_embedder.mlp.2")
    blocks("decoder", DEC + "dec_transformer", c.decoder_depth, adaln=True)
    linear("decoder.final_adaLN", DEC + "dec_to_patches.adaLN_modulation.1")
    linear("decoder.proj_out", DEC + "dec_to_patches.proj")

    left = sorted(set(ours) - used)
    assert not left, f"official_state_dict does not export {left}"
    return out


def vae_state_dict(vae: AutoencoderKL) -> dict:
    """The VAE as the release stores it inside ``model.safetensors``: ``vae.vae.<diffusers key>``."""
    return {f"vae.vae.{k}": v.detach().contiguous().clone() for k, v in vae.state_dict().items()}


# ---------------------------------------------------------------------------------------------------
# our config -> official config
# ---------------------------------------------------------------------------------------------------
def _set_dims(module_dict: dict, dim: int):
    for spec in module_dict.values():
        if "dim" in spec:
            spec["dim"] = dim


def official_config(
    model: FlexTokModel,
    *,
    hf_hub_path: str | None = "vae",
    scaling_factor: float | None = None,
    sample_posterior: bool | None = None,
    write_head_dim: bool | None = None,
    head_dims: tuple[int, int] | None = None,
    max_timestep: float | None = None,
) -> dict:
    """The official config of ``model`` (golden config.json with the values replaced), in execution order.

    ``write_head_dim``: None -> write ``head_dim`` only when it differs from the official default 64;
    ``head_dims``: write these (encoder, decoder) head dims instead of the model's (to build a *wrong* config);
    ``max_timestep`` / ``sample_posterior``: override the model's values (None: the model's).
    """
    c = model.config
    cfg = copy.deepcopy(golden_config())
    enc, dec = cfg["encoder"]["module_dict"], cfg["decoder"]["module_dict"]
    _set_dims(enc, c.encoder_dim)
    _set_dims(dec, c.decoder_dim)
    grid = [int(x) for x in c.grid_size]
    n = int(c.num_registers)

    vae = cfg["vae"]
    vae["latent_channels"] = c.latent_channels
    vae["scaling_factor"] = scaling_factor
    vae["hf_hub_path"] = hf_hub_path
    vae["sample_posterior"] = bool(c.sample_posterior if sample_posterior is None else sample_posterior)

    p = [c.patch_size, c.patch_size]
    enc["enc_patch_emb"].update(channels_in=c.latent_channels, patch_sizes=p)
    enc["enc_posemb_module"]["max_sizes"] = list(grid)
    enc["enc_register_module"].update(n_min=n, n_max=n)
    dec["dec_registers_posemb_module"]["max_sizes"] = [n]
    dec["dec_noise_patch_emb"].update(channels_in=c.latent_channels, patch_sizes=p)
    dec["dec_patches_posemb_module"]["max_sizes"] = list(grid)
    dec["dec_to_patches"].update(channels_out=c.latent_channels, patch_sizes=p)
    dec["dec_time_embedder"].update(frequency_embedding_size=c.time_embed_dim,
                                    max_timestep=float(c.max_timestep if max_timestep is None else max_timestep))
    dec["dec_transformer"]["adaLN_expansion"] = c.adaln_expansion
    enc["enc_transformer"]["depth"] = c.encoder_depth
    dec["dec_transformer"]["depth"] = c.decoder_depth
    enc_hd, dec_hd = head_dims or (c.encoder_head_dim, c.decoder_head_dim)
    for spec, hd in ((enc["enc_transformer"], enc_hd), (dec["dec_transformer"], dec_hd)):
        if write_head_dim or (write_head_dim is None and hd != 64):
            spec["head_dim"] = int(hd)  # appended after the template's arguments; argument order is irrelevant
    cfg["regularizer"]["levels"] = [int(x) for x in c.fsq_levels]
    cfg["pipeline"]["out_channels"] = c.latent_channels

    null = dec["dec_latent_dropout"]
    if c.null_condition == "zero":
        # ZeroNullCond has no vector (and no dim): keep the wiring arguments only
        dec["dec_latent_dropout"] = {"_target_": ZERO_NULL_COND, **{k: v for k, v in null.items()
                                                                  if k not in ("_target_", "dim")}}
    else:
        null["_target_"] = LEARNED_NULL_COND
    return cfg


def config_to_metadata(config: dict) -> dict:
    """The release's safetensors metadata: one entry per top-level key, each the Python repr of the sub-dict."""
    md = {k: repr(v) for k, v in config.items()}
    md["_target_"] = WRAPPER_TARGET
    return md


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------
def save_official(folder, tensors: dict, config: dict | None, *, config_json: bool = True, metadata: bool = True,
                  sort_keys: bool = False, vae_folder: AutoencoderKL | None = None, vae_dir: str = "vae") -> Path:
    """Low level: write ``tensors`` (official keys) and ``config`` into ``folder``.

    config_json: write ``config.json`` (in the config's order unless ``sort_keys``, which mimics the hub mixin's
    ``json.dumps(sort_keys=True)``); metadata: store the config in the safetensors metadata too;
    vae_folder: also save this AutoencoderKL as a diffusers folder ``folder/vae_dir``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    md = config_to_metadata(config) if (metadata and config is not None) else None
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"), metadata=md)
    if config_json and config is not None:
        (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=sort_keys))
    if vae_folder is not None:
        vae_folder.save_pretrained(str(folder / vae_dir), safe_serialization=True)
    return folder


def write_official(
    folder,
    model: FlexTokModel,
    vae: AutoencoderKL,
    *,
    vae_in_model: bool = True,
    vae_dir: str | None = "vae",
    folder_vae: AutoencoderKL | None = None,
    hf_hub_path: str | None = "__vae_dir__",
    config_location: str = "both",
    scaling_factor: float | None = None,
    extra_tensors: dict | None = None,
    **config_kwargs,
) -> Path:
    """Write ``model`` + ``vae`` as an official FlexTok checkpoint folder.

    vae_in_model: put the VAE weights into model.safetensors (``vae.vae.*``);
    vae_dir: also write a diffusers AutoencoderKL folder at ``folder/vae_dir`` (None: none) holding
    ``folder_vae`` (default: ``vae`` itself; pass another VAE to tell the two sources apart);
    hf_hub_path: the config's ``vae.hf_hub_path`` (default: ``vae_dir``);
    config_location: "json" (config.json only), "metadata" (safetensors metadata only) or "both";
    scaling_factor: the config's ``vae.scaling_factor`` override (None: use the VAE config's);
    extra_tensors: additional entries for model.safetensors (e.g. training-only REPA weights);
    config_kwargs: passed to :func:`official_config`.
    """
    assert config_location in ("json", "metadata", "both"), config_location
    if hf_hub_path == "__vae_dir__":
        hf_hub_path = vae_dir
    config = official_config(model, hf_hub_path=hf_hub_path, scaling_factor=scaling_factor, **config_kwargs)
    tensors = official_state_dict(model)
    if vae_in_model:
        tensors.update(vae_state_dict(vae))
    tensors.update(extra_tensors or {})
    return save_official(folder, tensors, config, config_json=config_location in ("json", "both"),
                         metadata=config_location in ("metadata", "both"),
                         vae_folder=(folder_vae or vae) if vae_dir is not None else None, vae_dir=vae_dir or "vae")


# ---------------------------------------------------------------------------------------------------
# evaluating a model the way the tests compare them
# ---------------------------------------------------------------------------------------------------
def decoder_inputs(model: FlexTokModel, batch: int = 2, size: int = 4, seed: int = 3):
    """Fixed noised latents ``[B,C,size,size]``, t ``[B]`` and ragged token ids/lengths for velocity checks."""
    g = torch.Generator().manual_seed(seed)
    n = model.config.num_registers
    x_t = torch.randn(batch, model.config.latent_channels, size, size, generator=g)
    t = torch.tensor([0.7, 0.3][:batch] + [0.5] * max(0, batch - 2))
    ids = torch.randint(0, model.vocab_size, (batch, n), generator=g)
    keep_k = torch.tensor([n, 3][:batch] + [1] * max(0, batch - 2))
    return x_t, t, ids, keep_k


@torch.no_grad()
def velocities(model: FlexTokModel, x_t, t, ids, keep_k, fast: bool = True):
    """(conditional, unconditional) decoder velocities with guidance registers."""
    regs = model.prepare_registers(ids, keep_k, guidance=True, fast=fast)
    v = model(x_t, t, regs)
    return v.chunk(2)
