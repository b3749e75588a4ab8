"""The KV cache's RoPE kernel, with the checkpoint's own RoPE type (megrez_mlc/rope.py).

TVM's paged KV cache rotates queries and keys in one kernel (`tir_split_rotary`: split the fused qkv, rotate
q and k at their positions) before it appends keys to the cache. TVM's version knows default, llama3 and a
yarn that differs from transformers' (its ramp runs over head dimensions instead of frequency pairs, it
neither truncates the correction range nor scales cos and sin), so the compiler swaps in this one for every
target: same signature, frequencies computed as transformers computes them.
"""

from __future__ import annotations

from tvm import tirx
from tvm.script import tirx as T

from ..config import ModelConfig
from ..rope import RopeScaling


def _inv_freq(pair: tirx.PrimExpr, rope: RopeScaling, theta: float, rotary_dim: int) -> tirx.PrimExpr:
    """The frequency of pair `pair` (0 .. rotary_dim/2 - 1): base * ((1 - w) + w / factor)."""
    f32 = "float32"
    exponent = (pair * 2).astype(f32) / tirx.const(rotary_dim, f32)
    base = tirx.const(1.0, f32) / tirx.power(tirx.const(theta, f32), exponent)
    if rope.rope_type in ("default", "dynamic"):
        return base
    factor = tirx.const(rope.factor, f32)
    if rope.rope_type == "linear":
        return base / factor
    if rope.rope_type == "llama3":
        slope, offset = rope.llama3_blend
        keep = tirx.max(tirx.min(tirx.const(slope, f32) * base - tirx.const(offset, f32), 1.0), 0.0)
        return base * (keep + (tirx.const(1.0, f32) - keep) / factor)
    low, high = rope.yarn_ramp_range(rotary_dim, theta)
    ramp = (pair.astype(f32) - tirx.const(low, f32)) / tirx.const(high - low, f32)
    ramp = tirx.max(tirx.min(ramp, 1.0), 0.0)
    return base * ((tirx.const(1.0, f32) - ramp) + ramp / factor)


def split_rotary(config: ModelConfig, dtype: str) -> tirx.PrimFunc:
    """qkv [n, q_heads + 2 kv_heads, head_dim] -> q, k (rotated at position_map's positions when
    apply_rope is set) and v."""
    q_heads, kv_heads, head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    fused_heads = q_heads + 2 * kv_heads
    half = head_dim // 2
    rope, theta = config.rope_scaling, config.rope_theta
    attention_factor = tirx.const(rope.attention_factor, "float32")

    def rotated(qkv: T.Buffer, s: tirx.Var, h: tirx.Var, d: tirx.Var, position: tirx.PrimExpr):
        angle = position.astype("float32") * _inv_freq(d % half, rope, theta, head_dim)
        # rotate_half: the first half pairs with the negated second half, the second with the first
        partner = tirx.if_then_else(d < half, -qkv[s, h, d + half], qkv[s, h, d - half]).astype("float32")
        value = qkv[s, h, d].astype("float32")
        return ((tirx.cos(angle) * value + tirx.sin(angle) * partner) * attention_factor).astype(dtype)

    @T.prim_func(s_tir=True)
    def megrez_split_rotary(
        var_qkv: T.handle,
        var_position_map: T.handle,
        var_q: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        apply_rope: T.int64,
    ):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "global_symbol": "fused_rope"})
        seq_len = T.int32()
        position_map_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, fused_heads, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_offset)
        for iters in T.grid(seq_len, fused_heads, head_dim):
            with T.sblock("split_rotary"):
                s, h, d = T.axis.remap("SSS", iters)
                if h < q_heads:
                    q[s, h, d] = T.if_then_else(
                        apply_rope > 0, rotated(qkv, s, h, d, position_map[s]), qkv[s, h, d]
                    )
                elif h < q_heads + kv_heads:
                    k[s, h - q_heads, d] = T.if_then_else(
                        apply_rope > 0, rotated(qkv, s, h, d, position_map[s]), qkv[s, h, d]
                    )
                else:
                    v[s, h - (q_heads + kv_heads), d] = qkv[s, h, d]

    return megrez_split_rotary
