"""OmniFlow (CVPR 2025) reimplementation that loads the released OmniFlow-v0.5 folder.

Main entry points (see README.md in this folder):
    load_omniflow(model_path, components=...)   -> OmniFlowComponents
    OmniFlowPipeline(components).image_to_text / text_to_text / audio_to_text / sample_text_latents
    OmniFlowTransformer.forward(...)            -> OmniFlowTransformerOutput (text_x0, text_hidden, ...)
    OmniFlowTextVAE.encode / decode_logits / generate, decoder_targets(tokenizer, texts)
"""
from .checkpoint import load_ema_weights, load_omniflow_weights, omniflow_state_dict, save_sharded_safetensors
from .errors import CheckpointError, MissingComponentError, OmniFlowConfigError
from .loading import COMPONENTS, OmniFlowComponents, load_omniflow
from .pipeline import OmniFlowPipeline, StreamInputs, TextSample
from .scheduler import FlowMatchEulerScheduler
from .text_vae import OmniFlowTextVAE, decoder_targets
from .transformer import OmniFlowTransformer, OmniFlowTransformerOutput

__all__ = [
    "COMPONENTS", "CheckpointError", "FlowMatchEulerScheduler", "MissingComponentError", "OmniFlowComponents",
    "OmniFlowConfigError", "OmniFlowPipeline", "OmniFlowTextVAE", "OmniFlowTransformer",
    "OmniFlowTransformerOutput", "StreamInputs", "TextSample", "decoder_targets", "load_ema_weights",
    "load_omniflow", "load_omniflow_weights", "omniflow_state_dict", "save_sharded_safetensors",
]
