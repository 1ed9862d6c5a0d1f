"""FLOAT: motion auto-encoder, audio/emotion condition encoders, Flow Matching Transformer."""
from .audio import (EMOTION_LABELS, AudioEncoder, AudioFeatureError, EmotionEncoder, SpeechEmotionClassifier,
                    release_backbone_configs)
from .config import PRESETS, FloatConfig, FloatConfigError
from .fmt import FlowMatchingTransformer, FMTShapeError, band_mask
from .io import CheckpointMismatchError, read_release_checkpoint
from .model import FLOAT
from .motion import MotionAutoEncoder

__all__ = [
    "EMOTION_LABELS", "FLOAT", "PRESETS", "AudioEncoder", "AudioFeatureError", "CheckpointMismatchError",
    "EmotionEncoder", "FMTShapeError", "FloatConfig", "FloatConfigError", "FlowMatchingTransformer",
    "MotionAutoEncoder", "SpeechEmotionClassifier", "band_mask", "read_release_checkpoint",
    "release_backbone_configs",
]
