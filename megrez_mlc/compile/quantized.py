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
from .int8_matmul import DotIsa, int8_gemm_kernel, int8_gemv_kernel
from .layers import Embedding, Linear, compiling_for_cpu
from .vision import FloatLinear


def _is_single_token(x: Tensor) -> bool:
    """A decode step of one sequence: every leading dimension is statically 1."""
    return all(isinstance(d, int) and d == 1 for d in x.shape[:-1])


class QuantizedLinear(nn.Module):
    """y = x @ dequantize(q_weight, q_scale)^T (+ b) for a Linear's [out, in] weight in int4 groups.

    With `int8_isa` (CPU targets with AVX2 or VNNI, `--cpu-kernels int8`), the product runs through the
    integer dot-product kernels of compile/int8_matmul.py. Otherwise, on CPUs, the weights dequantize to
    float32 (CPUs have no fast float16 arithmetic), and one token goes through a dedicated GEMV
    (ops.dequantize_gemv_cpu) instead of a one-row GEMM.
    """

    def __init__(
        self, linear: Linear, scheme: QuantScheme, int8_isa: DotIsa | None = None, prefetch: bool = True
    ) -> None:
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.dtype = scheme.model_dtype
        q_weight_shape, q_scale_shape = quantized_shapes(linear.out_features, linear.in_features)
        self.q_weight = nn.Parameter(q_weight_shape, "uint32")
        self.q_scale = nn.Parameter(q_scale_shape, scheme.scale_dtype)
        self.bias = linear.bias
        self.int8_isa = int8_isa
        self.prefetch = prefetch  # whether the int8 GEMV may prefetch (compiler.build_ir_module)

    def forward(self, x: Tensor, out_dtype: str | None = None) -> Tensor:
        y = self._matmul(x, out_dtype or self.dtype)
        return y if self.bias is None else y + self.bias

    def _matmul(self, x: Tensor, out_dtype: str) -> Tensor:
        if self.int8_isa is not None:
            return self._int8_matmul(x, out_dtype)
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

    def _int8_matmul(self, x: Tensor, out_dtype: str) -> Tensor:
        """x [..., K] as [M, K] rows through the int8 GEMV (one token) or GEMM, then back to x's shape."""
        *lead, _ = x.shape
        single = _is_single_token(x)
        shape = (self.int8_isa, self.out_features, self.in_features, x.dtype, self.q_scale.dtype, out_dtype)
        func = int8_gemv_kernel(*shape, self.prefetch) if single else int8_gemm_kernel(*shape)
        rows = op.reshape(x, [1 if single else -1, self.in_features])
        out = Tensor.placeholder([rows.shape[0], self.out_features], out_dtype)
        args = [rows, self.q_weight, self.q_scale]
        y = op.tensor_ir_op(func, "int8_gemv" if single else "int8_gemm", args, out)
        return op.reshape(y, [*lead, self.out_features])


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

    def __init__(self, scheme: QuantScheme, int8_isa: DotIsa | None, prefetch: bool) -> None:
        self.scheme = scheme
        self.int8_isa = int8_isa
        self.prefetch = prefetch

    def visit_module(self, name: str, node: nn.Module) -> nn.Module:
        if isinstance(node, FloatLinear):  # the vision tower's (compile/vision.py)
            return node
        if isinstance(node, Embedding):  # first: an Embedding is also a Linear
            return QuantizedEmbedding(node, self.scheme, self.int8_isa, self.prefetch)
        if isinstance(node, Linear):
            return QuantizedLinear(node, self.scheme, self.int8_isa, self.prefetch)
        return self.visit(name, node)


def quantize_model(
    model: nn.Module, scheme: QuantScheme, int8_isa: DotIsa | None = None, prefetch: bool = True
) -> nn.Module:
    """`model`, built of float layers, in the scheme's float type and, under q4 schemes, its layers int4
    (multiplied through int8 dot products with `int8_isa`), all but the FloatLinears."""
    model.to(scheme.model_dtype)  # before the swap: `to` would convert the uint32 words too
    if scheme.quantized:
        model = GroupQuantizer(scheme, int8_isa, prefetch).visit("", model)
    return model
