"""The CPU decode-attention kernel (compile/cpu_attention.py) against numpy, on its own.

Pages are shuffled in the pool, the last page is partly filled and its unused rows hold NaN (what a
reused page may hold), sequences have different lengths, and head sizes take both code paths (multiples
of 16 fold their lane sums together, others reduce each key)."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from megrez_mlc.compile.cpu_attention import paged_decode_attention_cpu
from megrez_mlc.compile.targets import host_llvm_target

PAGE = 16
# float32 accumulation over a few hundred keys: ~1e-6 of the largest output; float16 outputs are rounded
# once (2**-11 relative) and their inputs were rounded before the reference saw them (it sees the same
# values), so 2**-10 of the largest output
TOLERANCE = {"float32": 1e-5, "float16": 2.0**-10}


def reference(q: np.ndarray, keys: list[np.ndarray], values: list[np.ndarray], scale: float):
    """Softmax attention per sequence, float64: output [batch, heads, d] and log2-sum-exp [batch, heads]."""
    group = q.shape[1] // keys[0].shape[1]
    outputs, lses = [], []
    for b, (k, v) in enumerate(zip(keys, values)):  # k, v: [length, kv_heads, d]
        k, v = np.repeat(k, group, axis=1).astype(np.float64), np.repeat(v, group, axis=1).astype(np.float64)
        logits = np.einsum("hd,lhd->hl", q[b].astype(np.float64), k) * scale
        top = logits.max(axis=1, keepdims=True)
        weights = np.exp(logits - top)
        outputs.append(np.einsum("hl,lhd->hd", weights, v) / weights.sum(axis=1, keepdims=True))
        lses.append((top[:, 0] + np.log(weights.sum(axis=1))) / np.log(2))
    return np.stack(outputs), np.stack(lses)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize(
    ("kv_heads", "heads", "head_dim"), [(10, 40, 64), (2, 14, 18), (3, 3, 80), (1, 5, 40)]
)
def test_decode_attention_matches_numpy(dtype: str, kv_heads: int, heads: int, head_dim: int) -> None:
    rng = np.random.default_rng(head_dim)
    lengths = [37, 1, 16, 200]
    pages_of = [-(-n // PAGE) for n in lengths]
    order = rng.permutation(sum(pages_of) + 3)  # spare pages stay unused
    pool = np.full((len(order), 2, kv_heads, PAGE, head_dim), np.nan, dtype)
    keys, values, page_values = [], [], []
    for n, count in zip(lengths, pages_of):
        k, v = (rng.standard_normal((n, kv_heads, head_dim)).astype(dtype) for _ in range(2))
        owned, order = order[:count], order[count:]
        for i, page in enumerate(owned):
            rows = slice(i * PAGE, min(n, (i + 1) * PAGE))
            filled = rows.stop - rows.start
            pool[page, 0, :, :filled] = k[rows].transpose(1, 0, 2)
            pool[page, 1, :, :filled] = v[rows].transpose(1, 0, 2)
        keys.append(k)
        values.append(v)
        page_values.extend(owned)
    q = rng.standard_normal((len(lengths), heads, head_dim)).astype(dtype)
    scale = head_dim**-0.5

    lib = tvm.compile(
        tvm.IRModule({"f": paged_decode_attention_cpu(kv_heads, heads, head_dim, dtype)}),
        target=host_llvm_target(),
    )
    ints = lambda a: tvm.runtime.tensor(np.asarray(a, "int32"))  # noqa: E731
    output = tvm.runtime.tensor(np.zeros_like(q))
    lse = tvm.runtime.tensor(np.zeros(q.shape[:2], "float32"))
    lib["batch_decode_paged_kv_cpu"](
        tvm.runtime.tensor(q),
        tvm.runtime.tensor(pool),
        ints(np.cumsum([0, *pages_of])),
        ints(page_values),
        ints([n - (c - 1) * PAGE for n, c in zip(lengths, pages_of)]),
        ints(np.zeros(len(lengths))),
        ints(np.zeros(len(lengths))),
        output,
        lse,
        0,
        1.0,
        1e4,
        scale,
    )
    expected, expected_lse = reference(q, keys, values, scale)
    ours = output.numpy().astype(np.float64)
    assert np.abs(ours - expected).max() <= TOLERANCE[dtype] * np.abs(expected).max()
    assert np.abs(lse.numpy() - expected_lse).max() <= 1e-5 * np.abs(expected_lse).max()
