"""Names of the released OmniFlow folder layout that scripts need before torch is imported."""
from pathlib import Path

# the transformer checkpoint holds a copy of flan-t5-large's encoder under this prefix
ENCODER_PREFIX = "text_decoder.encoder."
# how a tiny folder stores its transformer: one safetensors file, shards + index, or a .bin pickle
WEIGHT_FORMATS = ("safetensors", "sharded", "bin")
TINY_CONFIG_DIR = Path(__file__).resolve().parents[3] / "configs" / "omniflow_tiny"
