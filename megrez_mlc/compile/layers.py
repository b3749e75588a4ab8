"""The float layers the graphs are built of, and which target a graph is being traced for.

Quantization (quantized.py) swaps `Linear` and `Embedding` for int4 layers; the vision tower's
`FloatLinear` (vision.py) stays float.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.target import Target

from . import ops


def compiling_for_cpu() -> bool:
    """Whether the graph is being traced for a CPU (`MegrezForCausalLM.export_tvm` enters its target)."""
    return Target.current(allow_none=False).kind.name == "llvm"


class Linear(nn.Module):
    """y = x @ W^T (+ b), W [out, in] stored as `.weight` and, when the checkpoint has one, b as `.bias`."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter((out_features, in_features))
        self.bias = nn.Parameter((out_features,)) if bias else None

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        out_dtype = out_dtype or self.weight.dtype
        y = op.tensor_expr_op(lambda a, w: ops.matmul_nt(a, w, out_dtype), "matmul", [x, self.weight])
        return y if self.bias is None else y + self.bias


class Embedding(Linear):
    """Token embedding table [vocab, hidden]; with tied weights it doubles as the lm_head matmul."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size, vocab_size)

    def lookup(self, ids: Tensor) -> Tensor:
        return op.tensor_expr_op(ops.take_rows, "take", [self.weight, ids])
