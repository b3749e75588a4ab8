"""The compiled graph declares exactly the tensors convert-weight writes: names, shapes, dtypes and order.

The graph (compile/model.py, with compile/quantized.py's int4 layers) and the weight mapping
(artifacts/param_names.py) describe the parameters separately; `compile` checks that they agree, and these
tests check both the real graphs and that a graph which disagrees is refused."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest
import tvm
from tvm.relax.frontend import nn

from megrez_mlc.artifacts.param_names import llama_param_specs, stored_tensors
from megrez_mlc.artifacts.schemes import SCHEMES, get_scheme
from megrez_mlc.compile import compiler, quantized
from megrez_mlc.compile.compiler import build_ir_module, check_params_match_weights, compile_model
from megrez_mlc.config import ModelConfig
from megrez_mlc.errors import MegrezError
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.tiny import TinyShape, hf_config

VOCAB = 307
CPU = tvm.target.Target({"kind": "llvm"})


def tiny_config(tied: bool) -> ModelConfig:
    """The tiny shape (hidden 72, intermediate 100: int4 groups padded) with every bias there is."""
    config = ModelConfig.from_hf_dict(hf_config(TinyShape(), VOCAB, tied, eos_id=2, dtype="float32"))
    return config.replace(attention_bias=True, mlp_bias=True)


@cache
def exported_params(quantization: str, tied: bool) -> list[tuple[str, tuple[int, ...], str]]:
    _, named_params = build_ir_module(tiny_config(tied), get_scheme(quantization), CPU)
    return [(name, tuple(int(d) for d in param.shape), param.dtype) for name, param in named_params]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("quantization", list(SCHEMES))
def test_graph_declares_what_convert_weight_writes(quantization: str, tied: bool) -> None:
    scheme = get_scheme(quantization)
    written = [
        (t.name, tuple(t.shape), t.dtype)
        for spec in llama_param_specs(tiny_config(tied))
        for t in stored_tensors(spec, scheme)
    ]
    assert exported_params(quantization, tied) == written


def test_names_are_mlc_llamas() -> None:
    """MLC-LLM's llama names, fused projections and all, so MLC's tools read the weights too."""
    params = exported_params("q4f16_1", False)
    layer_0 = [
        ("model.layers.0.self_attn.qkv_proj.q_weight", (6 * 18, 12), "uint32"),
        ("model.layers.0.self_attn.qkv_proj.q_scale", (6 * 18, 3), "float16"),
        ("model.layers.0.self_attn.qkv_proj.bias", (6 * 18,), "float16"),
        ("model.layers.0.self_attn.o_proj.q_weight", (72, 12), "uint32"),
        ("model.layers.0.self_attn.o_proj.q_scale", (72, 3), "float16"),
        ("model.layers.0.self_attn.o_proj.bias", (72,), "float16"),
        ("model.layers.0.mlp.gate_up_proj.q_weight", (200, 12), "uint32"),
        ("model.layers.0.mlp.gate_up_proj.q_scale", (200, 3), "float16"),
        ("model.layers.0.mlp.gate_up_proj.bias", (200,), "float16"),
        ("model.layers.0.mlp.down_proj.q_weight", (72, 16), "uint32"),
        ("model.layers.0.mlp.down_proj.q_scale", (72, 4), "float16"),
        ("model.layers.0.mlp.down_proj.bias", (72,), "float16"),
        ("model.layers.0.input_layernorm.weight", (72,), "float16"),
        ("model.layers.0.post_attention_layernorm.weight", (72,), "float16"),
    ]
    assert params[:2] == [
        ("model.embed_tokens.q_weight", (VOCAB, 12), "uint32"),
        ("model.embed_tokens.q_scale", (VOCAB, 3), "float16"),
    ]
    assert params[2:16] == layer_0
    assert params[-3:] == [
        ("model.norm.weight", (72,), "float16"),
        ("lm_head.q_weight", (VOCAB, 12), "uint32"),
        ("lm_head.q_scale", (VOCAB, 3), "float16"),
    ]
    assert exported_params("q0f32", True)[:1] == [("model.embed_tokens.weight", (VOCAB, 72), "float32")]


def test_a_graph_whose_shapes_differ_fails_to_compile(tiny_hf: Path, tmp_path: Path, monkeypatch) -> None:
    """A padding slip in the graph's int4 shapes (K rounded down, not up to whole groups) stops the compile
    with the first difference, before any TVM work and without writing a library."""
    model_dir = tmp_path / "model"
    gen_config(tiny_hf, model_dir, "q4f32_1")
    vocab = json.loads((tiny_hf / "config.json").read_text())["vocab_size"]

    def rounded_down(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return (n, k // 8), (n, k // 32)

    monkeypatch.setattr(quantized, "quantized_shapes", rounded_down)
    with pytest.raises(MegrezError) as failure:
        # exact kernels: the int8 ones size their buffers from the config, not from the patched shapes
        compile_model(model_dir, "cpu", tmp_path / "lib.so", cpu_kernels="exact")
    assert str(failure.value).startswith(
        f"parameter 0 of the q4f32_1 graph is model.embed_tokens.q_weight [{vocab}, 9] uint32, but "
        f"convert-weight writes model.embed_tokens.q_weight [{vocab}, 12] uint32; this is a bug in megrez-mlc"
    )
    assert not (tmp_path / "lib.so").exists()


def test_a_graph_left_in_float32_is_refused(monkeypatch) -> None:
    """Without the scheme's conversion a q0f16 graph would declare float32 weights."""
    monkeypatch.setattr(compiler, "quantize_model", lambda model, *conversion_args: model)
    with pytest.raises(MegrezError, match=r"^parameter 0 of the q0f16 graph is model\.embed_tokens\.weight "):
        build_ir_module(tiny_config(False), get_scheme("q0f16"), CPU)


def test_a_graph_missing_a_parameter_is_refused() -> None:
    params = exported_params("q4f32_1", False)
    named = [(name, nn.Parameter(shape, dtype)) for name, shape, dtype in params[:-1]]
    with pytest.raises(MegrezError) as failure:
        check_params_match_weights(named, tiny_config(False), get_scheme("q4f32_1"))
    assert f"parameter {len(params) - 1} of the q4f32_1 graph is nothing, but convert-weight writes " in str(
        failure.value
    )
    assert "lm_head.q_scale [307, 3] float32" in str(failure.value)
