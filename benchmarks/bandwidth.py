"""Memory read bandwidth with the same TVM thread pool the model uses: a vectorized parallel sum of 1 GiB.

Decoding one token reads every weight once, so bandwidth / (bytes read per token) bounds decode speed.
"""

from __future__ import annotations

import time

import numpy as np

GIB_FLOATS = 1 << 28  # 1 GiB of float32
LANES = 16


def read_bandwidth_gb_s(threads: int, repeats: int = 5) -> float:
    """Best of `repeats` passes over a 1 GiB buffer, in GB/s (1e9 bytes)."""
    import tvm
    from tvm.script import tirx as T

    from megrez_mlc.compile.targets import host_llvm_target

    per_thread = GIB_FLOATS // threads

    @T.prim_func(s_tir=True)
    def read_sum(data: T.Buffer((GIB_FLOATS,), "float32"), sums: T.Buffer((threads, LANES), "float32")):
        T.func_attr({"tirx.noalias": True})
        for t in T.parallel(threads):
            with T.sblock("partition"):
                acc = T.sblock_alloc_buffer((LANES,), "float32")
                for lane in T.vectorized(LANES):
                    acc[lane] = T.float32(0)
                for i in T.serial(per_thread // LANES):
                    for lane in T.vectorized(LANES):
                        acc[lane] = acc[lane] + data[t * per_thread + i * LANES + lane]
                for lane in T.vectorized(LANES):
                    sums[t, lane] = acc[lane]

    lib = tvm.compile(tvm.IRModule({"main": read_sum}), target=host_llvm_target())
    func = (lib.mod if hasattr(lib, "mod") else lib)["main"]
    data = tvm.runtime.tensor(np.ones(GIB_FLOATS, dtype=np.float32))
    sums = tvm.runtime.tensor(np.zeros((threads, LANES), dtype=np.float32))
    func(data, sums)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        func(data, sums)
        best = min(best, time.perf_counter() - start)
    if not np.allclose(sums.numpy().sum(), GIB_FLOATS):
        raise RuntimeError("bandwidth kernel read the wrong data")
    return GIB_FLOATS * 4 / best / 1e9
