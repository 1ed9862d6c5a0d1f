"""OmniFlow (CVPR 2025) reimplementation that loads the released OmniFlow-v0.5 folder.

Main entry points (see README.md in this folder):
    load_omniflow(model_path, components=...)   -> OmniFlowComponents
    OmniFlowPipeline(components).image_to_text / text_to_text / audio_to_text / sample_text_latents
    OmniFlowTransformer.forward(...)            -> OmniFlowTransformerOutput (text_x0, text_hidden, ...)
    OmniFlowTextVAE.encode / decode_logits / generate, decoder_targets(tokenizer, texts)
"""
from ...runtime.lazy import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".checkpoint": ("load_ema_weights", "load_omniflow_weights", "omniflow_state_dict", "save_sharded_safetensors"),
    ".errors": ("CheckpointError", "MissingComponentError", "OmniFlowConfigError"),
    ".loading": ("COMPONENTS", "OmniFlowComponents", "load_omniflow"),
    ".pipeline": ("OmniFlowPipeline", "StreamInputs", "TextSample"),
    ".scheduler": ("FlowMatchEulerScheduler",),
    ".text_vae": ("OmniFlowTextVAE", "decoder_targets"),
    ".transformer": ("OmniFlowTransformer", "OmniFlowTransformerOutput"),
})
