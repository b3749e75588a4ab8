"""Quantization as a step on the float graph: the scheme's float type, and its int4 layers swapped in.

compile/model.py builds the LLaMA graph from float layers that know nothing of quantization.
`quantize_model` converts it to the scheme's float type and, under q4 schemes, replaces each `Linear` and
`Embedding` by a layer storing MLC's group quantization (`.q_weight` uint32 words of 8 nibbles and
`.q_scale`, layout in artifacts/int4.py), as MLC-LLM's quantization mutator does. A swapped layer
keeps its place in the module tree, so its parameters keep the float layer's name and position: the names
convert-weight writes (the compiler checks that they agree). Biases stay in the float type.
"""

from __future__ import annotations

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..artifacts.int4 import quantized_shapes
from ..artifacts.schemes import QuantScheme
from . import ops
from .model import Embedding, Linear, compiling_for_cpu


def _is_single_token(x: Tensor) -> bool:
    """A decode step of one sequence: every leading dimension is statically 1."""
    return all(isinstance(d, int) and d == 1 for d in x.shape[:-1])


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(q_weight, q_scale)^T (+ b) for a Linear's [out, in] weight in int4 groups.

    On CPUs the weights dequantize to float32 (CPUs have no fast float16 arithmetic), and one token goes
    through a dedicated GEMV (ops.dequantize_gemv_cpu) instead of a one-row GEMM.
    """

    def __init__(self, linear: Linear, scheme: QuantScheme) -> None:
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = scheme.model_dtype
        q_weight_shape, q_scale_shape = quantized_shapes(linear.out_features, linear.in_features)
        self.q_weight = nn.Parameter(q_weight_shape, "uint32")
        self.q_scale = nn.Parameter(q_scale_shape, scheme.scale_dtype)
        self.bias = linear.bias

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        y = self._matmul(x, out_dtype or self.dtype)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: Tensor, out_dtype: str) -> Tensor:
        if compiling_for_cpu() and _is_single_token(x):
            return op.tensor_expr_op(
                lambda a, w, s: ops.dequantize_gemv_cpu(a, w, s, self.in_features, out_dtype),
                "dequantize_gemv",
                [x, self.q_weight, self.q_scale],
            )
        dequantize_dtype = "float32" if compiling_for_cpu() else None
        return op.tensor_expr_op(
            lambda a, w, s: ops.dequantize_matmul_nt(a, w, s, self.in_features, out_dtype, dequantize_dtype),
            "dequantize_matmul",
            [x, self.q_weight, self.q_scale],
        )


class QuantizedEmbedding(QuantizedLinear):
    """An int4 embedding table [vocab, hidden]; with tied weights it doubles as the lm_head matmul."""

    def lookup(self, ids: Tensor) -> Tensor:
        return op.tensor_expr_op(
            lambda w, s, i: ops.dequantize_take(w, s, i, self.in_features, self.dtype),
            "dequantize_take",
            [self.q_weight, self.q_scale, ids],
        )


class GroupQuantizer(nn.Mutator):
    """Replaces every Linear and Embedding of a module tree by its int4 form."""

    def __init__(self, scheme: QuantScheme) -> None:
        self.scheme = scheme

    def visit_module(self, name: str, node: nn.Module) -> nn.Module:
        if isinstance(node, Embedding):  # first: an Embedding is also a Linear
            return QuantizedEmbedding(node, self.scheme)
        if isinstance(node, Linear):
            return QuantizedLinear(node, self.scheme)
        return self.visit(name, node)


def quantize_model(model: nn.Module, scheme: QuantScheme) -> nn.Module:
    """`model`, built of float layers, in the scheme's float type and, under q4 schemes, its layers int4."""
    model.to(scheme.model_dtype)  # before the swap: `to` would convert the uint32 words too
    if scheme.quantized:
        model = GroupQuantizer(scheme).visit("", model)
    return model
