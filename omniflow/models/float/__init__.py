"""FLOAT: motion auto-encoder, audio/emotion condition encoders, Flow Matching Transformer."""
from ...runtime.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".audio": ("AudioEncoder", "AudioFeatureError", "EmotionEncoder", "SpeechEmotionClassifier", "WaveformNormalizer",
               "load_audio_backbone", "load_emotion_classifier", "release_backbone_configs"),
    ".config": ("EMOTION_LABELS", "PRESETS", "FloatConfig", "FloatConfigError"),
    ".fmt": ("FlowMatchingTransformer", "FMTShapeError", "band_mask"),
    ".generator": ("FloatMotionGenerator",),
    ".io": ("CheckpointMismatchError", "read_release_checkpoint"),
    ".model": ("FLOAT",),
    ".motion": ("MotionAutoEncoder",),
})
