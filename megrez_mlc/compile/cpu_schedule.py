"""CPU schedules: vectorized for the host's SIMD width, parallel across cores, as DLight schedule rules.

Decode reads every weight once per token, so its quantized GEMV (compile/ops.py `dequantize_gemv_cpu`)
must unpack int4 as cheaply as it can: 16 words (128 weights) per vector, four vector operations per 16
weights, one row per thread step (measured ~44 G weights/s per Zen 5 core, which makes decode compute-
rather than bandwidth-bound there). Prefill is bound by arithmetic: a tiled GEMM dequantizes a tile of NB
output rows once (into a [K, NB] float32 block that stays in L2) and runs an MB x NB register-blocked FMA
kernel over every MB tokens, at about the core's float32 FMA peak. Everything else (RMSNorm, SwiGLU,
residual adds) is made parallel and vectorized by generic rules. Tile sizes were measured on a Zen 5 core
(AVX-512) and are reasonable for AVX2 machines too, where LLVM splits each 16-lane vector in two.

Small per-iteration buffers keep TVM's default (global) scope: inside parallel loops TVM turns "local"
ones into a heap workspace allocation per iteration (measured: the GEMV ran 2x slower), while small global
ones become stack arrays that LLVM keeps in registers.
"""

from __future__ import annotations

import tvm
from tvm import s_tir, tirx
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

GEMM_ROWS_PER_TILE = 8  # MB: tokens per register tile (8 x 32 floats = 16 accumulator registers)
GEMM_COLS_PER_TILE = 32  # NB: output features per tile (two 16-lane vectors)
GEMV_MAX_LANES = 16  # words (of 8 weights) per vector in the quantized GEMV
SERIAL_LIMIT = 1 << 14  # injective loops smaller than this stay on one thread (a launch costs more)


def _block_names(sch: s_tir.Schedule) -> set[str]:
    """Names of the blocks directly under the root (a TE function's stages)."""
    try:
        return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    except (s_tir.ScheduleError, tvm.TVMError):
        return set()  # no root block: a hand-written kernel


def _extent(sch: s_tir.Schedule, loop: s_tir.LoopRV) -> int | None:
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def _largest_divisor(n: int | None, candidates: tuple[int, ...]) -> int:
    if n is None:
        return 1
    return next((c for c in candidates if n % c == 0), 1)


def _epilogue_blocks(sch: s_tir.Schedule, after: s_tir.SBlockRV) -> list[s_tir.SBlockRV]:
    """Blocks at the root that come after `after` (casts, residual adds fused by FuseOps)."""
    children = sch.get_child_blocks(sch.get_sblock("root"))
    names = [sch.get(b).name_hint for b in children]
    return children[names.index(sch.get(after).name_hint) + 1 :]


class QuantizedGEMV(ScheduleRule):
    """`dequantize_gemv_cpu`: lanes over consecutive words, nibbles unrolled, rows in parallel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        gemv_stages = ("x_perm", "x_wordsum", "partial", "scale_expand", "matmul")
        if not set(gemv_stages) <= _block_names(sch):
            return None
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if sch.get(block).name_hint in gemv_stages:
                break
            sch.compute_inline(block)  # a fused prologue (SwiGLU before down_proj) folds into x_perm
        matmul = sch.get_sblock("matmul")
        epilogues = _epilogue_blocks(sch, matmul)
        *_, rows, words = sch.get_loops(matmul)
        lanes = _largest_divisor(_extent(sch, words), (GEMV_MAX_LANES, 8, 4, 2))
        word_blocks, lane = sch.split(words, [None, lanes])
        per_lane = sch.rfactor(lane, factor_axis=3)  # per-lane sums [1, 1, N, lanes]: contiguous stores
        *_, rows, word_blocks, lane = sch.get_loops(per_lane)
        sch.parallel(rows)
        sch.vectorize(lane)
        sch.decompose_reduction(per_lane, word_blocks)
        # the lane sums of one row, then that row's epilogue, right after the row
        sch.reverse_compute_at(matmul, rows)
        for block in epilogues:
            sch.reverse_compute_at(block, rows)

        partial = sch.get_sblock("partial")
        sch.compute_at(partial, word_blocks)
        *_, partial_lane, nibble = sch.get_loops(partial)
        sch.reorder(nibble, partial_lane)
        sch.vectorize(partial_lane)
        sch.unroll(nibble)
        sch.decompose_reduction(partial, nibble)

        # the block's scales, each repeated for the 4 words of its group (a gather per vector otherwise)
        scale = sch.get_sblock("scale_expand")
        sch.compute_at(scale, word_blocks)
        _, group_word = sch.split(sch.get_loops(scale)[-1], [None, 4])
        sch.vectorize(group_word)

        # x_perm (with a fused SwiGLU's exp in it): once per call, vectorized along the words
        x_perm = sch.get_sblock("x_perm")
        sch.vectorize(sch.split(sch.get_loops(x_perm)[-1], [None, lanes])[1])
        return sch


class FloatGEMV(ScheduleRule):
    """One token times an unquantized [N, K] weight: lanes along K, rows in parallel."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        names = _block_names(sch)
        if "matmul" not in names or "dequantize" in names or "partial" in names:
            return None
        matmul = sch.get_sblock("matmul")
        loops = sch.get_loops(matmul)
        if any(_extent(sch, loop) != 1 for loop in loops[:-2]):
            return None  # several tokens: a GEMM
        epilogues = _epilogue_blocks(sch, matmul)
        rows, k = loops[-2:]
        lanes = _largest_divisor(_extent(sch, k), (16, 8, 4, 2))
        k_blocks, lane = sch.split(k, [None, lanes])
        per_lane = sch.rfactor(lane, factor_axis=len(loops) - 1)
        *_, rows, k_blocks, lane = sch.get_loops(per_lane)
        sch.parallel(rows)
        sch.vectorize(lane)
        sch.decompose_reduction(per_lane, k_blocks)
        sch.set_scope(per_lane, 0, "local")
        sch.reverse_compute_at(matmul, rows)
        for block in epilogues:
            sch.reverse_compute_at(block, rows)
        return sch


class TiledGEMM(ScheduleRule):
    """Several tokens ([1, M, K] or [M, 1, K], M symbolic) times a (dequantized) [N, K] weight."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        names = _block_names(sch)
        if "matmul" not in names or "partial" in names:
            return None
        matmul = sch.get_sblock("matmul")
        loops = sch.get_loops(matmul)
        if len(loops) != 4:
            return None
        nb = GEMM_COLS_PER_TILE
        # Pad the token axis to whole tiles, so the FMA kernel has no bounds checks; the output features
        # too when NB does not divide them (an odd vocabulary): a padded tile of zero weights costs less
        # than a narrower, slower tile for every column.
        token_axis = 1 if _extent(sch, loops[0]) == 1 else 0
        padding = [1, 1, 1, 1]
        padding[token_axis] = GEMM_ROWS_PER_TILE
        pad_cols = _extent(sch, loops[2]) % nb != 0
        if pad_cols:
            padding[2] = nb
        sch.pad_einsum(matmul, padding)
        weight_tile = _weight_tile(sch, matmul, quantized="dequantize" in names, padded=pad_cols)
        # the padding copies and the epilogues (casts, residual adds) around the GEMM
        gemm_blocks = (sch.get(matmul), sch.get(weight_tile))
        surroundings = [
            block
            for block in sch.get_child_blocks(sch.get_sblock("root"))
            if not any(sch.get(block).same_as(b) for b in gemm_blocks)
        ]

        b, m, n, k = sch.get_loops(matmul)
        token = m if token_axis == 1 else b
        other = b if token_axis == 1 else m
        token_tiles, token_in_tile = sch.split(token, [None, GEMM_ROWS_PER_TILE])
        col_tiles, col_in_tile = sch.split(n, [None, nb])
        sch.reorder(col_tiles, other, token_tiles, k, token_in_tile, col_in_tile)
        sch.parallel(col_tiles)
        sch.unroll(token_in_tile)
        sch.vectorize(col_in_tile)
        accumulators = sch.cache_write(matmul, 0, "local")
        sch.reverse_compute_at(accumulators, token_tiles)
        sch.vectorize(sch.get_loops(accumulators)[-1])
        sch.decompose_reduction(matmul, k)

        # The weight tile: all of K for NB columns, computed once per column tile, stored [K, NB].
        sch.compute_at(weight_tile, col_tiles)
        sch.transform_layout(weight_tile, ("write", 0), lambda row, col: (col, row))
        tile_rows, tile_k = sch.get_loops(weight_tile)[-2:]
        if "dequantize" in names and _extent(sch, tile_k) % 8 == 0:
            words, nibble = sch.split(tile_k, [None, 8])  # one word feeds 8 rows of the tile
            sch.reorder(words, nibble, tile_rows)
            sch.unroll(nibble)
        else:
            sch.reorder(tile_k, tile_rows)
        sch.vectorize(tile_rows)

        for block in surroundings:
            _parallelize(sch, block)
        return sch


def _weight_tile(
    sch: s_tir.Schedule, matmul: s_tir.SBlockRV, quantized: bool, padded: bool
) -> s_tir.SBlockRV:
    """The block that writes the GEMM's weight operand, to be computed one [K, NB] tile at a time.

    Quantized weights: the dequantize block, or, when pad_einsum padded the output features, its
    zero-padded copy with the dequantization inlined into it. Float weights: the padded copy, or a new
    copy of the weight (so the tile can be stored transposed)."""
    if not padded:
        return sch.get_sblock("dequantize") if quantized else sch.cache_read(matmul, 1, "global")
    weight = sch.get(matmul).reads[1].source
    (padded_copy,) = [b for b in sch.get_producers(matmul) if sch.get(b).writes[0].source.same_as(weight)]
    if quantized:
        sch.compute_inline(sch.get_sblock("dequantize"))
    return padded_copy


class RowNorm(ScheduleRule):
    """One reduction per row (RMSNorm): rows in parallel, the row's sum of squares computed beside it."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
        except (s_tir.ScheduleError, tvm.TVMError):
            return None
        reductions = [b for b in blocks if _is_reduction(sch, b)]
        if len(reductions) != 1 or len(blocks) < 2 or _is_reduction(sch, blocks[-1]):
            return None
        row_shape = list(sch.get(reductions[0]).writes[0].source.shape)
        output = blocks[-1]
        for block in blocks[:-1]:
            writes = sch.get(block).writes
            if block.same_as(reductions[0]) or list(writes[0].source.shape) == row_shape:
                continue  # per-row values (sum of squares, rsqrt) are computed once per row
            sch.compute_inline(block)
        *row_loops, inner = sch.get_loops(output)
        rows = sch.fuse(*row_loops) if len(row_loops) > 1 else row_loops[0]
        if _extent(sch, rows) != 1:
            sch.parallel(rows)
        for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
            sch.compute_at(block, rows)
        if _extent(sch, inner) is not None and _extent(sch, inner) % 16 == 0:
            sch.vectorize(sch.split(inner, [None, 16])[1])
        return sch


def _is_reduction(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> bool:
    return any(iv.iter_type != tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _parallelize(sch: s_tir.Schedule, block: s_tir.SBlockRV) -> None:
    """Fuse an injective block's loops, 16 elements per vector; large ones run in parallel."""
    loops = sch.get_loops(block)
    if not loops:
        return
    fused = sch.fuse(*loops)
    extent = _extent(sch, fused)
    if extent is not None and extent % 16:
        return  # an odd size (the tiny test models): leave it to LLVM
    outer, inner = sch.split(fused, [None, 16])
    sch.vectorize(inner)
    if extent is None or extent >= SERIAL_LIMIT:
        sch.parallel(outer)


class ParallelInjective(ScheduleRule):
    """Elementwise functions (SwiGLU, residual adds, casts...): one fused loop, parallel and vectorized."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool) -> s_tir.Schedule | None:
        sch = s_tir.Schedule(func)
        try:
            blocks = sch.get_child_blocks(sch.get_sblock("root"))
            if any(_is_reduction(sch, block) for block in blocks):
                return None
            for block in blocks:
                _parallelize(sch, block)
        except (s_tir.ScheduleError, tvm.TVMError):
            return None  # hand-written kernels (the KV cache's) keep their own loops
        return sch


def cpu_schedule_passes(target: Target) -> list[tvm.transform.Pass]:
    del target  # the rules read the vector width they need from the loop extents
    return [
        dl.ApplyDefaultSchedule(QuantizedGEMV(), FloatGEMV(), TiledGEMM(), RowNorm(), ParallelInjective())
    ]
