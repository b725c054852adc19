from .pipeline_flextok import FlexTokPipeline, FlexTokPipelineOutput
from .scheduling_flextok import FlexTokFlowScheduler

__all__ = ["FlexTokFlowScheduler", "FlexTokPipeline", "FlexTokPipelineOutput"]
