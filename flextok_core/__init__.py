"""FlexTok model: pure PyTorch + diffusers building blocks; knows nothing of pipelines or ComfyUI."""
from .ar import AR_PRESETS, FlexTokAR, cfg_logits, filter_logits, guidance_scales, sample_logits
from .decoder import FlexTokDecoder, RegisterSequences
from .encoder import FlexTokEncoder
from .fsq import FSQ
from .model import FlexTokModel
from .official import LICENSE_NOTICE, OfficialCheckpoint, OfficialCheckpointError, load_official
from .sampling import apg_velocity, cfg_velocity, flow_timesteps
from .vae import vae_decode, vae_encode

__all__ = [
    "AR_PRESETS", "FlexTokAR", "cfg_logits", "filter_logits", "guidance_scales", "sample_logits",
    "FSQ", "FlexTokDecoder", "FlexTokEncoder", "FlexTokModel", "LICENSE_NOTICE", "OfficialCheckpoint",
    "OfficialCheckpointError", "RegisterSequences", "apg_velocity", "cfg_velocity", "flow_timesteps",
    "load_official", "vae_decode", "vae_encode",
]
