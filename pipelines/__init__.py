from .pipeline_flextok import FlexTokPipeline
from .scheduling_flextok import FlexTokFlowScheduler, flextok_sigmas

__all__ = ["FlexTokFlowScheduler", "FlexTokPipeline", "flextok_sigmas"]
