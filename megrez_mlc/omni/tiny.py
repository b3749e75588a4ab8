"""A tiny random Megrez-3B-Omni checkpoint, laid out like the real one, for `demo --omni` and the tests.

config.json keeps the LLM's fields at the top level (here in transformers 5's `rope_parameters` layout)
beside `vision_config`, `query_num` and `audio_config`; the tensors carry the vendor's names (`llm.*`,
`vision.vpm.*`, `vision.resampler.*`, `audio.audio.*`). Sizes differ from every default: 13 position
buckets per side, 16 queries, 112-pixel slices, LayerNorm eps 1e-5; 80 mel bins (Whisper-large-v3 has 128),
an audio width of 52 in 4 heads of 13.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..tiny import TinyShape, _tokenizer_config, build_tokenizer, hf_config, random_llama_weights
from .config import OMNI_ARCHITECTURE, OMNI_MODEL_TYPE

OMNI_LLM_SHAPE = TinyShape(
    hidden_size=264,  # 2 resampler heads of 132; not a multiple of 32
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=66,
    max_position_embeddings=1024,
    rope_theta=1_234_567.0,
)


@dataclass(frozen=True)
class TinyVision:
    hidden_size: int = 60
    intermediate_size: int = 100
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    image_size: int = 182  # 13 position buckets per side
    patch_size: int = 14
    layer_norm_eps: float = 1e-5
    query_num: int = 16
    scale_resolution: int = 112  # 8 x 8 patches per slice
    max_slice_nums: int = 9

    def vision_config(self) -> dict:
        return {
            "model_type": "siglip_vision_model",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "layer_norm_eps": self.layer_norm_eps,
            "hidden_act": "gelu_pytorch_tanh",
            "num_channels": 3,
        }


def random_vision_weights(vision: TinyVision, llm_hidden: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, i, p, e = vision.hidden_size, vision.intermediate_size, vision.patch_size, llm_hidden

    def matrix(*shape: int, gain: float = 1.0) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * gain / np.sqrt(fan_in)).astype(np.float32)

    def vector(n: int, scale: float = 0.1, base: float = 0.0) -> np.ndarray:
        return (base + scale * rng.standard_normal(n)).astype(np.float32)

    vpm, res = "vision.vpm", "vision.resampler"
    weights = {
        f"{vpm}.embeddings.patch_embedding.weight": matrix(h, 3, p, p, gain=2.0),
        f"{vpm}.embeddings.patch_embedding.bias": vector(h),
        f"{vpm}.embeddings.position_embedding.weight": matrix((vision.image_size // p) ** 2, h, gain=4.0),
    }
    for n in range(vision.num_hidden_layers):
        layer = f"{vpm}.encoder.layers.{n}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            weights[f"{layer}.self_attn.{proj}.weight"] = matrix(
                h, h, gain=2.0 if proj in ("q_proj", "k_proj") else 1.0
            )
            weights[f"{layer}.self_attn.{proj}.bias"] = vector(h)
        weights |= {
            f"{layer}.layer_norm1.weight": vector(h, base=1.0),
            f"{layer}.layer_norm1.bias": vector(h),
            f"{layer}.layer_norm2.weight": vector(h, base=1.0),
            f"{layer}.layer_norm2.bias": vector(h),
            f"{layer}.mlp.fc1.weight": matrix(i, h),
            f"{layer}.mlp.fc1.bias": vector(i),
            f"{layer}.mlp.fc2.weight": matrix(h, i),
            f"{layer}.mlp.fc2.bias": vector(h),
        }
    weights |= {
        f"{vpm}.post_layernorm.weight": vector(h, base=1.0),
        f"{vpm}.post_layernorm.bias": vector(h),
        f"{res}.query": (0.5 * rng.standard_normal((vision.query_num, e))).astype(np.float32),
        f"{res}.kv_proj.weight": matrix(e, h),
        f"{res}.attn.in_proj_weight": matrix(3 * e, e, gain=2.0),
        f"{res}.attn.in_proj_bias": vector(3 * e),
        f"{res}.attn.out_proj.weight": matrix(e, e),
        f"{res}.attn.out_proj.bias": vector(e),
        f"{res}.proj": matrix(e, e),
    }
    for norm in ("ln_q", "ln_kv", "ln_post"):
        weights[f"{res}.{norm}.weight"] = vector(e, base=1.0)
        weights[f"{res}.{norm}.bias"] = vector(e)
    return weights


@dataclass(frozen=True)
class TinyAudio:
    n_mels: int = 80
    n_ctx: int = 1500  # Whisper's 30-second window
    n_state: int = 52
    n_head: int = 4
    n_layer: int = 2

    def audio_config(self, output_dim: int) -> dict:
        fields = {k: getattr(self, k) for k in ("n_mels", "n_ctx", "n_state", "n_head", "n_layer")}
        return {**fields, "output_dim": output_dim, "avg_pool": True, "add_audio_bos_eos_token": True}


def random_audio_weights(audio: TinyAudio, llm_hidden: int, seed: int) -> dict[str, np.ndarray]:
    """The audio encoder's tensors under the checkpoint's names and layouts (Conv1d weights [out, in, 3])."""
    rng = np.random.default_rng(seed)
    w, m = audio.n_state, audio.n_mels

    def matrix(*shape: int, gain: float = 1.0) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * gain / np.sqrt(fan_in)).astype(np.float32)

    def vector(n: int, base: float = 0.0) -> np.ndarray:
        return (base + 0.1 * rng.standard_normal(n)).astype(np.float32)

    a = "audio.audio"
    weights = {
        f"{a}.conv1.weight": matrix(w, m, 3, gain=2.0),
        f"{a}.conv1.bias": vector(w),
        f"{a}.conv2.weight": matrix(w, w, 3, gain=2.0),
        f"{a}.conv2.bias": vector(w),
        f"{a}.positional_embedding": rng.standard_normal((audio.n_ctx, w)).astype(np.float32),
    }
    for n in range(audio.n_layer):
        block = f"{a}.blocks.{n}"
        weights |= {
            f"{block}.attn_ln.weight": vector(w, base=1.0),
            f"{block}.attn_ln.bias": vector(w),
            f"{block}.attn.query.weight": matrix(w, w, gain=2.0),
            f"{block}.attn.query.bias": vector(w),
            f"{block}.attn.key.weight": matrix(w, w, gain=2.0),
            f"{block}.attn.value.weight": matrix(w, w),
            f"{block}.attn.value.bias": vector(w),
            f"{block}.attn.out.weight": matrix(w, w),
            f"{block}.attn.out.bias": vector(w),
            f"{block}.mlp_ln.weight": vector(w, base=1.0),
            f"{block}.mlp_ln.bias": vector(w),
            f"{block}.mlp.0.weight": matrix(4 * w, w),
            f"{block}.mlp.0.bias": vector(4 * w),
            f"{block}.mlp.2.weight": matrix(w, 4 * w),
            f"{block}.mlp.2.bias": vector(w),
        }
    return weights | {
        f"{a}.ln_post.weight": vector(w, base=1.0),
        f"{a}.ln_post.bias": vector(w),
        f"{a}.proj.weight": matrix(llm_hidden, w),
        f"{a}.proj.bias": vector(llm_hidden),
        f"{a}.audio_bos_eos_token.weight": (0.5 * rng.standard_normal((2, llm_hidden))).astype(np.float32),
    }


def make_tiny_omni_checkpoint(
    out_dir: Path,
    *,
    seed: int = 0,
    vision: TinyVision | None = None,
    audio: TinyAudio | None = None,
    shape: TinyShape | None = None,
) -> Path:
    """Write a tiny float32 Omni-shaped HF checkpoint folder; returns it."""
    from safetensors.numpy import save_file

    vision = vision or TinyVision()
    audio = audio or TinyAudio()
    shape = shape or OMNI_LLM_SHAPE
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(shape.bpe_vocab)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    vocab_size = tokenizer.get_vocab_size() + shape.extra_vocab
    config = hf_config(shape, vocab_size, False, tokenizer.token_to_id("<|turn_end|>"), "float32")
    config["rope_parameters"] = {"rope_theta": config.pop("rope_theta"), "rope_type": "default"}
    config |= {
        "architectures": [OMNI_ARCHITECTURE],
        "model_type": OMNI_MODEL_TYPE,
        "vision_config": vision.vision_config(),
        "query_num": vision.query_num,
        "patch_size": vision.patch_size,
        "drop_vision_last_layer": False,
        "audio_config": audio.audio_config(shape.hidden_size),
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "preprocessor_config.json").write_text(
        json.dumps({"scale_resolution": vision.scale_resolution, "max_slice_nums": vision.max_slice_nums})
    )
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(_tokenizer_config(), indent=2, ensure_ascii=False)
    )
    llm = random_llama_weights(shape, vocab_size, False, seed)
    weights = {f"llm.{name}": value for name, value in llm.items()}
    weights |= random_vision_weights(vision, shape.hidden_size, seed + 1)
    weights |= random_audio_weights(audio, shape.hidden_size, seed + 2)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir
