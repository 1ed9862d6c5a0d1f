"""OmniFlow research-training suite: shared runtime, data builders, models and metrics."""
__version__ = "0.1.0"
