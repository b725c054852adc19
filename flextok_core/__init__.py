"""FlexTok model: pure PyTorch + diffusers building blocks; knows nothing of pipelines or ComfyUI.

One file per paper concept: vae, encoder (the resampler), registers, fsq, nested_dropout, decoder (rectified flow),
sampling (the Euler grid), guidance (CFG, APG), ar; the official release reader in official.
"""
from .ar import AR_PRESETS, FlexTokAR, filter_logits, sample_logits
from .decoder import FlexTokDecoder
from .encoder import FlexTokEncoder
from .fsq import FSQ
from .guidance import apg_velocity, cfg_logits, cfg_velocity, guidance_scales
from .model import FlexTokModel
from .nested_dropout import sample_keep_k
from .official import LICENSE_NOTICE, OfficialCheckpoint, OfficialCheckpointError, load_official
from .registers import RegisterSequences
from .sampling import flow_timesteps
from .vae import vae_decode, vae_encode

__all__ = [
    "AR_PRESETS", "FlexTokAR", "cfg_logits", "filter_logits", "guidance_scales", "sample_logits",
    "FSQ", "FlexTokDecoder", "FlexTokEncoder", "FlexTokModel", "LICENSE_NOTICE", "OfficialCheckpoint",
    "OfficialCheckpointError", "RegisterSequences", "apg_velocity", "cfg_velocity", "flow_timesteps",
    "load_official", "sample_keep_k", "vae_decode", "vae_encode",
]
