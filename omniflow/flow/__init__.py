"""Rectified-flow core: training objective, condition dropout, guidance and ODE sampling."""
from ..runtime.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".guidance": ("BRANCH_CONDITIONS", "GuidanceScales", "guided_velocity"),
    ".rectified_flow": ("ConditionDropout", "FlowLoss", "FlowSample", "RectifiedFlow", "frame_differences"),
    ".sampler": ("FlowSampler", "SamplerConfigError", "sample_in_windows"),
})
