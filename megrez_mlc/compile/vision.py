"""Megrez-3B-Omni's vision half as a graph: the SigLIP tower and the resampler behind `image_embed`.

`image_embed(patches [n, 3*p*p], position_ids [n], key_positions [n, hidden])` encodes one slice (the host
cuts, patchifies and numbers it: omni/images.py) into `query_num` embeddings of the LLM's width, which the
runtime writes over the slice's placeholder tokens before prefill. Parameter names are the checkpoint's
(omni/weights.py lists the same ones in the same order). These layers stay in the scheme's float type:
`FloatLinear` is never swapped for an int4 layer.
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..omni.config import VisionConfig
from . import cpu_attention, ops
from .layers import Linear, compiling_for_cpu

LAYER_NORM_EPS = 1e-6  # the resampler's LayerNorms
_GELU_K = math.sqrt(2 / math.pi)


class FloatLinear(Linear):
    """A Linear that quantization leaves in the float type."""


class LayerNorm(nn.Module):
    def __init__(self, width: int, eps: float) -> None:
        self.eps = eps
        self.weight = nn.Parameter((width,))
        self.bias = nn.Parameter((width,))

    def forward(self, x: Tensor) -> Tensor:
        return op.layer_norm(x, [x.shape[-1]], self.weight, self.bias, self.eps)


def gelu_tanh(x: te.Tensor, cpu: bool) -> te.Tensor:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), tanh(u) = 1 - 2 / (1 + e^2u); on CPUs e^2u goes
    through fast_exp2 so the loop vectorizes (libm's tanh is a scalar call per element)."""

    def value(*idx):
        v = x[idx].astype("float32")
        u = tirx.const(_GELU_K, "float32") * (v + tirx.const(0.044715, "float32") * v * v * v)
        if cpu:
            exponent = tirx.max(tirx.min(2.0 * u * tirx.const(ops.LOG2_E, "float32"), 127.0), -126.0)
            e2u = ops.fast_exp2(exponent)
        else:
            e2u = tirx.exp(tirx.min(2.0 * u, 80.0))
        tanh = tirx.const(1.0, "float32") - 2.0 / (tirx.const(1.0, "float32") + e2u)
        return (0.5 * v * (1.0 + tanh)).astype(x.dtype)

    return te.compute(x.shape, value, name="gelu_tanh")


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over all keys, for q [1, m, heads*d] and k, v [1, n, heads*d]."""
    _, m, width = q.shape
    n = k.shape[1]
    d = width // heads
    if compiling_for_cpu():
        kernel = cpu_attention.full_attention_cpu(heads, d, q.dtype)
        q3, k3, v3 = (op.reshape(t, (t.shape[1], heads, d)) for t in (q, k, v))
        out, _ = op.tensor_ir_op(
            kernel,
            "full_attention",
            [q3, k3, v3],
            [Tensor.placeholder((m, heads, d), q.dtype), Tensor.placeholder((m, heads), "float32")],
        )
        return op.reshape(out, (1, m, width))
    q4 = op.permute_dims(op.reshape(q, (1, m, heads, d)), (0, 2, 1, 3))
    k4 = op.permute_dims(op.reshape(k, (1, n, heads, d)), (0, 2, 3, 1))
    v4 = op.permute_dims(op.reshape(v, (1, n, heads, d)), (0, 2, 1, 3))
    scores = op.matmul(q4, k4, out_dtype="float32") * (d**-0.5)
    probs = op.softmax(scores, axis=-1).astype(q.dtype)
    out = op.matmul(probs, v4)
    return op.reshape(op.permute_dims(out, (0, 2, 1, 3)), (1, m, width))


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        self.patch_embedding = FloatLinear(config.patch_features, config.hidden_size, bias=True)
        self.position_embedding = nn.Module()
        self.position_embedding.weight = nn.Parameter((config.patches_per_side**2, config.hidden_size))

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        n = patches.shape[0]
        embeds = self.patch_embedding(op.reshape(patches, (1, n, patches.shape[1])))
        positions = op.tensor_expr_op(ops.take_rows, "take", [self.position_embedding.weight, position_ids])
        return embeds + op.reshape(positions, (1, n, positions.shape[1]))


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        h = config.hidden_size
        self.heads = config.num_attention_heads
        self.q_proj = FloatLinear(h, h, bias=True)
        self.k_proj = FloatLinear(h, h, bias=True)
        self.v_proj = FloatLinear(h, h, bias=True)
        self.out_proj = FloatLinear(h, h, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads))


class VisionMLP(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        self.fc1 = FloatLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.fc2 = FloatLinear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        cpu = compiling_for_cpu()
        return self.fc2(op.tensor_expr_op(lambda t: gelu_tanh(t, cpu), "gelu_tanh", [self.fc1(x)]))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """Idefics2VisionTransformer (SigLIP) over one slice's patches, no padding."""

    def __init__(self, config: VisionConfig) -> None:
        self.embeddings = VisionEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([EncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps)

    def forward(self, patches: Tensor, position_ids: Tensor) -> Tensor:
        x = self.embeddings(patches, position_ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.post_layernorm(x)


class ResamplerAttention(nn.Module):
    """nn.MultiheadAttention's math with its packed in_proj split into three linears (omni/weights.py)."""

    def __init__(self, width: int, heads: int) -> None:
        self.heads = heads
        self.q_proj = FloatLinear(width, width, bias=True)
        self.k_proj = FloatLinear(width, width, bias=True)
        self.v_proj = FloatLinear(width, width, bias=True)
        self.out_proj = FloatLinear(width, width, bias=True)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        return self.out_proj(attention(self.q_proj(query), self.k_proj(key), self.v_proj(value), self.heads))


class Resampler(nn.Module):
    """query_num learned queries attend to the slice's patches (keys with the 2-D sin-cos positions added,
    values without), then ln_post and the output projection."""

    def __init__(self, config: VisionConfig, llm_hidden: int) -> None:
        self.query = nn.Parameter((config.query_num, llm_hidden))
        self.kv_proj = FloatLinear(config.hidden_size, llm_hidden)
        self.attn = ResamplerAttention(llm_hidden, config.resampler_heads)
        self.ln_q = LayerNorm(llm_hidden, LAYER_NORM_EPS)
        self.ln_kv = LayerNorm(llm_hidden, LAYER_NORM_EPS)
        self.ln_post = LayerNorm(llm_hidden, LAYER_NORM_EPS)
        self.proj = FloatLinear(llm_hidden, llm_hidden)

    def forward(self, features: Tensor, key_positions: Tensor) -> Tensor:
        n, width = key_positions.shape
        x = self.ln_kv(self.kv_proj(features))
        query = self.ln_q(op.reshape(self.query, (1, *self.query.shape)))
        out = self.attn(query, x + op.reshape(key_positions, (1, n, width)), x)
        out = self.proj(self.ln_post(out))
        return op.reshape(out, (out.shape[1], width))


class OmniVision(nn.Module):
    def __init__(self, config: VisionConfig, llm_hidden: int) -> None:
        self.vpm = VisionTower(config)
        self.resampler = Resampler(config, llm_hidden)

    def forward(self, patches: Tensor, position_ids: Tensor, key_positions: Tensor) -> Tensor:
        return self.resampler(self.vpm(patches, position_ids), key_positions)
