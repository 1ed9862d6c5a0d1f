"""Rectified-flow core: training objective, condition dropout, guidance and ODE sampling."""
from .guidance import BRANCH_CONDITIONS, GuidanceScales, guided_velocity
from .rectified_flow import ConditionDropout, FlowLoss, FlowSample, RectifiedFlow, frame_differences
from .sampler import FlowSampler, SamplerConfigError, sample_in_windows

__all__ = [
    "BRANCH_CONDITIONS", "ConditionDropout", "FlowLoss", "FlowSample", "FlowSampler", "GuidanceScales",
    "RectifiedFlow", "SamplerConfigError", "frame_differences", "guided_velocity", "sample_in_windows",
]
