"""The names of the files in a converted model folder."""

from __future__ import annotations

CHAT_CONFIG_FILE = "mlc-chat-config.json"
INDEX_FILE = "tensor-cache.json"
SHARD_PATTERN = "params_shard_*.bin"
# The tokenizer files of a Hugging Face checkpoint that gen-config copies next to the weights.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "special_tokens_map.json",
)
# Everything convert-weight and gen-config write; a folder holding only these is a previous output.
MODEL_DIR_PATTERNS = (
    SHARD_PATTERN,
    INDEX_FILE,
    CHAT_CONFIG_FILE,
    *TOKENIZER_FILES,
    "generation_config.json",
)
