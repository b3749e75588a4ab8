"""Which MLC parameter comes from which Hugging Face tensors: the mapping is data, built from the config.

MLC-LLM's llama names: q/k/v projections fuse into `qkv_proj` and gate/up into `gate_up_proj` (concatenated
along the output axis); `rotary_emb.inv_freq` buffers are ignored (RoPE runs inside the KV cache).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..config import ModelConfig
from ..omni.weights import encoder_tensors
from .int4 import quantized_shapes
from .schemes import QuantScheme


@dataclass(frozen=True)
class ParamSpec:
    """One MLC parameter: its base name, the HF tensors stacked on axis 0 to make it, its float shape, and
    what it is of its layer (`weight` or `bias`).

    `matrix` parameters ([N, K]: linears, the embedding, lm_head) are int4-quantized under q4 schemes;
    the others (RMSNorm weights, biases) stay in the model's float type.
    """

    name: str
    hf_names: tuple[str, ...]
    hf_rows: tuple[int, ...]
    shape: tuple[int, ...]
    role: str = "weight"

    @property
    def matrix(self) -> bool:
        return len(self.shape) == 2


@dataclass(frozen=True)
class StoredTensor:
    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _spec(name: str, sources: list[tuple[str, int]], cols: int | None) -> ParamSpec:
    rows = tuple(n for _, n in sources)
    shape = (sum(rows), cols) if cols is not None else (sum(rows),)
    return ParamSpec(name, tuple(s for s, _ in sources), rows, shape)


def _linear(name: str, sources: list[tuple[str, int]], cols: int, bias: bool) -> list[ParamSpec]:
    """A (fused) linear layer: `X.weight` tensors stacked on axis 0, then their `X.bias` ones if any."""
    weight = _spec(name, [(f"{hf}.weight", rows) for hf, rows in sources], cols)
    if not bias:
        return [weight]
    bias_sources = [(f"{hf}.bias", rows) for hf, rows in sources]
    return [weight, dataclasses.replace(_spec(name, bias_sources, None), role="bias")]


def llama_param_specs(config: ModelConfig, hf_prefix: str = "") -> list[ParamSpec]:
    """Every parameter of the LLaMA graph in the order the compiled model declares them; the checkpoint's
    names carry `hf_prefix` (an Omni checkpoint keeps its LLM under `llm.`)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_rows = config.num_attention_heads * config.head_dim
    kv_rows = config.num_key_value_heads * config.head_dim
    specs = [
        _spec("model.embed_tokens", [(f"{hf_prefix}model.embed_tokens.weight", config.vocab_size)], hidden)
    ]
    attn_bias, mlp_bias = config.attention_bias, config.mlp_bias
    for i in range(config.num_hidden_layers):
        hf, mlc = f"{hf_prefix}model.layers.{i}", f"model.layers.{i}"
        attn, mlp = f"{hf}.self_attn", f"{hf}.mlp"
        specs += [
            *_linear(
                f"{mlc}.self_attn.qkv_proj",
                [(f"{attn}.q_proj", q_rows), (f"{attn}.k_proj", kv_rows), (f"{attn}.v_proj", kv_rows)],
                hidden,
                attn_bias,
            ),
            *_linear(f"{mlc}.self_attn.o_proj", [(f"{attn}.o_proj", hidden)], q_rows, attn_bias),
            *_linear(
                f"{mlc}.mlp.gate_up_proj",
                [(f"{mlp}.gate_proj", inter), (f"{mlp}.up_proj", inter)],
                hidden,
                mlp_bias,
            ),
            *_linear(f"{mlc}.mlp.down_proj", [(f"{mlp}.down_proj", hidden)], inter, mlp_bias),
            _spec(f"{mlc}.input_layernorm", [(f"{hf}.input_layernorm.weight", hidden)], None),
            _spec(
                f"{mlc}.post_attention_layernorm", [(f"{hf}.post_attention_layernorm.weight", hidden)], None
            ),
        ]
    specs.append(_spec("model.norm", [(f"{hf_prefix}model.norm.weight", hidden)], None))
    if not config.tie_word_embeddings:
        specs.append(_spec("lm_head", [(f"{hf_prefix}lm_head.weight", config.vocab_size)], hidden))
    return specs


def stored_tensors(spec: ParamSpec, scheme: QuantScheme) -> list[StoredTensor]:
    """The tensors a parameter becomes on disk under a quantization scheme."""
    if scheme.quantized and spec.matrix:
        q_weight_shape, q_scale_shape = quantized_shapes(*spec.shape)
        return [
            StoredTensor(f"{spec.name}.q_weight", q_weight_shape, "uint32"),
            StoredTensor(f"{spec.name}.q_scale", q_scale_shape, scheme.scale_dtype),
        ]
    return [StoredTensor(f"{spec.name}.{spec.role}", spec.shape, scheme.model_dtype)]


def expected_hf_shapes(spec: ParamSpec) -> dict[str, tuple[int, ...]]:
    return {name: (rows, *spec.shape[1:]) for name, rows in zip(spec.hf_names, spec.hf_rows)}


def stored_model_tensors(config: ModelConfig, scheme: QuantScheme) -> list[StoredTensor]:
    """Every tensor convert-weight writes for a model, in the compiled graph's parameter order: the LLM's,
    then (Omni) the encoders' (vision tower, resampler, audio encoder), in the scheme's float type."""
    tensors = [t for spec in llama_param_specs(config) for t in stored_tensors(spec, scheme)]
    return tensors + [StoredTensor(v.name, v.shape, scheme.model_dtype) for v in encoder_tensors(config)]
