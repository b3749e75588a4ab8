"""RoPE: config.json in both layouts read as transformers reads it, and the compiled RoPE kernel rotating
queries and keys as transformers' LlamaRotaryEmbedding does, at positions far beyond what the tiny models
generate (where linear, llama3 and yarn scaling differ most from plain RoPE)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import tvm
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from megrez_mlc.compile.rope_kernel import split_rotary
from megrez_mlc.config import ModelConfig
from megrez_mlc.errors import MegrezError
from megrez_mlc.rope import inv_freq_reference

ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.5},
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 1024,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048},
    "yarn-untruncated-mscale": {
        "rope_type": "yarn",
        "factor": 3.0,
        "original_max_position_embeddings": 1000,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "truncate": False,
        "mscale": 1.5,
        "mscale_all_dim": 0.5,
    },
    "yarn-attention-factor": {
        "rope_type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": 4096,
        "attention_factor": 0.8,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
}


def llama_config(rope: dict, head_dim: int, theta: float = 5e5) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4 * head_dim,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        intermediate_size=16,
        num_hidden_layers=1,
        vocab_size=16,
        max_position_embeddings=8192,
        rope_parameters={"rope_theta": theta, **rope},
    )


@pytest.mark.parametrize("head_dim", [18, 64, 128])
@pytest.mark.parametrize("name", list(ROPES))
def test_frequencies_equal_transformers(name: str, head_dim: int) -> None:
    hf = llama_config(ROPES[name], head_dim)
    ours = ModelConfig.from_hf_dict(hf.to_dict())
    theirs = LlamaRotaryEmbedding(hf)
    expected = theirs.inv_freq.numpy()
    got = inv_freq_reference(ours.rope_scaling, ours.rope_theta, head_dim)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert ours.rope_scaling.attention_factor == pytest.approx(theirs.attention_scaling, rel=1e-12)


@pytest.mark.parametrize("name", list(ROPES))
def test_compiled_kernel_rotates_as_transformers(name: str) -> None:
    head_dim, q_heads, kv_heads = 80, 4, 2
    hf = llama_config(ROPES[name], head_dim, theta=1e6)
    config = ModelConfig.from_hf_dict(hf.to_dict())
    kernel = tvm.compile(split_rotary(config, "float32"), target=tvm.target.Target({"kind": "llvm"}))
    rng = np.random.default_rng(0)
    positions = np.sort(rng.choice(8192, size=37, replace=False)).astype(np.int32)
    qkv = rng.standard_normal((len(positions), q_heads + 2 * kv_heads, head_dim)).astype(np.float32)
    outputs = [
        tvm.runtime.tensor(np.zeros((len(positions), heads, head_dim), np.float32))
        for heads in (q_heads, kv_heads, kv_heads)
    ]
    kernel(tvm.runtime.tensor(qkv), tvm.runtime.tensor(positions), *outputs, 1)
    q, k, v = (out.numpy() for out in outputs)

    rotary = LlamaRotaryEmbedding(hf)
    x = torch.from_numpy(qkv).transpose(0, 1)[None]  # [1, heads, seq, head_dim]
    cos, sin = rotary(x, torch.from_numpy(positions.astype(np.int64))[None])
    q_ref, k_ref = apply_rotary_pos_emb(x[:, :q_heads], x[:, q_heads : q_heads + kv_heads], cos, sin)
    # float32 angles of up to 8192 radians carry ~5e-4 absolute error either way (TVM's and torch's sin/cos)
    np.testing.assert_allclose(q, q_ref[0].transpose(0, 1).numpy(), atol=2e-3)
    np.testing.assert_allclose(k, k_ref[0].transpose(0, 1).numpy(), atol=2e-3)
    np.testing.assert_array_equal(v, qkv[:, q_heads + kv_heads :])


def test_v4_and_v5_layouts_read_alike() -> None:
    for rope in ROPES.values():
        v5 = llama_config(rope, 64).to_dict()
        v4 = json.loads(json.dumps(v5))
        params = v4.pop("rope_parameters")
        v4["rope_theta"] = params.pop("rope_theta")
        kind = params.pop("rope_type")
        v4["rope_scaling"] = {"type": kind, **params} if kind != "default" else None
        assert ModelConfig.from_hf_dict(v4) == ModelConfig.from_hf_dict(v5)


def test_theta_of_a_transformers_5_config_is_read() -> None:
    """The bug that started this: rope_parameters' theta ignored, 10000 used instead."""
    saved = llama_config({"rope_type": "default"}, 64, theta=5e6).to_dict()
    assert "rope_theta" not in saved
    assert ModelConfig.from_hf_dict(saved).rope_theta == 5e6


def test_dynamic_rope_holds_the_context_to_max_position_embeddings() -> None:
    config = ModelConfig.from_hf_dict(llama_config(ROPES["dynamic"], 64).to_dict())
    assert config.context_window_size == 8192
    with pytest.raises(MegrezError, match="longer than dynamic RoPE's max_position_embeddings"):
        config.replace(context_window_size=8193)
    assert config.replace(context_window_size=4096).context_window_size == 4096


@pytest.mark.parametrize(
    ("rope", "message"),
    [
        ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}, "RoPE type 'longrope'"),
        ({"rope_type": "llama4", "factor": 8.0}, "RoPE type 'llama4'"),
        ({"rope_type": "linear"}, "lacks rope factor"),
        ({"rope_type": "linear", "factor": -2.0}, "positive factor"),
        ({"rope_type": "linear", "factor": "2"}, "rope factor must be a number"),
        (
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
            "high_freq",
        ),
        ({"rope_type": "default", "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
        ({"rope_type": "default", "rope_theta": 0.5}, "rope_theta must be greater than 1"),
    ],
)
def test_unsupported_ropes_are_refused(rope: dict, message: str) -> None:
    hf = llama_config({"rope_type": "default"}, 64).to_dict()
    hf["rope_parameters"] = {"rope_theta": 1e4, **rope}
    with pytest.raises(MegrezError, match=message):
        ModelConfig.from_hf_dict(hf)
