"""Tensor expressions for the weight-bound operators: (dequantize +) matmul and embedding lookup.

Each is one TE function, so dequantization lives in the same PrimFunc as the matmul that consumes it:
the dequantize stage is a separate block that a schedule inlines into the reduction (GPU) or computes one
tile at a time (CPU), and the int4 weights are never expanded in memory. Weights are [N, K]
(outputs x inputs), as Hugging Face stores them.
"""

from __future__ import annotations

import math

from tvm import te, tirx

from ..artifacts.int4 import GROUP_SIZE, MAX_INT, NIBBLES_PER_WORD


def dequantize_value(q_weight: te.Tensor, q_scale: te.Tensor, row: tirx.Expr, col: tirx.Expr, dtype: str):
    """(nibble - 7) * scale for input `col` of output `row` (layout in artifacts/int4.py)."""
    word = q_weight[row, col // NIBBLES_PER_WORD]
    shift = ((col % NIBBLES_PER_WORD) * 4).astype("uint32")
    nibble = tirx.bitwise_and(tirx.shift_right(word, shift), tirx.const(0xF, "uint32"))
    return (nibble.astype(dtype) - tirx.const(MAX_INT, dtype)) * q_scale[row, col // GROUP_SIZE].astype(dtype)


def matmul_nt(x: te.Tensor, weight: te.Tensor, out_dtype: str) -> te.Tensor:
    """x [..., K] @ weight[N, K]^T, accumulated in float32 and cast to out_dtype."""
    *lead, k_in = x.shape
    n_out = weight.shape[0]
    k = te.reduce_axis((0, k_in), name="k")
    acc = te.compute(
        (*lead, n_out),
        lambda *idx: te.sum(
            x[(*idx[:-1], k)].astype("float32") * weight[idx[-1], k].astype("float32"), axis=k
        ),
        name="matmul",
    )
    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda *idx: acc[idx].astype(out_dtype), name="matmul_cast")


def dequantize_matmul_nt(
    x: te.Tensor,
    q_weight: te.Tensor,
    q_scale: te.Tensor,
    in_features: int,
    out_dtype: str,
    dequantize_dtype: str | None = None,
) -> te.Tensor:
    """x [..., K] @ dequantize(q_weight, q_scale)^T; K is the unpadded input width.

    Weights are dequantized to `dequantize_dtype` (default: x's type; CPUs use float32, since they have
    no fast float16 arithmetic)."""
    weight = te.compute(
        (q_weight.shape[0], in_features),
        lambda n, k: dequantize_value(q_weight, q_scale, n, k, dequantize_dtype or x.dtype),
        name="dequantize",
    )
    return matmul_nt(x, weight, out_dtype)


def dequantize_gemv_cpu(
    x: te.Tensor, q_weight: te.Tensor, q_scale: te.Tensor, in_features: int, out_dtype: str
) -> te.Tensor:
    """x [1, 1, K] @ dequantize(q_weight, q_scale)^T, written so a CPU does ~4 vector ops per 16 weights.

    Word kw of a row holds inputs 8kw..8kw+7. With x permuted to x_perm[s, kw] = x[8kw + s], one vector
    of consecutive words times x_perm[s, :] covers nibble s of each word (shift, mask, convert, FMA), and
    both the "- 7" offset and the group scale leave the inner loop:
      sum_k x_k (q_k - 7) scale_g = sum_kw scale[kw // 4] * (sum_s x_perm[s, kw] q[kw, s] - 7 x_wordsum[kw]).
    """
    n_out, words = q_weight.shape
    nibble = tirx.const(0xF, "uint32")

    def x_perm_value(s, kw):
        k = kw * NIBBLES_PER_WORD + s
        return tirx.if_then_else(
            k < in_features, x[0, 0, tirx.min(k, in_features - 1)].astype("float32"), 0.0
        )

    x_perm = te.compute((NIBBLES_PER_WORD, words), x_perm_value, name="x_perm")
    s = te.reduce_axis((0, NIBBLES_PER_WORD), name="s")
    x_wordsum = te.compute((words,), lambda kw: te.sum(x_perm[s, kw], axis=s), name="x_wordsum")
    s = te.reduce_axis((0, NIBBLES_PER_WORD), name="s")
    partial = te.compute(
        (n_out, words),
        lambda n, kw: te.sum(
            x_perm[s, kw]
            * tirx.bitwise_and(tirx.shift_right(q_weight[n, kw], (s * 4).astype("uint32")), nibble).astype(
                "float32"
            ),
            axis=s,
        ),
        name="partial",
    )
    words_per_group = GROUP_SIZE // NIBBLES_PER_WORD
    scale = te.compute(
        (n_out, words), lambda n, kw: q_scale[n, kw // words_per_group].astype("float32"), name="scale_expand"
    )
    kw = te.reduce_axis((0, words), name="kw")
    acc = te.compute(
        (1, 1, n_out),
        lambda _a, _b, n: te.sum(
            scale[n, kw] * (partial[n, kw] - tirx.const(MAX_INT, "float32") * x_wordsum[kw]), axis=kw
        ),
        name="matmul",
    )
    if out_dtype == "float32":
        return acc
    return te.compute(acc.shape, lambda *idx: acc[idx].astype(out_dtype), name="matmul_cast")


def dequantize_take(
    q_weight: te.Tensor, q_scale: te.Tensor, ids: te.Tensor, dim: int, dtype: str
) -> te.Tensor:
    """Rows `ids` of a quantized [V, dim] embedding table, dequantized."""
    return te.compute(
        (ids.shape[0], dim),
        lambda i, j: dequantize_value(q_weight, q_scale, ids[i], j, dtype),
        name="dequantize_take",
    )


# Plain gathers written as TE: Relax's `take` legalizes to a "fast" gather that TVM warns may read out of
# bounds; these index exactly as written, and the runtime checks token ids before they get here.
def take_rows(table: te.Tensor, ids: te.Tensor) -> te.Tensor:
    """table[ids[i], :] for each i."""
    return te.compute((ids.shape[0], table.shape[1]), lambda i, j: table[ids[i], j], name="take_rows")


def take_positions(hidden: te.Tensor, positions: te.Tensor) -> te.Tensor:
    """hidden[:, positions[i], :]: the hidden states whose logits a batched prefill returns."""
    b, _, d = hidden.shape
    return te.compute(
        (b, positions.shape[0], d), lambda i, p, k: hidden[i, positions[p], k], name="take_positions"
    )


# 2**f = e**(f ln 2) on f in [-1/2, 1/2]: Taylor terms (ln 2)**k / k! to k = 6 (relative error < 2e-7).
_EXP2_TAYLOR = [math.log(2) ** k / math.factorial(k) for k in range(7)]
LOG2_E = math.log2(math.e)


def prefetch(buffer: tirx.Buffer, *indices: tirx.PrimExpr) -> tirx.PrimExpr:
    """A read prefetch of buffer[indices] into all cache levels, for CPU kernels that stream memory: the
    hardware prefetchers alone left them latency-bound (~4 GB/s on one core), as they stop at every 4 KiB
    page. TVM 0.27's AttachGlobalSymbol cannot rewrite the pointer it takes when it renames a system
    library's functions: kernels built for one leave their prefetches out (compiler.build_ir_module)."""
    address = tirx.address_of(tirx.BufferLoad(buffer, list(indices)))
    read, all_levels, data = (tirx.const(v, "int32") for v in (0, 3, 1))
    return tirx.call_llvm_intrin("void", "llvm.prefetch.p0", address, read, all_levels, data)


def fast_exp2(x: tirx.PrimExpr) -> tirx.PrimExpr:
    """2**x in float32 for x in [-126, 127]: round to the nearest integer n, a polynomial in the rest, and
    2**n built from the exponent bits. Unlike a call into libm's exp2f it vectorizes, which is what CPU
    kernels need; callers clamp x to the range."""
    n = tirx.nearbyint(x)
    f = x - n
    poly = tirx.const(_EXP2_TAYLOR[-1], "float32")
    for coefficient in reversed(_EXP2_TAYLOR[:-1]):
        poly = tirx.const(coefficient, "float32") + f * poly
    two_to_n = tirx.reinterpret("float32", tirx.shift_left(n.astype("int32") + 127, tirx.const(23, "int32")))
    return poly * two_to_n


def swiglu_cpu(gate_up: te.Tensor) -> te.Tensor:
    """silu(gate) * up for gate_up = [..., gate | up], with exp through fast_exp2 so the loop vectorizes."""
    *lead, width = gate_up.shape
    half = width // 2

    def value(*idx):
        gate = gate_up[(*idx[:-1], idx[-1])].astype("float32")
        up = gate_up[(*idx[:-1], idx[-1] + half)].astype("float32")
        exponent = tirx.max(tirx.min(-gate * tirx.const(LOG2_E, "float32"), 127.0), -126.0)
        return (gate * up / (tirx.const(1.0, "float32") + fast_exp2(exponent))).astype(gate_up.dtype)

    return te.compute((*lead, half), value, name="swiglu")
