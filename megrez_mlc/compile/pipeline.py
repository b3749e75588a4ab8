"""The Relax pass pipeline: TVM's default lowering with the pieces an LLM library needs added.

Added to TVM's per-target default: symbolic-length upper bounds (so memory can be planned statically),
target-specific TIR scheduling, and an `_metadata` function recording the planned memory per function.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import tvm
from tvm import relax, tirx
from tvm.relax import transform

# A function of the module -> the upper bound of each symbolic length it takes.
VariableBounds = dict[str, int]


@tvm.transform.module_pass(opt_level=0, name="AttachVariableBounds")
class AttachVariableBounds:
    """Tell the memory planner the largest value each symbolic length can take at run time."""

    def __init__(self, bounds: VariableBounds) -> None:
        self.bounds = bounds

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        for gvar, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                func = func.with_attr("tir_var_upper_bound", self.bounds)
                func = func.with_attr("tir_non_negative_var", list(self.bounds))
                mod[gvar] = func
        return mod


def planned_memory_bytes(mod: tvm.IRModule) -> dict[str, int]:
    """Bytes of the static storage each Relax function allocates (after StaticPlanBlockMemory)."""
    alloc_storage = tvm.ir.Op.get("relax.memory.alloc_storage")
    usage: dict[str, int] = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, relax.Function):
            continue
        total = 0

        def visit(expr: relax.Expr) -> None:
            nonlocal total
            if isinstance(expr, relax.Call) and expr.op.same_as(alloc_storage):
                size = expr.args[0].values[0]
                if isinstance(size, tirx.IntImm):
                    total += int(size.value)

        relax.analysis.post_order_visit(func.body, visit)
        usage[gvar.name_hint] = total
    return usage


@tvm.transform.module_pass(opt_level=0, name="AttachMetadata")
class AttachMetadata:
    """Add `_metadata() -> str`, a JSON string MLC's engine reads.

    Memory usage is filled in here, into the caller's dict too: a library for another machine cannot be
    loaded to ask, and `package` needs it to estimate the memory a phone must have."""

    def __init__(self, metadata: dict[str, Any]) -> None:
        self.metadata = metadata

    def transform_module(self, mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        self.metadata["memory_usage"] = planned_memory_bytes(mod)
        bb = relax.BlockBuilder()
        with bb.function("_metadata", params=[]):
            bb.emit_func_output(tvm.ir.StringImm(json.dumps(self.metadata)))
        mod = mod.clone() if hasattr(mod, "clone") else mod
        mod["_metadata"] = bb.finalize()["_metadata"]
        return mod


@tvm.transform.module_pass(opt_level=0, name="MarkNoAlias")
def mark_noalias(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
    """Give every TIR function the `tirx.noalias` flag (its buffer arguments never overlap).

    Why: TVM 0.27's LLVM code generator emits the bodies of parallel loops after all functions, with the
    alias setting of the *last* function it compiled. When that one lacks the flag (the VM's shape
    helpers and TVM's KV-cache kernels do), every kernel loses its per-buffer alias information and
    LLVM keeps the CPU GEMM's accumulators in memory: prefill measured 3x slower. The flag is true for
    all of them: the VM never passes one tensor as two arguments (the memory planner gives a call's
    outputs storage apart from its live inputs), and the KV-cache kernels take distinct buffers.
    """
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and not (func.attrs and func.attrs.get("tirx.noalias")):
            mod[gvar] = func.with_attr("tirx.noalias", True)
    return mod


def build_pipeline(
    target: tvm.target.Target,
    bounds: VariableBounds,
    metadata: dict[str, Any],
    schedule_passes: list[tvm.transform.Pass],
) -> Callable[[tvm.IRModule], tvm.IRModule]:
    """The whole Relax pipeline for one target; `schedule_passes` run on the fused TIR functions."""

    @tvm.transform.module_pass(opt_level=0, name="MegrezPipeline")
    def pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        passes = [
            AttachVariableBounds(bounds),
            transform.LegalizeOps(),
            transform.AnnotateTIROpPattern(),
            transform.FoldConstant(),
            transform.FuseOps(),
            transform.FuseTIR(),
            transform.DeadCodeElimination(),
            *schedule_passes,
            transform.RewriteDataflowReshape(),
            transform.ToNonDataflow(),
            transform.RemovePurityChecking(),
            transform.CallTIRRewrite(),
            transform.StaticPlanBlockMemory(),
            AttachMetadata(metadata),
            transform.LowerAllocTensor(),
            transform.KillAfterLastUse(),
            transform.LowerRuntimeBuiltin(),
            transform.ComputePrimValue(),
            transform.VMShapeLower(),
            transform.AttachGlobalSymbol(),
            mark_noalias,
        ]
        with target:
            return tvm.transform.Sequential(passes)(mod)

    return pipeline
