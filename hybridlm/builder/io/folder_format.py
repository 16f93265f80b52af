"""What a model folder holds: the file names and the format of hybridlm.json."""
from __future__ import annotations

from hybridlm.tokenizer import TOKENIZER_FILE

FORMAT = "hybridlm-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "spec.yaml"
META_FILE = "hybridlm.json"
HF_CONFIG_FILE = "config.json"
MAX_META_BYTES = 64 << 20
OWN_FILES = (WEIGHTS_FILE, SPEC_FILE, META_FILE, HF_CONFIG_FILE, TOKENIZER_FILE)  # all a save may write
