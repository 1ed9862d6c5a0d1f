"""FLOAT: motion auto-encoder, audio/emotion condition encoders, Flow Matching Transformer."""
from .audio import (EMOTION_LABELS, AudioEncoder, AudioFeatureError, EmotionEncoder, SpeechEmotionClassifier,
                    WaveformNormalizer, load_audio_backbone, load_emotion_classifier, release_backbone_configs)
from .config import PRESETS, FloatConfig, FloatConfigError
from .fmt import FlowMatchingTransformer, FMTShapeError, band_mask
from .generator import FloatMotionGenerator
from .io import CheckpointMismatchError, read_release_checkpoint
from .model import FLOAT
from .motion import MotionAutoEncoder

__all__ = [
    "EMOTION_LABELS", "FLOAT", "PRESETS", "AudioEncoder", "AudioFeatureError", "CheckpointMismatchError",
    "EmotionEncoder", "FMTShapeError", "FloatConfig", "FloatConfigError", "FloatMotionGenerator",
    "FlowMatchingTransformer", "MotionAutoEncoder", "SpeechEmotionClassifier", "WaveformNormalizer", "band_mask",
    "load_audio_backbone", "load_emotion_classifier", "read_release_checkpoint", "release_backbone_configs",
]
