"""A tiny random checkpoint with Megrez's structure, for the demo and the tests (no download needed).

It is a Hugging Face LLaMA folder like the real one: config.json, model.safetensors, and a byte-level BPE
tokenizer.json (Qwen2-style pre-tokenizer) carrying Megrez's special tokens and chat template. Sizes are
deliberately awkward: inputs that are not a multiple of 32, a vocabulary that is not a multiple of 8,
one KV head.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .conversation import MEGREZ_JINJA_TEMPLATE

# Megrez's special tokens in id order (the real tokenizer has them at 120000-05, 120014-16, 120020-25);
# the tiny tokenizer gives them ids after its vocabulary.
MEGREZ_SPECIAL_TOKENS = (
    "<|eos|>",
    "<|unk|>",
    "<|pad|>",
    "<|role_start|>",
    "<|role_end|>",
    "<|turn_end|>",
    "<|image_start|>",
    "<|image_end|>",
    "<|image_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<|function_start|>",
    "<|function_end|>",
    "<|turn_end>",
)
# Qwen2's pre-tokenizer split: contractions, letters, single digits, punctuation runs, newlines, spaces.
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
TRAINING_TEXT = """\
Megrez is a small language model that runs on your own device. It answers questions in English and Chinese.
The quick brown fox jumps over the lazy dog. Hello, world! How are you today? I am fine, thank you.
Large language models predict the next token. A token can be a word, a part of a word, or a single byte.
你好，世界！今天天气很好。我们一起去公园散步吧。无问芯穹发布了端侧大模型。
人工智能正在改变我们的生活。请用中文回答这个问题。谢谢你的帮助。
Emoji are fun 😀🎉🚀 and so are numbers: 1 2 3 42 2024 3.14159.
def main():\n    print("hello")\n    return 0\n
"""


@dataclass(frozen=True)
class TinyShape:
    hidden_size: int = 72  # not a multiple of 32: the last int4 group is zero-padded
    intermediate_size: int = 100  # down_proj's input width, also not a multiple of 32
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 18
    extra_vocab: int = 7  # unused rows after the tokenizer's ids, so the vocabulary is not a multiple of 8
    bpe_vocab: int = 300
    max_position_embeddings: int = 512
    rope_theta: float = 5_000_000.0
    rms_norm_eps: float = 1e-5


def build_tokenizer(bpe_vocab: int = 300, texts: Iterable[str] | None = None):
    """Train a byte-level BPE on `texts` (the text above by default) and add Megrez's special tokens after
    it (deterministic)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_vocab, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines() if texts is None else texts, trainer=trainer)
    tokenizer.add_special_tokens(list(MEGREZ_SPECIAL_TOKENS))
    return tokenizer


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": None,
        "eos_token": "<|turn_end|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|unk|>",
        "model_max_length": 32768,
        "chat_template": MEGREZ_JINJA_TEMPLATE,
    }


def random_llama_weights(shape: TinyShape, vocab_size: int, tie: bool, seed: int) -> dict[str, np.ndarray]:
    """Random weights scaled so logits spread over several units (greedy choices are not near-ties)."""
    rng = np.random.default_rng(seed)
    h, i = shape.hidden_size, shape.intermediate_size
    q, kv = shape.num_attention_heads * shape.head_dim, shape.num_key_value_heads * shape.head_dim

    def matrix(rows: int, cols: int, gain: float = 1.0) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) * gain / np.sqrt(cols)).astype(np.float32)

    weights = {"model.embed_tokens.weight": rng.standard_normal((vocab_size, h)).astype(np.float32)}
    for n in range(shape.num_hidden_layers):
        p = f"model.layers.{n}"
        weights |= {
            f"{p}.self_attn.q_proj.weight": matrix(q, h, 2.0),
            f"{p}.self_attn.k_proj.weight": matrix(kv, h, 2.0),
            f"{p}.self_attn.v_proj.weight": matrix(kv, h),
            f"{p}.self_attn.o_proj.weight": matrix(h, q),
            f"{p}.mlp.gate_proj.weight": matrix(i, h),
            f"{p}.mlp.up_proj.weight": matrix(i, h),
            f"{p}.mlp.down_proj.weight": matrix(h, i),
            f"{p}.input_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
            f"{p}.post_attention_layernorm.weight": (1 + 0.1 * rng.standard_normal(h)).astype(np.float32),
        }
    weights["model.norm.weight"] = (1 + 0.1 * rng.standard_normal(h)).astype(np.float32)
    if not tie:
        weights["lm_head.weight"] = matrix(vocab_size, h, 4.0)
    return weights


def hf_config(shape: TinyShape, vocab_size: int, tie: bool, eos_id: int, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden_size,
        "intermediate_size": shape.intermediate_size,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.head_dim,
        "vocab_size": vocab_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_theta": shape.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie,
        "bos_token_id": None,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
    }


def make_tiny_checkpoint(
    out_dir: Path, *, tie_word_embeddings: bool = False, seed: int = 0, shape: TinyShape | None = None
) -> Path:
    """Write a tiny float32 Megrez-shaped HF checkpoint folder; returns it."""
    from safetensors.numpy import save_file

    shape = shape or TinyShape()
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.bpe_vocab)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size() + shape.extra_vocab
    eos_id = tokenizer.token_to_id("<|turn_end|>")
    config = hf_config(shape, vocab_size, tie_word_embeddings, eos_id, "float32")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False)
    )
    weights = random_llama_weights(shape, vocab_size, tie_word_embeddings, seed)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
