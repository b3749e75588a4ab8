"""Shape sweep: checkpoints that transformers itself builds and saves, with every config field that changes
the math set away from its default somewhere, converted, compiled for the CPU and run greedily against
transformers.

Each configuration varies the shape (odd and prime vocabularies, hidden and intermediate sizes that are not
multiples of 8 or 32, head_dim 16-256 given explicitly, GQA groups 1-8, one to four layers) and the
arithmetic (RoPE theta and the default / linear / llama3 / yarn / dynamic types, biases, tied embeddings,
rms_norm_eps, max_position_embeddings). transformers 5 writes `rope_parameters`; the "v4" configurations are
rewritten into the layout transformers 4 wrote (top-level `rope_theta`, a `rope_scaling` dict, no
`head_dim` when it is hidden/heads), which transformers 5 still reads: both layouts must give the same model.
q0f32 must give exactly transformers' greedy tokens; q4f32_1 exactly those of transformers running on the
dequantized weights (both with the exact CPU kernels). The int8 kernels (compile's default) are held to
tolerances instead: see test_int8_kernels.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import tvm

from megrez_mlc.compile.compiler import compile_model
from megrez_mlc.compile.gpu import unsupported_head_dim_reason
from megrez_mlc.config import ModelConfig
from megrez_mlc.quantize.convert import convert_weight
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.rope import RopeScaling
from megrez_mlc.runtime import Engine, SamplingParams
from megrez_mlc.tiny import build_tokenizer

from .conftest import BuiltModel, reference_model
from .test_int8_kernels import INT8_TOLERANCE, assert_within, int8_activations
from .test_logits import ours_and_reference

STEPS = 24
PROMPT = "The quick brown fox 你好 42"


@dataclass(frozen=True)
class Sweep:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope: dict[str, Any]  # transformers 5's rope_parameters
    layout: str = "v5"
    extra: dict[str, Any] = field(default_factory=dict)  # other LlamaConfig fields


SWEEP = [
    Sweep("hd18-gqa4", 76, 100, 2, 4, 1, 18, 317, {"rope_theta": 5e6, "rope_type": "default"}),
    Sweep(
        "hd64-mha-linear-v4-tied-1layer",
        130,
        37,
        1,
        2,
        2,
        64,
        331,
        {"rope_theta": 20000.0, "rope_type": "linear", "factor": 2.5},
        "v4",
        {"tie_word_embeddings": True, "rms_norm_eps": 1e-6},
    ),
    Sweep(
        "hd80-gqa8-llama3-attnbias",
        88,
        250,
        2,
        8,
        1,
        80,
        625,
        {
            "rope_theta": 5e5,
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        extra={"attention_bias": True},
    ),
    Sweep(
        "hd96-gqa3-yarn-mlpbias",
        102,
        61,
        1,
        6,
        2,
        96,
        401,
        {"rope_theta": 1e6, "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
        extra={"mlp_bias": True, "max_position_embeddings": 512},
    ),
    Sweep(
        "hd128-gqa2-dynamic-v4-tied",
        100,
        129,
        2,
        4,
        2,
        128,
        1009,
        {"rope_theta": 10000.0, "rope_type": "dynamic", "factor": 2.0},
        "v4",
        {"tie_word_embeddings": True, "max_position_embeddings": 256},
    ),
    Sweep(
        "hd16-gqa5-v4-3layers",
        80,
        200,
        3,
        5,
        1,
        16,
        2039,
        {"rope_theta": 5e5, "rope_type": "default"},
        "v4",
        {"rms_norm_eps": 1e-5},
    ),
    Sweep(
        "hd256-gqa2-yarn-untruncated-biases-v4",
        66,
        45,
        1,
        2,
        1,
        256,
        353,
        {
            "rope_theta": 3e4,
            "rope_type": "yarn",
            "factor": 3.0,
            "original_max_position_embeddings": 100,
            "beta_fast": 16.0,
            "beta_slow": 2.0,
            "truncate": False,
        },
        "v4",
        {"attention_bias": True, "mlp_bias": True, "max_position_embeddings": 300},
    ),
    Sweep(
        "hd32-mha-llama3-v4",
        90,
        33,
        2,
        6,
        6,
        32,
        509,
        {
            "rope_theta": 8e4,
            "rope_type": "llama3",
            "factor": 4.0,
            "low_freq_factor": 2.0,
            "high_freq_factor": 8.0,
            "original_max_position_embeddings": 48,
        },
        "v4",
        {"rms_norm_eps": 1e-4},
    ),
    Sweep(
        "hd18-gqa7-linear-mlpbias",
        77,
        99,
        1,
        7,
        1,
        18,
        419,
        {"rope_theta": 7e5, "rope_type": "linear", "factor": 4.0},
        extra={"mlp_bias": True},
    ),
    Sweep(
        "hd64-gqa6-megrez-v4-attnbias-tied",
        78,
        150,
        2,
        6,
        1,
        64,
        467,
        {"rope_theta": 5e6, "rope_type": "default"},
        "v4",
        {"attention_bias": True, "tie_word_embeddings": True, "rms_norm_eps": 1e-5},
    ),
    Sweep(
        "hd40-gqa4-dynamic",
        72,
        71,
        1,
        8,
        2,
        40,
        389,
        {"rope_theta": 2e5, "rope_type": "dynamic", "factor": 3.0},
        extra={"max_position_embeddings": 300, "rms_norm_eps": 3e-6},
    ),
    Sweep(
        "hd96-mha-yarn-mscale-v4-4layers",
        98,
        257,
        4,
        2,
        2,
        96,
        317,
        {
            "rope_theta": 5e4,
            "rope_type": "yarn",
            "factor": 2.0,
            "original_max_position_embeddings": 96,
            "mscale": 1.5,
            "mscale_all_dim": 0.5,
        },
        "v4",
        {"max_position_embeddings": 192},
    ),
]


def _hf_config_dict(sweep: Sweep, eos_id: int) -> dict[str, Any]:
    return {
        "hidden_size": sweep.hidden,
        "intermediate_size": sweep.intermediate,
        "num_hidden_layers": sweep.layers,
        "num_attention_heads": sweep.heads,
        "num_key_value_heads": sweep.kv_heads,
        "head_dim": sweep.head_dim,
        "vocab_size": sweep.vocab,
        "max_position_embeddings": 1000,
        "rope_parameters": dict(sweep.rope),
        "bos_token_id": None,
        "eos_token_id": eos_id,
        **sweep.extra,
    }


def _spread_weights(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough that greedy choices are not near-ties: unit-scale embeddings and biases, linear
    layers of gain ~2 (transformers' default init gives logits within a hair of each other)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * noise)
            elif param.ndim == 1:  # biases
                param.copy_(0.5 * noise)
            elif "embed_tokens" in name:
                param.copy_(noise)
            else:
                gain = 4.0 if name == "lm_head.weight" else 2.0
                param.copy_(noise * gain / param.shape[1] ** 0.5)


def _to_v4_layout(config: dict[str, Any], sweep: Sweep) -> dict[str, Any]:
    """The config.json transformers 4 wrote for the same model."""
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    rope_type = rope.pop("rope_type")
    # transformers 4 wrote {"type": ...} for the older types and {"rope_type": ...} for llama3 and yarn
    config["rope_scaling"] = None if rope_type == "default" else {"type": rope_type, **rope}
    if config["rope_scaling"] and rope_type in ("llama3", "yarn"):
        config["rope_scaling"] = {"rope_type": rope_type, **rope}
    if config["head_dim"] == sweep.hidden // sweep.heads:
        del config["head_dim"]
    return config


def make_checkpoint(sweep: Sweep, out_dir: Path, seed: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    assert tokenizer.get_vocab_size() <= sweep.vocab
    config = LlamaConfig(**_hf_config_dict(sweep, tokenizer.token_to_id("<|turn_end|>")))
    model = LlamaForCausalLM(config).to(torch.float32)
    _spread_weights(model, seed)
    model.save_pretrained(out_dir)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    saved = json.loads((out_dir / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved  # transformers 5's layout
    if sweep.layout == "v4":
        (out_dir / "config.json").write_text(json.dumps(_to_v4_layout(saved, sweep), indent=2))
    return out_dir


def transformers_greedy(hf_model, prompt_ids: list[int]) -> list[int]:
    """argmax of transformers' logits, one token at a time. (Not generate(min_new_tokens=...): that masks
    the eos token, which ignore_eos does not; the tiny models do pick eos now and then.)"""
    tokens = list(prompt_ids)
    with torch.no_grad():
        for _ in range(STEPS):
            tokens.append(int(hf_model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt_ids) :]


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sweep")


@pytest.mark.parametrize("sweep", SWEEP, ids=lambda s: s.name)
def test_greedy_equals_transformers(sweep: Sweep, sweep_root: Path) -> None:
    from transformers import AutoModelForCausalLM

    index = SWEEP.index(sweep)
    hf_dir = make_checkpoint(sweep, sweep_root / sweep.name, seed=index)
    prompt_ids = None
    for quantization in ("q0f32", "q4f32_1"):
        model_dir = sweep_root / f"{sweep.name}-{quantization}"
        convert_weight(hf_dir, model_dir, quantization)
        gen_config(hf_dir, model_dir, quantization)
        lib = model_dir / "lib.so"
        compile_model(model_dir, "cpu", lib, cpu_kernels="exact")
        engine = Engine(model_dir, lib, device="cpu")
        prompt_ids = prompt_ids or engine.tokenizer.encode(PROMPT)
        ours = engine.generate(prompt_ids, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True))
        if quantization == "q0f32":
            hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        else:
            hf_model = reference_model(hf_dir, model_dir)
        assert ours.token_ids == transformers_greedy(hf_model, prompt_ids), quantization
        # on the GPU the int4 path only (what runs there; test_webgpu.py covers float weights), to keep the
        # suite's time
        if quantization == "q4f32_1" and webgpu_runs(sweep):
            webgpu_lib = model_dir / "lib-webgpu.so"
            compile_model(model_dir, "webgpu", webgpu_lib)
            on_gpu = Engine(model_dir, webgpu_lib, device="webgpu").generate(
                prompt_ids, SamplingParams(max_tokens=STEPS, temperature=0.0, ignore_eos=True)
            )
            assert on_gpu.token_ids == ours.token_ids, "webgpu"
    check_int8_kernels(BuiltModel(hf_dir, model_dir, model_dir / "lib-int8.so", "q4f32_1"), prompt_ids)


def webgpu_runs(sweep: Sweep) -> bool:
    """Whether TVM's float32 webgpu attention kernels take the sweep's head size (18 they do not); those
    sizes run on lavapipe too and must give the CPU's greedy tokens."""
    target = tvm.target.Target({"kind": "webgpu"})
    return unsupported_head_dim_reason(sweep.head_dim, sweep.kv_heads, sweep.heads, "float32", target) is None


def check_int8_kernels(model: BuiltModel, prompt_ids: list[int]) -> None:
    """q4f32_1 with the int8 kernels and a float32 KV cache (the kernels alone): logits within INT8_TOLERANCE
    of transformers whose Linears see int8 activations, and of transformers in float (which the exact
    kernels match to 1e-4)."""
    compile_model(model.model_dir, "cpu", model.lib, cpu_kernels="int8", kv_cache_dtype="float32")
    with int8_activations():
        ours, fake_quantized = ours_and_reference(model, prompt_ids)
    _, float_reference = ours_and_reference(model, prompt_ids)
    assert_within(ours, fake_quantized, INT8_TOLERANCE["same quantization, spread weights"])
    assert_within(ours, float_reference, INT8_TOLERANCE["float, spread weights"])


def test_sweep_sets_every_field_the_reader_takes() -> None:
    """The sweep is only worth something if each field that changes the math is non-default somewhere."""
    configs = [ModelConfig.from_hf_dict(saved_config(s)) for s in SWEEP]
    rope_types = {c.rope_scaling.rope_type for c in configs}
    assert rope_types == {"default", "linear", "llama3", "yarn", "dynamic"}
    assert {s.layout for s in SWEEP} == {"v4", "v5"}
    assert any(c.attention_bias for c in configs) and any(c.mlp_bias for c in configs)
    assert any(c.tie_word_embeddings for c in configs) and not all(c.tie_word_embeddings for c in configs)
    assert len({c.rope_theta for c in configs}) > 5 and len({c.rms_norm_eps for c in configs}) > 3
    assert len({c.context_window_size for c in configs}) > 3  # max_position_embeddings
    assert any(c.head_dim != c.hidden_size // c.num_attention_heads for c in configs)  # explicit head_dim
    assert {c.num_attention_heads // c.num_key_value_heads for c in configs} == set(range(1, 9))
    assert {c.head_dim for c in configs} >= {18, 64, 80, 96, 128}
    assert any(c.num_hidden_layers == 1 for c in configs)
    assert all(c.vocab_size % 2 for c in configs)
    assert any(c.hidden_size % 8 and c.intermediate_size % 8 for c in configs)
    yarn = [c.rope_scaling for c in configs if c.rope_scaling.rope_type == "yarn"]
    assert {r.truncate for r in yarn} == {True, False} and len({r.attention_factor for r in yarn}) == 3
    assert RopeScaling() in [c.rope_scaling for c in configs]


def saved_config(sweep: Sweep) -> dict[str, Any]:
    """config.json as make_checkpoint writes it for this configuration (without building weights)."""
    from transformers import LlamaConfig

    saved = LlamaConfig(**_hf_config_dict(sweep, 0)).to_dict()
    return _to_v4_layout(saved, sweep) if sweep.layout == "v4" else saved


def test_both_layouts_read_alike() -> None:
    from transformers import LlamaConfig

    for sweep in SWEEP:
        v5 = LlamaConfig(**_hf_config_dict(sweep, 0)).to_dict()
        v4 = _to_v4_layout(json.loads(json.dumps(v5)), sweep)
        assert ModelConfig.from_hf_dict(v4) == ModelConfig.from_hf_dict(v5), sweep.name
