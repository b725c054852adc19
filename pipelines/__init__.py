from .pipeline_flextok import FlexTokPipeline

__all__ = ["FlexTokPipeline"]
