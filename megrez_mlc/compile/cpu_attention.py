"""A CPU decode-attention kernel for TVM's paged KV cache, replacing TVM's serial reference kernel.

TVM 0.27's `batch_decode_paged_kv_cpu` walks every cached position one at a time, for every query head
separately (so each K/V row is read `group_size` times) with scalar arithmetic on one thread; at a 2K-token
context it cost more than all the weight GEMVs of a decode step. This kernel has the same signature and
results, but:
  - runs the (sequence, KV head) pairs in parallel;
  - serves all query heads of a GQA group from one pass over the group's K and V pages;
  - works a page (16 positions) at a time with an online softmax, so the accumulators are rescaled once
    per page instead of once per position;
  - vectorizes the head dimension (Q.K by 16-lane partial sums, P.V by 16-lane FMAs).
It supports what megrez-mlc's KV cache uses: RoPE applied before the cache (RopeMode.NORMAL, so the
kernel's `rotary_mode` is 0) and no sliding window (TVM's own kernel still serves the sliding-window slot).
"""

from __future__ import annotations

import math

from tvm.script import tirx as T

MAX_LANES = 16  # float32 lanes of one AVX-512 vector (LLVM splits it for narrower ISAs)
LOG2_E = math.log2(math.e)


def paged_decode_attention_cpu(
    num_kv_heads: int, num_qo_heads: int, head_dim: int, dtype: str, page_size: int = 16
):
    """TIR function with the signature of TVM's `batch_decode_paged_kv_cpu` (no sliding window)."""
    group = num_qo_heads // num_kv_heads
    lanes = next(n for n in (MAX_LANES, 8, 4, 2, 1) if head_dim % n == 0)
    chunks = head_dim // lanes
    tree = lanes == MAX_LANES  # 16 partial sums fold 16 -> 8 -> 4 in vectors, the last 4 as scalars

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
        k_rope_pos_offset = T.match_buffer(
            k_rope_pos_offset_handle, (batch,), "int32", elem_offset=k_rope_offset
        )
        q_rope_position = T.match_buffer(q_rope_position_handle, (batch,), "int32", elem_offset=q_rope_offset)
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
                scores = T.sblock_alloc_buffer((group, page_size), "float32")
                lane_sums = T.sblock_alloc_buffer((lanes,), "float32")
                dot = T.sblock_alloc_buffer((1,), "float32")
                page_max = T.sblock_alloc_buffer((1,), "float32")
                rescale = T.sblock_alloc_buffer((1,), "float32")
                first_page: T.let[T.int32] = page_indptr[b]
                num_pages: T.let[T.int32] = page_indptr[b + 1] - first_page
                for g in T.serial(group):
                    # as in TVM's kernel: an empty sequence gives output 0 and lse -5e4
                    running_max[g] = T.float32(-5e4)
                    running_sum[g] = T.float32(1)
                    for d in T.vectorized(head_dim):
                        acc[g, d] = T.float32(0)
                        q_f32[g, d] = T.Cast("float32", q[b, kv_head * group + g, d])
                for page in T.serial(num_pages):
                    page_no: T.let[T.int32] = page_values[first_page + page]
                    rows: T.let[T.int32] = T.if_then_else(page == num_pages - 1, last_page_len[b], page_size)
                    # scores of this page, in log2 units
                    for g in T.serial(group):
                        for row in T.serial(rows):
                            for lane in T.vectorized(lanes):
                                lane_sums[lane] = T.float32(0)
                            for c in T.unroll(chunks):
                                for lane in T.vectorized(lanes):
                                    lane_sums[lane] = lane_sums[lane] + q_f32[g, c * lanes + lane] * T.Cast(
                                        "float32", pages[page_no, 0, kv_head, row, c * lanes + lane]
                                    )
                            if tree:
                                for half in T.vectorized(8):
                                    lane_sums[half] = lane_sums[half] + lane_sums[half + 8]
                                for half in T.vectorized(4):
                                    lane_sums[half] = lane_sums[half] + lane_sums[half + 4]
                                dot[0] = (lane_sums[0] + lane_sums[2]) + (lane_sums[1] + lane_sums[3])
                            else:
                                dot[0] = T.float32(0)
                                for lane in T.unroll(lanes):
                                    dot[0] = dot[0] + lane_sums[lane]
                            scores[g, row] = dot[0] * sm_scale * T.float32(LOG2_E)
                    # online softmax, once per page: rescale the accumulators, add this page's weights
                    for g in T.serial(group):
                        page_max[0] = running_max[g]
                        for row in T.serial(rows):
                            page_max[0] = T.max(page_max[0], scores[g, row])
                        rescale[0] = T.exp2(running_max[g] - page_max[0])
                        running_max[g] = page_max[0]
                        running_sum[g] = running_sum[g] * rescale[0]
                        for d in T.vectorized(head_dim):
                            acc[g, d] = acc[g, d] * rescale[0]
                        for row in T.serial(rows):
                            scores[g, row] = T.exp2(scores[g, row] - page_max[0])
                            running_sum[g] = running_sum[g] + scores[g, row]
                            for d in T.vectorized(head_dim):
                                acc[g, d] = acc[g, d] + scores[g, row] * T.Cast(
                                    "float32", pages[page_no, 1, kv_head, row, d]
                                )
                for g in T.serial(group):
                    for d in T.vectorized(head_dim):
                        output[b, kv_head * group + g, d] = T.Cast(dtype, acc[g, d] / running_sum[g])
                    lse[b, kv_head * group + g] = running_max[g] + T.log2(running_sum[g])

    return batch_decode_paged_kv_cpu
