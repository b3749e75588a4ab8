"""The CPU decode-attention kernel alone, at Megrez-3B's shape: milliseconds per token (its 32 layers).

    python benchmarks/attention_cpu.py [--contexts 2048,8192] [--dtypes float16,float32] [--threads N]

Every layer reads its own pages, so the cache (640 MiB at 8K tokens in float16) streams from memory as
in a real decode step; the page table is shuffled, as a cache that has served other sequences is. Prints
the median of --repeat tokens and the rate at which it read the cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megrez_mlc.runtime.threads import configure_threads

LAYERS, KV_HEADS, HEADS, HEAD_DIM, PAGE = 32, 10, 40, 64, 16  # Megrez-3B


def milliseconds_per_token(dtype: str, context: int, repeat: int) -> float:
    import tvm

    from megrez_mlc.compile.cpu_attention import paged_decode_attention_cpu
    from megrez_mlc.compile.targets import host_llvm_target

    kernel = paged_decode_attention_cpu(KV_HEADS, HEADS, HEAD_DIM, dtype)
    run = tvm.compile(tvm.IRModule({"attention": kernel}), target=host_llvm_target())[
        "batch_decode_paged_kv_cpu"
    ]
    rng = np.random.default_rng(0)
    pages_per_layer = -(-context // PAGE)
    pool = rng.standard_normal((LAYERS * pages_per_layer, 2, KV_HEADS, PAGE, HEAD_DIM)).astype(dtype)
    order = rng.permutation(len(pool)).astype("int32")

    def ints(values) -> tvm.runtime.Tensor:
        return tvm.runtime.tensor(np.asarray(values, "int32"))

    pages = tvm.runtime.tensor(pool)
    q = tvm.runtime.tensor(rng.standard_normal((1, HEADS, HEAD_DIM)).astype(dtype))
    out = tvm.runtime.tensor(np.zeros((1, HEADS, HEAD_DIM), dtype))
    lse = tvm.runtime.tensor(np.zeros((1, HEADS), "float32"))
    indptr, last_len, zero = (
        ints([0, pages_per_layer]),
        ints([context - (pages_per_layer - 1) * PAGE]),
        ints([0]),
    )
    tables = [ints(order[layer * pages_per_layer : (layer + 1) * pages_per_layer]) for layer in range(LAYERS)]
    times = []
    for _ in range(repeat + 1):  # the first token warms up
        start = time.perf_counter()
        for table in tables:
            run(q, pages, indptr, table, last_len, zero, zero, out, lse, 0, 1.0, 1e4, HEAD_DIM**-0.5)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--contexts", default="2048,8192")
    parser.add_argument("--dtypes", default="float16,float32")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=10)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    print(
        f"decode attention, Megrez-3B shape ({LAYERS} layers, {HEADS} heads, {KV_HEADS} KV heads, "
        f"head_dim {HEAD_DIM}), {threads} threads, median of {args.repeat} tokens"
    )
    print("| KV cache | context | ms per token | cache read GB/s |")
    print("| --- | ---: | ---: | ---: |")
    for dtype in args.dtypes.split(","):
        for context in map(int, args.contexts.split(",")):
            ms = milliseconds_per_token(dtype, context, args.repeat)
            cache_bytes = 2 * LAYERS * KV_HEADS * context * HEAD_DIM * np.dtype(dtype).itemsize
            print(f"| {dtype} | {context} | {ms:.1f} | {cache_bytes / ms / 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
