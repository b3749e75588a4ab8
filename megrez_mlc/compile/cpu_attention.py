"""A CPU decode-attention kernel for TVM's paged KV cache, replacing TVM's serial reference kernel.

TVM 0.27's `batch_decode_paged_kv_cpu` walks every cached position one at a time, for every query head
separately (so each K/V row is read `group_size` times) with scalar arithmetic on one thread; at a 2K-token
context it cost more than all the weight GEMVs of a decode step. This kernel has the same signature and
results, but:
  - runs the (sequence, KV head) pairs in parallel;
  - serves all query heads of a GQA group from one pass over the group's K and V pages, each key and
    value converted to float32 once (a float16 cache halves what a long context reads);
  - works PAGES_PER_STEP pages (32 positions) at a time with an online softmax, so the accumulators are
    rescaled once per step instead of once per position;
  - vectorizes the head dimension: Q.K by 16-lane partial sums whose lanes 16 keys fold together in
    registers, P.V by 16-lane FMAs;
  - prefetches the pages of the next step (the hardware prefetchers stop at each 4 KiB page, and the
    cache's pages are scattered).
It supports what megrez-mlc's KV cache uses: RoPE applied before the cache (RopeMode.NORMAL, so the
kernel's `rotary_mode` is 0) and no sliding window (TVM's own kernel still serves the sliding-window slot).
"""

from __future__ import annotations

import math

import tvm
from tvm.script import tirx as T

from .ops import fast_exp2, prefetch

MAX_LANES = 16  # float32 lanes of one AVX-512 vector (LLVM splits it for narrower ISAs)
LOG2_E = math.log2(math.e)
KEY_BLOCK = 16  # keys per softmax step: one page of TVM's KV cache
MASKED = -5e4  # scores are in log2 units; 2**(MASKED - max) underflows to zero, as in TVM's kernels
PAGES_PER_STEP = 2  # decode: pages per online-softmax step (its max, exponentials and rescale per 32 keys)
CACHE_LINE = 64  # bytes


def add(a, b):
    return a + b


def fold_tree(combine, values: list):
    """combine(...) over the values as a balanced tree (short dependency chains, vector-friendly)."""
    while len(values) > 1:
        values = [
            combine(*values[i : i + 2]) if i + 1 < len(values) else values[i]
            for i in range(0, len(values), 2)
        ]
    return values[0]


def lane_fold(combine, vector, lanes: int):
    """combine(...) over a vector's lanes as a tree of halves (log2(lanes) vector steps, not lanes - 1
    scalar ones)."""
    while lanes > 1:
        lanes //= 2
        vector = combine(
            T.Shuffle([vector], list(range(lanes))), T.Shuffle([vector], list(range(lanes, 2 * lanes)))
        )
    return vector


def _block_max(buffer, *row):
    """Largest of buffer[*row, 0:KEY_BLOCK]."""
    return fold_tree(T.max, [buffer[(*row, j)] for j in range(KEY_BLOCK)])


def _block_sum(buffer, *row):
    """Sum of buffer[*row, 0:KEY_BLOCK]."""
    return fold_tree(add, [buffer[(*row, j)] for j in range(KEY_BLOCK)])


def _transposed_lane_sums(vectors: list):
    """[sum of the lanes of vectors[row] for row in 0..15] as one vector, for 16 vectors of 16 lanes: each
    step pairs two vectors and adds their halves, so rows never mix (15 adds for 16 rows, not 16 lane
    reductions), all in registers."""
    width = MAX_LANES  # lanes each row still spans
    while len(vectors) > 1:
        width //= 2
        # of the 32 lanes of (a, b): each row's first `width` lanes, then its last `width` lanes
        rows_lanes = [(r, lane) for r in range(2 * MAX_LANES // (2 * width)) for lane in range(width)]
        first = [r * 2 * width + lane for r, lane in rows_lanes]
        second = [r * 2 * width + width + lane for r, lane in rows_lanes]
        vectors = [
            T.Shuffle([a, b], first) + T.Shuffle([a, b], second) for a, b in zip(vectors[::2], vectors[1::2])
        ]
    return vectors[0]


def _dot_lanes(q, g, keys, row, chunks: int):
    """16 lane partial sums of q[g, :] . keys[row, :] (head_dim = 16 x chunks)."""
    return fold_tree(
        add,
        [
            q[g, T.ramp(c * MAX_LANES, 1, MAX_LANES)] * keys[row, T.ramp(c * MAX_LANES, 1, MAX_LANES)]
            for c in range(chunks)
        ],
    )


def _vector_fold(combine, buffer, g):
    """combine(...) over buffer[g, :] (a multiple of 16 long): lane-wise over its vectors, then a tree over
    the lanes."""
    width = int(buffer.shape[1])
    vector = fold_tree(combine, [buffer[g, T.ramp(i, 1, MAX_LANES)] for i in range(0, width, MAX_LANES)])
    return lane_fold(combine, vector, MAX_LANES)


def _exp2_clamped(x):
    return fast_exp2(T.max(x, T.float32(-126)))


def paged_decode_attention_cpu(
    num_kv_heads: int,
    num_qo_heads: int,
    head_dim: int,
    dtype: str,
    page_size: int = 16,
    prefetch_pages: bool = True,
):
    """TIR function with the signature of TVM's `batch_decode_paged_kv_cpu` (no sliding window)."""
    group = num_qo_heads // num_kv_heads
    lanes = next(n for n in (MAX_LANES, 8, 4, 2, 1) if head_dim % n == 0)
    chunks = head_dim // lanes
    tree = lanes == MAX_LANES  # 16 keys fold their lane sums together (_transposed_lane_sums)
    step_keys = PAGES_PER_STEP * page_size
    line_elements = CACHE_LINE * 8 // tvm.DataType(dtype).bits
    lines = -(-page_size * head_dim // line_elements)  # of one page's keys (and as many of its values)

    @T.prim_func(s_tir=True)
    def batch_decode_paged_kv_cpu(
        q_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr(
            {"tirx.is_scheduled": True, "tirx.noalias": True, "global_symbol": "batch_decode_paged_kv_cpu"}
        )
        batch = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        length_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        q = T.match_buffer(q_handle, (batch, num_qo_heads, head_dim), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, num_kv_heads, page_size, head_dim), dtype)
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        last_page_len = T.match_buffer(length_info_handle, (batch,), "int32", elem_offset=length_offset)
        k_rope_pos_offset = T.match_buffer(  # noqa: F841 (the runtime passes it; RoPE is applied before the cache)
            k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset
        )
        q_rope_position = T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)  # noqa: F841
        output = T.match_buffer(output_handle, (batch, num_qo_heads, head_dim), dtype)
        lse = T.match_buffer(lse_handle, (batch, num_qo_heads), "float32")

        assert rotary_mode == 0, "megrez-mlc's CPU decode attention expects RoPE applied before the cache"
        for task in T.parallel(batch * num_kv_heads):
            with T.sblock("decode_attention"):
                # an opaque block: its regions depend on page-table values read inside it
                T.reads()
                T.writes()
                b: T.let[T.int32] = task // num_kv_heads
                kv_head: T.let[T.int32] = task % num_kv_heads
                q_f32 = T.sblock_alloc_buffer((group, head_dim), "float32")
                acc = T.sblock_alloc_buffer((group, head_dim), "float32")
                running_max = T.sblock_alloc_buffer((group,), "float32")
                running_sum = T.sblock_alloc_buffer((group,), "float32")
                page_nos = T.sblock_alloc_buffer((PAGES_PER_STEP,), "int32")
                page_rows = T.sblock_alloc_buffer((PAGES_PER_STEP,), "int32")
                keys = T.sblock_alloc_buffer((step_keys, head_dim), "float32")
                value = T.sblock_alloc_buffer((head_dim,), "float32")
                partial = T.sblock_alloc_buffer((lanes,), "float32")
                scores = T.sblock_alloc_buffer((group, step_keys), "float32")
                first_page: T.let[T.int32] = page_indptr[b]
                num_pages: T.let[T.int32] = page_indptr[b + 1] - first_page
                last: T.let[T.int32] = num_pages - 1
                for g in T.serial(group):
                    # as in TVM's kernel: an empty sequence gives output 0 and lse -5e4
                    running_max[g] = T.float32(-5e4)
                    running_sum[g] = T.float32(1)
                    for d in T.vectorized(head_dim):
                        acc[g, d] = T.float32(0)
                        # scores in log2 units: the scale folded into the query once
                        q_f32[g, d] = T.Cast("float32", q[b, kv_head * group + g, d]) * (
                            sm_scale * T.float32(LOG2_E)
                        )
                for step in T.serial((num_pages + PAGES_PER_STEP - 1) // PAGES_PER_STEP):
                    for p in T.unroll(PAGES_PER_STEP):
                        page: T.let[T.int32] = step * PAGES_PER_STEP + p
                        # pages past the sequence's end: its last page again, with no rows
                        page_nos[p] = page_values[first_page + T.min(page, last)]
                        page_rows[p] = T.Select(
                            page < last, page_size, T.Select(page == last, last_page_len[b], 0)
                        )
                        ahead: T.let[T.int32] = page_values[first_page + T.min(page + PAGES_PER_STEP, last)]
                        if prefetch_pages:
                            for kv in T.unroll(2):
                                for line in T.unroll(lines):
                                    T.evaluate(
                                        prefetch(
                                            pages,
                                            ahead,
                                            kv,
                                            kv_head,
                                            line * line_elements // head_dim,
                                            line * line_elements % head_dim,
                                        )
                                    )
                        # the step's keys in float32 once for the group, all page_size rows of each page
                        # (past the sequence's end they may be anything: masked below by a select)
                        for row in T.serial(page_size):
                            for d in T.vectorized(head_dim):
                                keys[p * page_size + row, d] = T.Cast(
                                    "float32", pages[page_nos[p], 0, kv_head, row, d]
                                )
                    for g in T.serial(group):
                        if tree:  # 16 keys' partial-sum vectors at a time, folded in registers
                            for p in T.unroll(step_keys // KEY_BLOCK):
                                scores[g, T.ramp(p * KEY_BLOCK, 1, KEY_BLOCK)] = _transposed_lane_sums(
                                    [
                                        _dot_lanes(q_f32, g, keys, p * KEY_BLOCK + row, chunks)
                                        for row in range(KEY_BLOCK)
                                    ]
                                )
                        else:
                            for j in T.serial(step_keys):
                                for lane in T.vectorized(lanes):
                                    partial[lane] = fold_tree(
                                        add,
                                        [
                                            q_f32[g, c * lanes + lane] * keys[j, c * lanes + lane]
                                            for c in range(chunks)
                                        ],
                                    )
                                scores[g, j] = fold_tree(add, [partial[lane] for lane in range(lanes)])
                        # the online softmax once per step, its exponentials as vectors (selects, not
                        # if_then_else, which becomes a branch per key)
                        for j in T.vectorized(step_keys):
                            scores[g, j] = T.Select(
                                j % page_size < page_rows[j // page_size], scores[g, j], T.float32(MASKED)
                            )
                        step_max: T.let[T.float32] = T.max(running_max[g], _vector_fold(T.max, scores, g))
                        rescale: T.let[T.float32] = _exp2_clamped(running_max[g] - step_max)
                        for j in T.vectorized(step_keys):
                            scores[g, j] = _exp2_clamped(scores[g, j] - step_max)
                        running_max[g] = step_max
                        running_sum[g] = running_sum[g] * rescale + _vector_fold(add, scores, g)
                        for d in T.vectorized(head_dim):
                            acc[g, d] = acc[g, d] * rescale
                    # P.V: each value converted once for the group; only the sequence's rows (0 x a
                    # non-finite value past its end would not be 0)
                    for p in T.serial(PAGES_PER_STEP):
                        for row in T.serial(page_rows[p]):
                            for d in T.vectorized(head_dim):
                                value[d] = T.Cast("float32", pages[page_nos[p], 1, kv_head, row, d])
                            for g in T.serial(group):
                                for d in T.vectorized(head_dim):
                                    acc[g, d] = acc[g, d] + scores[g, p * page_size + row] * value[d]
                for g in T.serial(group):
                    for d in T.vectorized(head_dim):
                        output[b, kv_head * group + g, d] = T.Cast(dtype, acc[g, d] / running_sum[g])
                    lse[b, kv_head * group + g] = running_max[g] + T.log2(running_sum[g])

    return batch_decode_paged_kv_cpu


# --- prefill ------------------------------------------------------------------------------------------------
#
# TVM's CPU prefill kernels are reference loops too: one query head and one key at a time, and the paged
# one walks the *whole page pool* (max_num_pages * page_size rows) for every query, whatever the sequence
# length, while reading `scale_O[d]` past its one-element buffer. These two replace them (same signatures)
# with a blocked online softmax: a tile of QUERY_BLOCK positions x the GQA group's heads against blocks of
# KEY_BLOCK keys, the keys transposed once per block so both products are vector FMAs over 16 lanes.

QUERY_BLOCK = 4  # query positions per tile; with 4 query heads per KV head, 16 rows of 64-wide accumulators


def _prefill_tile_macros(group: int, head_dim: int, dtype: str):
    rows = QUERY_BLOCK * group

    @T.macro
    def start_tile(q, q_tile, acc, row_max, row_sum, first_row, q_count, kv_head, scale):
        """Row r = (query in tile) * group + (head in group): q_tile[r] = its query * scale; empty softmax
        state (as in TVM's kernels, a row that sees no key ends with output 0 and lse -5e4)."""
        for r in T.serial(rows):
            query: T.let[T.int32] = T.min(r // group, q_count - 1)
            row_max[r] = T.float32(MASKED)
            row_sum[r] = T.float32(1)
            for d in T.vectorized(head_dim):
                q_tile[r, d] = T.Cast("float32", q[first_row + query, kv_head * group + r % group, d]) * scale
                acc[r, d] = T.float32(0)

    @T.macro
    def attend(
        q_tile,
        k_t,
        v_block,
        acc,
        row_max,
        row_sum,
        scores,
        key_first,
        key_count,
        query_first,
        kv_len,
        qo_len,
        causal,
    ):
        """Online-softmax update of the tile's rows with one block of keys (k_t is [head_dim, KEY_BLOCK])."""
        for r in T.serial(rows):
            query: T.let[T.int32] = query_first + r // group
            last_visible: T.let[T.int32] = T.if_then_else(causal > 0, kv_len - qo_len + query, kv_len - 1)
            for j in T.vectorized(KEY_BLOCK):
                scores[j] = T.float32(0)
            for d in T.serial(head_dim):
                for j in T.vectorized(KEY_BLOCK):
                    scores[j] = scores[j] + q_tile[r, d] * k_t[d, j]
            for j in T.vectorized(KEY_BLOCK):
                scores[j] = T.if_then_else(
                    (j < key_count) & (key_first + j <= last_visible), scores[j], T.float32(MASKED)
                )
            block_max: T.let[T.float32] = T.max(row_max[r], _block_max(scores))
            rescale: T.let[T.float32] = _exp2_clamped(row_max[r] - block_max)
            for j in T.vectorized(KEY_BLOCK):
                scores[j] = _exp2_clamped(scores[j] - block_max)
            row_max[r] = block_max
            row_sum[r] = row_sum[r] * rescale + _block_sum(scores)
            for d in T.vectorized(head_dim):
                acc[r, d] = acc[r, d] * rescale
            for j in T.serial(KEY_BLOCK):
                for d in T.vectorized(head_dim):
                    acc[r, d] = acc[r, d] + scores[j] * v_block[j, d]

    @T.macro
    def load_keys(k, v, k_t, v_block, first_key, key_first, key_count, kv_head):
        """One block of keys (transposed, [head_dim, KEY_BLOCK]) and values in float32, rows past the
        sequence's end repeating its last one (their scores are masked)."""
        for j in T.serial(KEY_BLOCK):
            key: T.let[T.int32] = first_key + key_first + T.min(j, key_count - 1)
            for d in T.serial(head_dim):
                k_t[d, j] = T.Cast("float32", k[key, kv_head, d])
            for d in T.vectorized(head_dim):
                v_block[j, d] = T.Cast("float32", v[key, kv_head, d])

    @T.macro
    def store(output, lse, acc, row_max, row_sum, first_row, q_count, kv_head):
        for r in T.serial(rows):
            if r // group < q_count:
                for d in T.vectorized(head_dim):
                    output[first_row + r // group, kv_head * group + r % group, d] = T.Cast(
                        dtype, acc[r, d] / row_sum[r]
                    )
                lse[first_row + r // group, kv_head * group + r % group] = row_max[r] + T.log2(row_sum[r])

    return start_tile, attend, load_keys, store


def _interleaved_tile(task: int, tiles: int):
    """Tiles in the order 0, n-1, 1, n-2, ...: with a causal mask later tiles cost more, and TVM hands each
    thread a contiguous range of tasks, so interleaving balances the threads."""
    return T.if_then_else(task % 2 == 0, task // 2, tiles - 1 - task // 2)


def ragged_prefill_attention_cpu(num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str):
    """TIR function with the signature of TVM's `batch_prefill_ragged_kv` (CPU): the new tokens' own
    queries, keys and values, ragged over the batch."""
    group = num_qo_heads // num_kv_heads
    rows = QUERY_BLOCK * group
    start_tile, attend, load_keys, store = _prefill_tile_macros(group, head_dim, dtype)

    @T.prim_func(s_tir=True)
    def batch_prefill_ragged_kv(
        q_handle: T.handle,
        q_indptr_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        kv_indptr_handle: T.handle,
        q_rope_position_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr(
            {"tirx.is_scheduled": True, "tirx.noalias": True, "global_symbol": "batch_prefill_ragged_kv"}
        )
        batch = T.int32()
        qo_total = T.int32()
        kv_total = T.int32()
        q_indptr_offset = T.int32()
        kv_indptr_offset = T.int32()
        q_rope_offset = T.int32()
        k_rope_offset = T.int32()
        q = T.match_buffer(q_handle, (qo_total, num_qo_heads, head_dim), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (batch + 1,), "int32", elem_offset=q_indptr_offset)
        k = T.match_buffer(k_handle, (kv_total, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(v_handle, (kv_total, num_kv_heads, head_dim), dtype)
        kv_indptr = T.match_buffer(kv_indptr_handle, (batch + 1,), "int32", elem_offset=kv_indptr_offset)
        q_rope_position = T.match_buffer(  # noqa: F841 (the runtime passes it; RoPE is applied before the cache)
            q_rope_position_handle, (qo_total,), "int32", elem_offset=q_rope_offset
        )
        k_rope_pos_offset = T.match_buffer(  # noqa: F841 (the runtime passes it; RoPE is applied before the cache)
            k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset
        )
        output = T.match_buffer(output_handle, (qo_total, num_qo_heads, head_dim), dtype)
        lse = T.match_buffer(lse_handle, (qo_total, num_qo_heads), "float32")

        assert rotary_mode == 0, "megrez-mlc's CPU prefill attention expects RoPE applied before attention"
        for b in T.serial(batch):
            with T.sblock("sequence"):
                T.reads()
                T.writes()
                qo_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                kv_len: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                tiles: T.let[T.int32] = (qo_len + QUERY_BLOCK - 1) // QUERY_BLOCK
                for task in T.parallel(num_kv_heads * tiles):
                    with T.sblock("tile"):
                        T.reads()
                        T.writes()
                        kv_head: T.let[T.int32] = task // tiles
                        tile: T.let[T.int32] = _interleaved_tile(task % tiles, tiles)
                        query_first: T.let[T.int32] = tile * QUERY_BLOCK
                        q_count: T.let[T.int32] = T.min(QUERY_BLOCK, qo_len - query_first)
                        q_tile = T.sblock_alloc_buffer((rows, head_dim), "float32")
                        acc = T.sblock_alloc_buffer((rows, head_dim), "float32")
                        row_max = T.sblock_alloc_buffer((rows,), "float32")
                        row_sum = T.sblock_alloc_buffer((rows,), "float32")
                        k_t = T.sblock_alloc_buffer((head_dim, KEY_BLOCK), "float32")
                        v_block = T.sblock_alloc_buffer((KEY_BLOCK, head_dim), "float32")
                        scores = T.sblock_alloc_buffer((KEY_BLOCK,), "float32")
                        start_tile(
                            q,
                            q_tile,
                            acc,
                            row_max,
                            row_sum,
                            q_indptr[b] + query_first,
                            q_count,
                            kv_head,
                            sm_scale * T.float32(LOG2_E),
                        )
                        # keys past the tile's last query are never visible under the causal mask
                        visible: T.let[T.int32] = T.if_then_else(
                            causal > 0, T.min(kv_len, kv_len - qo_len + query_first + q_count), kv_len
                        )
                        for block in T.serial((visible + KEY_BLOCK - 1) // KEY_BLOCK):
                            key_first: T.let[T.int32] = block * KEY_BLOCK
                            key_count: T.let[T.int32] = T.min(KEY_BLOCK, visible - key_first)
                            load_keys(k, v, k_t, v_block, kv_indptr[b], key_first, key_count, kv_head)
                            attend(
                                q_tile,
                                k_t,
                                v_block,
                                acc,
                                row_max,
                                row_sum,
                                scores,
                                key_first,
                                key_count,
                                query_first,
                                kv_len,
                                qo_len,
                                causal,
                            )
                        store(output, lse, acc, row_max, row_sum, q_indptr[b] + query_first, q_count, kv_head)

    return batch_prefill_ragged_kv


def paged_prefill_attention_cpu(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16
):
    """TIR function with the signature of TVM's `batch_prefill_paged_kv_cpu` (no sliding window): the new
    tokens' queries against the keys and values already in the cache's pages."""
    assert page_size == KEY_BLOCK, "one key block is one page"
    group = num_qo_heads // num_kv_heads
    rows = QUERY_BLOCK * group
    start_tile, attend, _, store = _prefill_tile_macros(group, head_dim, dtype)  # keys: from pages, below

    @T.prim_func(s_tir=True)
    def batch_prefill_paged_kv_cpu(
        q_handle: T.handle,
        q_indptr_handle: T.handle,
        pages_handle: T.handle,
        page_indptr_handle: T.handle,
        page_values_handle: T.handle,
        length_info_handle: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr(
            {"tirx.is_scheduled": True, "tirx.noalias": True, "global_symbol": "batch_prefill_paged_kv_cpu"}
        )
        batch = T.int32()
        qo_total = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_offset = T.int32()
        indptr_offset = T.int32()
        values_offset = T.int32()
        length_offset = T.int32()
        k_rope_offset = T.int32()
        q_rope_offset = T.int32()
        q = T.match_buffer(q_handle, (qo_total, num_qo_heads, head_dim), dtype)
        q_indptr = T.match_buffer(q_indptr_handle, (batch + 1,), "int32", elem_offset=q_indptr_offset)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, num_kv_heads, page_size, head_dim), dtype)
        page_indptr = T.match_buffer(page_indptr_handle, (batch + 1,), "int32", elem_offset=indptr_offset)
        page_values = T.match_buffer(page_values_handle, (nnz_pages,), "int32", elem_offset=values_offset)
        last_page_len = T.match_buffer(length_info_handle, (batch,), "int32", elem_offset=length_offset)
        k_rope_pos_offset = T.match_buffer(  # noqa: F841 (the runtime passes it; RoPE is applied before the cache)
            k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset
        )
        q_rope_position = T.match_buffer(  # noqa: F841 (the runtime passes it; RoPE is applied before the cache)
            q_rope_position_handle, (qo_total,), "int32", elem_offset=q_rope_offset
        )
        output = T.match_buffer(output_handle, (qo_total, num_qo_heads, head_dim), dtype)
        lse = T.match_buffer(lse_handle, (qo_total, num_qo_heads), "float32")

        assert rotary_mode == 0, "megrez-mlc's CPU prefill attention expects RoPE applied before attention"
        for b in T.serial(batch):
            with T.sblock("sequence"):
                T.reads()
                T.writes()
                qo_len: T.let[T.int32] = q_indptr[b + 1] - q_indptr[b]
                first_page: T.let[T.int32] = page_indptr[b]
                num_pages: T.let[T.int32] = page_indptr[b + 1] - first_page
                kv_len: T.let[T.int32] = T.if_then_else(
                    num_pages > 0, (num_pages - 1) * page_size + last_page_len[b], 0
                )
                tiles: T.let[T.int32] = (qo_len + QUERY_BLOCK - 1) // QUERY_BLOCK
                for task in T.parallel(num_kv_heads * tiles):
                    with T.sblock("tile"):
                        T.reads()
                        T.writes()
                        kv_head: T.let[T.int32] = task // tiles
                        tile: T.let[T.int32] = _interleaved_tile(task % tiles, tiles)
                        query_first: T.let[T.int32] = tile * QUERY_BLOCK
                        q_count: T.let[T.int32] = T.min(QUERY_BLOCK, qo_len - query_first)
                        q_tile = T.sblock_alloc_buffer((rows, head_dim), "float32")
                        acc = T.sblock_alloc_buffer((rows, head_dim), "float32")
                        row_max = T.sblock_alloc_buffer((rows,), "float32")
                        row_sum = T.sblock_alloc_buffer((rows,), "float32")
                        k_t = T.sblock_alloc_buffer((head_dim, KEY_BLOCK), "float32")
                        v_block = T.sblock_alloc_buffer((KEY_BLOCK, head_dim), "float32")
                        scores = T.sblock_alloc_buffer((KEY_BLOCK,), "float32")
                        start_tile(
                            q,
                            q_tile,
                            acc,
                            row_max,
                            row_sum,
                            q_indptr[b] + query_first,
                            q_count,
                            kv_head,
                            sm_scale * T.float32(LOG2_E),
                        )
                        visible: T.let[T.int32] = T.if_then_else(
                            causal > 0,
                            T.max(T.min(kv_len, kv_len - qo_len + query_first + q_count), 0),
                            kv_len,
                        )
                        for page in T.serial((visible + page_size - 1) // page_size):
                            page_no: T.let[T.int32] = page_values[first_page + page]
                            key_count: T.let[T.int32] = T.min(page_size, visible - page * page_size)
                            for j in T.serial(page_size):
                                row: T.let[T.int32] = T.min(j, key_count - 1)
                                for d in T.serial(head_dim):
                                    k_t[d, j] = T.Cast("float32", pages[page_no, 0, kv_head, row, d])
                                for d in T.vectorized(head_dim):
                                    v_block[j, d] = T.Cast("float32", pages[page_no, 1, kv_head, row, d])
                            attend(
                                q_tile,
                                k_t,
                                v_block,
                                acc,
                                row_max,
                                row_sum,
                                scores,
                                page * page_size,
                                key_count,
                                query_first,
                                kv_len,
                                qo_len,
                                causal,
                            )
                        store(output, lse, acc, row_max, row_sum, q_indptr[b] + query_first, q_count, kv_head)

    return batch_prefill_paged_kv_cpu


def full_attention_cpu(num_heads: int, head_dim: int, dtype: str):
    """Attention without a mask or a cache, q [q_len, heads, head_dim] against k and v [kv_len, heads,
    head_dim], for the vision tower (its patches attend to each other) and the resampler (its queries to the
    patches): the prefill kernel's tiles and online softmax, over one sequence. Outputs the attention and
    each row's log2-sum-exp (unused, as the tile macros write it)."""
    start_tile, attend, load_keys, store = _prefill_tile_macros(1, head_dim, dtype)

    @T.prim_func(s_tir=True)
    def full_attention(
        q_handle: T.handle,
        k_handle: T.handle,
        v_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
    ):
        T.func_attr({"tirx.is_scheduled": True, "tirx.noalias": True})
        q_len = T.int64()
        kv_len = T.int64()
        q = T.match_buffer(q_handle, (q_len, num_heads, head_dim), dtype)
        k = T.match_buffer(k_handle, (kv_len, num_heads, head_dim), dtype)
        v = T.match_buffer(v_handle, (kv_len, num_heads, head_dim), dtype)
        output = T.match_buffer(output_handle, (q_len, num_heads, head_dim), dtype)
        lse = T.match_buffer(lse_handle, (q_len, num_heads), "float32")
        with T.sblock("root"):
            qo: T.let[T.int32] = T.Cast("int32", q_len)
            kv: T.let[T.int32] = T.Cast("int32", kv_len)
            tiles: T.let[T.int32] = (qo + QUERY_BLOCK - 1) // QUERY_BLOCK
            for task in T.parallel(num_heads * tiles):
                with T.sblock("tile"):
                    T.reads()
                    T.writes()
                    head: T.let[T.int32] = task // tiles
                    query_first: T.let[T.int32] = task % tiles * QUERY_BLOCK
                    q_count: T.let[T.int32] = T.min(QUERY_BLOCK, qo - query_first)
                    q_tile = T.sblock_alloc_buffer((QUERY_BLOCK, head_dim), "float32")
                    acc = T.sblock_alloc_buffer((QUERY_BLOCK, head_dim), "float32")
                    row_max = T.sblock_alloc_buffer((QUERY_BLOCK,), "float32")
                    row_sum = T.sblock_alloc_buffer((QUERY_BLOCK,), "float32")
                    k_t = T.sblock_alloc_buffer((head_dim, KEY_BLOCK), "float32")
                    v_block = T.sblock_alloc_buffer((KEY_BLOCK, head_dim), "float32")
                    scores = T.sblock_alloc_buffer((KEY_BLOCK,), "float32")
                    scale: T.let[T.float32] = T.float32(head_dim**-0.5 * LOG2_E)
                    start_tile(q, q_tile, acc, row_max, row_sum, query_first, q_count, head, scale)
                    for block in T.serial((kv + KEY_BLOCK - 1) // KEY_BLOCK):
                        key_first: T.let[T.int32] = block * KEY_BLOCK
                        key_count: T.let[T.int32] = T.min(KEY_BLOCK, kv - key_first)
                        load_keys(k, v, k_t, v_block, 0, key_first, key_count, head)
                        attend(
                            q_tile,
                            k_t,
                            v_block,
                            acc,
                            row_max,
                            row_sum,
                            scores,
                            key_first,
                            key_count,
                            query_first,
                            kv,
                            qo,
                            0,
                        )
                    store(output, lse, acc, row_max, row_sum, query_first, q_count, head)

    # one function per shape (the tower's and the resampler's differ), each under its own symbol
    return full_attention.with_attr("global_symbol", f"full_attention_{num_heads}x{head_dim}_{dtype}")
