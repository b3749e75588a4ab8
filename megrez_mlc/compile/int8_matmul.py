"""Integer dot-product CPU kernels for q4 weights: activations to int8, int4 x int8 products, float scales.

Decode reads every weight once per token, and a float32 FMA per weight made the GEMV compute-bound on every
x86 machine measured (~44 G weights/s per core). These kernels do what llama.cpp's q4 x q8 dot products do,
on MLC's weight layout unchanged (artifacts/int4.py):

  1. The activations of each token are quantized once per matmul, per group of 32 inputs (the weights'
     groups): d = max|x| / 127, x_q = rint(x * (1 / d)), stored as the unsigned byte x_q + 128.
  2. A vector of weight words splits into its low and high nibbles with two masks and one shift, and 7 is
     subtracted from each byte: signed weights q - 7. Byte b of word w's low-nibble lanes is input 8w + 2b,
     of the high ones 8w + 2b + 1, so the activations are stored the same way once (even inputs, odd
     inputs), and one integer dot product (AVX-512-VNNI / AVX-VNNI `vpdpbusd`; AVX2 `vpmaddubsw` +
     `vpmaddwd`) sums the 8 products of a word into one int32 lane.
  3. The +128 of the activations adds 128 * sum(q - 7) to each word's sum; that depends on the weights
     only, so it is computed once per weight vector (two more dot products against 128s) and subtracted.
  4. Per group, in float: the integer sum times d (activations) times the weight scale, accumulated.

Two kernels: the GEMV (one decode token) runs lanes over consecutive words of a row, 4 rows sharing each
activation load, rows in parallel. The GEMM (prefill, batched decode) runs lanes over 16 (8 for 256-bit
ISAs) output rows: each task transposes its rows' words once, then a tile of tokens broadcasts its 4
activation bytes per word against them, summing a whole group in int32 before one float step. The
instructions are LLVM intrinsics called from TIR, so the kernels compile for a CPU other than this one
(`compile --cpu`); the ISA comes from the compile target's CPU features.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import tvm
from tvm.script import tirx as T
from tvm.target import Target, codegen

from ..artifacts.int4 import GROUP_SIZE, MAX_INT, NIBBLES_PER_WORD, padded_k
from .cpu_attention import add, fold_tree, lane_fold
from .ops import prefetch

WORDS_PER_GROUP = GROUP_SIZE // NIBBLES_PER_WORD
INT8_MAX = 127
LOW_NIBBLES = 0x0F0F0F0F
ACTIVATION_BIAS = 128  # x_q + 128 is the unsigned operand; the signed one is the weight q - 7
GEMV_ROWS_PER_STEP = 4  # rows sharing each activation vector load
PREFETCH_ROWS = 16  # the GEMV prefetches the row this far ahead, one cache line per vector it loads
GEMM_TOKENS_PER_TILE = {32: 8, 16: 4}  # by vector registers: 2 accumulators per token, half the registers


@dataclass(frozen=True)
class DotIsa:
    """The integer dot-product instructions a kernel is written with."""

    name: str  # as `compile` reports it
    max_words: int  # weight words (int32 lanes) per vector: 16 for 512-bit registers, 8 for 256-bit
    vnni: bool  # vpdpbusd (u8 x s8, four products summed into each int32 lane) in one instruction
    registers: int  # vector registers, which bound the tile of accumulators

    def dot(self, words: int, acc, x_even, low, x_odd, high):
        """acc (int32 x words) plus, per word, the 8 products of unsigned activation bytes and signed
        weights."""
        bytes_ = 4 * words
        if self.vnni:
            name = f"llvm.x86.avx512.vpdpbusd.{8 * bytes_}"  # AVX-VNNI has the same intrinsics (VEX form)
            partial = T.call_llvm_pure_intrin(f"int32x{words}", name, acc, x_even, low)
            return T.call_llvm_pure_intrin(f"int32x{words}", name, partial, x_odd, high)
        maddubs = "llvm.x86.avx2.pmadd.ub.sw" if words == 8 else "llvm.x86.ssse3.pmadd.ub.sw.128"
        maddwd = "llvm.x86.avx2.pmadd.wd" if words == 8 else "llvm.x86.sse2.pmadd.wd"
        pairs = f"int16x{2 * words}"
        # each int16 lane: two products of at most 255 * 7; the sum of both halves stays below 2**15
        summed = T.call_llvm_pure_intrin(pairs, maddubs, x_even, low) + T.call_llvm_pure_intrin(
            pairs, maddubs, x_odd, high
        )
        ones = T.broadcast(T.int16(1), 2 * words)
        return acc + T.call_llvm_pure_intrin(f"int32x{words}", maddwd, summed, ones)


AVX512_VNNI = DotIsa("avx512-vnni", max_words=16, vnni=True, registers=32)
AVX_VNNI = DotIsa("avx-vnni", max_words=8, vnni=True, registers=16)
AVX2 = DotIsa("avx2", max_words=8, vnni=False, registers=16)
ISAS = (AVX512_VNNI, AVX_VNNI, AVX2)
_REQUIRED_FEATURES = {
    "avx512-vnni": ("avx512vnni", "avx512bw", "avx512vl"),
    "avx-vnni": ("avxvnni", "avx2"),
    "avx2": ("avx2",),
}


def isa_supported(isa: DotIsa, target: Target) -> bool:
    """Whether an LLVM target's CPU has the instructions of `isa`."""
    if target.kind.name != "llvm" or not str(target.attrs.get("mtriple", "x86_64")).startswith("x86_64"):
        return False
    with target:
        return all(codegen.target_has_features(f) for f in _REQUIRED_FEATURES[isa.name])


def select_isa(target: Target) -> DotIsa | None:
    """The best integer dot-product ISA of an LLVM target's CPU; None without AVX2 (or off x86)."""
    return next((isa for isa in ISAS if isa_supported(isa, target)), None)


def _words_per_vector(isa: DotIsa, words: int) -> int:
    # the quantized layout pads K to whole groups, so 4 (one group, 128 bits) always divides
    return next(w for w in (isa.max_words, 8, 4) if w <= isa.max_words and words % w == 0)


def _words(in_features: int) -> int:
    return padded_k(in_features) // NIBBLES_PER_WORD


def lanes(kind: str, count: int):
    """The TVMScript type of a vector, for `T.let` bindings (a plain assignment in a kernel allocates a
    buffer, whose stores then stay in the loop)."""
    return getattr(T, f"{kind}x{count}")


def _quantize_activations(in_features: int, tile: int, parallel: bool):
    """A macro: x [m, K] -> x_even, x_odd (x_q + 128 as bytes, inputs 2b and 2b+1 of each span at byte b)
    and x_scale (d per group), for m rounded up to whole tiles (the extra rows quantize to zero)."""
    groups = _words(in_features) // WORDS_PER_GROUP
    loop = T.parallel if parallel else T.serial

    def value(x, token, k):
        inside = T.And(k < in_features, token < x.shape[0])
        index = (T.min(token, x.shape[0] - 1), T.min(k, in_features - 1))
        return T.if_then_else(inside, T.Cast("float32", x[index]), T.float32(0))

    def biased(x, token, k, inverse):
        return T.Cast("uint8", T.Cast("int32", T.nearbyint(value(x, token, k) * inverse)) + ACTIVATION_BIAS)

    @T.macro
    def quantize(x, x_even, x_odd, x_scale, padded_tokens):
        for task in loop(padded_tokens * groups):
            with T.sblock("quantize"):
                T.reads()
                T.writes()
                token: T.let[T.int64] = task // groups
                g: T.let[T.int64] = task % groups
                amax: T.let[T.float32] = fold_tree(
                    T.max, [T.fabs(value(x, token, g * GROUP_SIZE + j)) for j in range(GROUP_SIZE)]
                )
                d: T.let[T.float32] = amax / T.float32(INT8_MAX)
                inverse: T.let[T.float32] = T.if_then_else(
                    amax > T.float32(0), T.float32(1) / d, T.float32(0)
                )
                x_scale[token, g] = d
                for p in T.vectorized(GROUP_SIZE // 2):
                    x_even[token, g * 16 + p] = biased(x, token, g * GROUP_SIZE + 2 * p, inverse)
                    x_odd[token, g * 16 + p] = biased(x, token, g * GROUP_SIZE + 2 * p + 1, inverse)

    return quantize


# one per (ISA, shape, types): parsing TVMScript is most of a compile's time, and a layer repeats its shapes
@functools.cache
def int8_gemv_kernel(
    isa: DotIsa,
    out_features: int,
    in_features: int,
    x_dtype: str,
    scale_dtype: str,
    out_dtype: str,
    prefetch_rows: bool = True,
) -> tvm.tirx.PrimFunc:
    """y [1, N] = x [1, K] @ dequantize(q_weight [N, K/8], q_scale [N, K/32])^T: one decode token.

    Lanes are the consecutive words of one row (a vector load each); ROWS_PER_STEP rows share each
    activation vector; rows run in parallel."""
    words = _words(in_features)
    groups = words // WORDS_PER_GROUP
    vec = _words_per_vector(isa, words)
    vec_bytes = 4 * vec
    rows = next(r for r in (GEMV_ROWS_PER_STEP, 2, 1) if out_features % r == 0)
    vec_groups = vec // WORDS_PER_GROUP
    quantize = _quantize_activations(in_features, 1, parallel=False)
    mask = T.broadcast(T.uint32(LOW_NIBBLES), vec)
    offset = T.broadcast(T.int8(MAX_INT), vec_bytes)
    bias = T.broadcast(T.uint8(ACTIVATION_BIAS), vec_bytes)
    zero = T.broadcast(T.int32(0), vec)

    def per_word(buffer, row, v):
        """buffer[row, group] for each word of vector v (4 words per group)."""
        if vec_groups == 1:
            return T.broadcast(T.Cast("float32", buffer[row, v]), vec)
        loaded = T.Cast(f"float32x{vec_groups}", buffer[row, T.ramp(v * vec_groups, 1, vec_groups)])
        # a shuffle has no more lanes than its inputs
        return T.Shuffle([loaded] * WORDS_PER_GROUP, [w // WORDS_PER_GROUP for w in range(vec)])

    def signed_nibbles(packed):
        return T.reinterpret(f"int8x{vec_bytes}", packed) - offset

    @T.prim_func(s_tir=True)
    def int8_gemv(
        x: T.Buffer((1, in_features), x_dtype),
        q_weight: T.Buffer((out_features, words), "uint32"),
        q_scale: T.Buffer((out_features, groups), scale_dtype),
        y: T.Buffer((1, out_features), out_dtype),
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        x_even = T.alloc_buffer((1, 4 * words), "uint8")
        x_odd = T.alloc_buffer((1, 4 * words), "uint8")
        x_scale = T.alloc_buffer((1, groups), "float32")
        quantize(x, x_even, x_odd, x_scale, T.int64(1))
        for step in T.parallel(out_features // rows):
            with T.sblock("dot"):
                T.reads()
                T.writes()
                acc = T.sblock_alloc_buffer((rows, vec), "float32")
                for r in T.unroll(rows):
                    acc[r, T.ramp(0, 1, vec)] = T.broadcast(T.float32(0), vec)
                for v in T.serial(words // vec):
                    token_scale: T.let[lanes("float32", vec)] = per_word(x_scale, 0, v)
                    x_lo: T.let[lanes("uint8", 4 * vec)] = x_even[0, T.ramp(v * vec_bytes, 1, vec_bytes)]
                    x_hi: T.let[lanes("uint8", 4 * vec)] = x_odd[0, T.ramp(v * vec_bytes, 1, vec_bytes)]
                    for r in T.unroll(rows):
                        ahead: T.let[T.int32] = T.min(step * rows + r + PREFETCH_ROWS, out_features - 1)
                        if prefetch_rows:
                            T.evaluate(prefetch(q_weight, ahead, v * vec))
                            T.evaluate(prefetch(q_scale, ahead, v * vec_groups))
                        packed: T.let[lanes("uint32", vec)] = q_weight[
                            step * rows + r, T.ramp(v * vec, 1, vec)
                        ]
                        low: T.let[lanes("int8", 4 * vec)] = signed_nibbles(packed & mask)
                        high: T.let[lanes("int8", 4 * vec)] = signed_nibbles(
                            (packed >> T.broadcast(T.uint32(4), vec)) & mask
                        )
                        # minus 128 * (sum of the word's weights): the activations' bias taken back out
                        correction: T.let[lanes("int32", vec)] = zero - isa.dot(
                            vec, zero, bias, low, bias, high
                        )
                        dot: T.let[lanes("int32", vec)] = isa.dot(vec, correction, x_lo, low, x_hi, high)
                        acc[r, T.ramp(0, 1, vec)] = acc[r, T.ramp(0, 1, vec)] + T.Cast(
                            f"float32x{vec}", dot
                        ) * (token_scale * per_word(q_scale, step * rows + r, v))
                for r in T.unroll(rows):
                    y[0, step * rows + r] = T.Cast(out_dtype, lane_fold(add, acc[r, T.ramp(0, 1, vec)], vec))

    return int8_gemv.without_attr("global_symbol")  # one per weight shape: the module names them


# cached like the GEMV
@functools.cache
def int8_gemm_kernel(
    isa: DotIsa, out_features: int, in_features: int, x_dtype: str, scale_dtype: str, out_dtype: str
) -> tvm.tirx.PrimFunc:
    """y [M, N] = x [M, K] @ dequantize(q_weight [N, K/8], q_scale [N, K/32])^T for M tokens (symbolic).

    Lanes are output rows here: a parallel task transposes the words of one vector of rows once (word w
    of 16 rows is one vector; its low nibbles then hold inputs 8w, 8w+2, 8w+4, 8w+6 of every row), and
    each token's 4 activation bytes for those inputs are broadcast against it. Integer sums run over a
    whole group before the float step, so there is one int-to-float conversion per 32 inputs."""
    words = _words(in_features)
    groups = words // WORDS_PER_GROUP
    vec = isa.max_words  # rows per task
    vec_bytes = 4 * vec
    tile = GEMM_TOKENS_PER_TILE[isa.registers]
    blocks = -(-out_features // vec)
    quantize = _quantize_activations(in_features, tile, parallel=True)
    mask = T.broadcast(T.uint32(LOW_NIBBLES), vec)
    offset = T.broadcast(T.int8(MAX_INT), vec_bytes)
    bias = T.broadcast(T.uint8(ACTIVATION_BIAS), vec_bytes)
    zero = T.broadcast(T.int32(0), vec)

    def signed_nibbles(packed):
        return T.reinterpret(f"int8x{vec_bytes}", packed) - offset

    def whole_tiles(m):
        return (m + tile - 1) // tile * tile

    def broadcast_word(buffer, token, w):
        """The 4 activation bytes of word w, repeated for every row of the vector."""
        four = T.reinterpret("int32", buffer[token, T.ramp(w * 4, 1, 4)])
        return T.reinterpret(f"uint8x{vec_bytes}", T.broadcast(four, vec))

    @T.prim_func(s_tir=True)
    def int8_gemm(
        x_handle: T.handle,
        q_weight: T.Buffer((out_features, words), "uint32"),
        q_scale: T.Buffer((out_features, groups), scale_dtype),
        y_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        m = T.int64()
        x = T.match_buffer(x_handle, (m, in_features), x_dtype)
        y = T.match_buffer(y_handle, (m, out_features), out_dtype)
        x_even = T.alloc_buffer((whole_tiles(m), 4 * words), "uint8")
        x_odd = T.alloc_buffer((whole_tiles(m), 4 * words), "uint8")
        x_scale = T.alloc_buffer((whole_tiles(m), groups), "float32")
        quantize(x, x_even, x_odd, x_scale, whole_tiles(m))
        for block in T.parallel(blocks):
            with T.sblock("dot"):
                T.reads()
                T.writes()
                transposed = T.sblock_alloc_buffer((words, vec), "uint32")
                scales_t = T.sblock_alloc_buffer((groups, vec), "float32")
                correction = T.sblock_alloc_buffer((groups, vec), "int32")
                int_acc = T.sblock_alloc_buffer((tile, vec), "int32")
                acc = T.sblock_alloc_buffer((tile, vec), "float32")
                # the block's rows transposed (a row past N repeats the last; it is never stored)
                for w, r in T.grid(words, vec):
                    transposed[w, r] = q_weight[T.min(block * vec + r, out_features - 1), w]
                for g, r in T.grid(groups, vec):
                    scales_t[g, r] = T.Cast("float32", q_scale[T.min(block * vec + r, out_features - 1), g])
                for g in T.serial(groups):
                    correction[g, T.ramp(0, 1, vec)] = zero
                    for wi in T.unroll(WORDS_PER_GROUP):
                        packed: T.let[lanes("uint32", vec)] = transposed[
                            g * WORDS_PER_GROUP + wi, T.ramp(0, 1, vec)
                        ]
                        low: T.let[lanes("int8", 4 * vec)] = signed_nibbles(packed & mask)
                        high: T.let[lanes("int8", 4 * vec)] = signed_nibbles(
                            (packed >> T.broadcast(T.uint32(4), vec)) & mask
                        )
                        correction[g, T.ramp(0, 1, vec)] = correction[g, T.ramp(0, 1, vec)] - isa.dot(
                            vec, zero, bias, low, bias, high
                        )
                for token_tile in T.serial(whole_tiles(m) // tile):
                    for t in T.unroll(tile):
                        acc[t, T.ramp(0, 1, vec)] = T.broadcast(T.float32(0), vec)
                    for g in T.serial(groups):
                        for t in T.unroll(tile):
                            int_acc[t, T.ramp(0, 1, vec)] = correction[g, T.ramp(0, 1, vec)]
                        for wi in T.unroll(WORDS_PER_GROUP):
                            packed: T.let[lanes("uint32", vec)] = transposed[
                                g * WORDS_PER_GROUP + wi, T.ramp(0, 1, vec)
                            ]
                            low: T.let[lanes("int8", 4 * vec)] = signed_nibbles(packed & mask)
                            high: T.let[lanes("int8", 4 * vec)] = signed_nibbles(
                                (packed >> T.broadcast(T.uint32(4), vec)) & mask
                            )
                            for t in T.unroll(tile):
                                token: T.let[T.int64] = token_tile * tile + t
                                w: T.let[T.int32] = g * WORDS_PER_GROUP + wi
                                int_acc[t, T.ramp(0, 1, vec)] = isa.dot(
                                    vec,
                                    int_acc[t, T.ramp(0, 1, vec)],
                                    broadcast_word(x_even, token, w),
                                    low,
                                    broadcast_word(x_odd, token, w),
                                    high,
                                )
                        for t in T.unroll(tile):
                            acc[t, T.ramp(0, 1, vec)] = acc[t, T.ramp(0, 1, vec)] + T.Cast(
                                f"float32x{vec}", int_acc[t, T.ramp(0, 1, vec)]
                            ) * (scales_t[g, T.ramp(0, 1, vec)] * x_scale[token_tile * tile + t, g])
                    for t, r in T.grid(tile, vec):
                        if T.And(token_tile * tile + t < m, block * vec + r < out_features):
                            y[token_tile * tile + t, block * vec + r] = T.Cast(out_dtype, acc[t, r])

    return int8_gemm.without_attr("global_symbol")  # one per weight shape: the module names them
