from .pipeline_dp_ldm import DPLDMPipeline

__all__ = ["DPLDMPipeline"]
