"""Scheduling for GPU targets: DLight's default rules (minus the paths that crash this TVM wheel), and the
check that every operator really landed on the device.

Without a schedule TVM still builds a GPU library, silently: an operator no rule bound to GPU threads
becomes host code reading device memory. So after scheduling, `functions_left_on_host` lists every
PrimFunc without a thread binding and the compiler refuses to write such a library.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.nn.llm._kernel_common import _get_prefill_kernel_config
from tvm.s_tir import dlight

from ..errors import MegrezError

# TVM's GPU decode and merge-state kernels read head_dim in vectors of 4 (`VEC_SIZE` in _decode_kernels.py,
# computed from a hard-coded 2-byte element): bdx = head_dim // 4 threads cover 4 * (head_dim // 4) values, so
# any other head_dim builds without error and silently drops the last head_dim % 4 of them.
DECODE_VECTOR = 4
# Head sizes of common models, named in the refusal when the target supports them.
COMMON_HEAD_DIMS = (64, 80, 96, 128, 256)

# The Relax function whose PrimFuncs make up TVM's paged KV cache (attention, append, copy kernels).
KV_CACHE_CREATOR = "create_tir_paged_kv_cache"


class MatmulWithoutTensorize(dlight.gpu.Matmul):
    """DLight's Matmul rule without its two tensorizing paths, which `sch.tensorize` crashes (segfault)
    in the PyPI 0.27 wheel: tensor cores on CUDA sm_70+, simdgroup matrices on Metal.

    The rule picks those paths from the target alone, so it is shown a target that has neither: CUDA
    as sm_60 (the tile configuration is chosen by kind, not arch, so the schedule is otherwise the
    same), Metal as a plain GPU kind whose configuration is the same default one Metal gets. Marking
    PrimFuncs `dlight.do_not_tensorize` would not do: Metal's path ignores the flag, and CUDA checks it
    only after importing the tensor-core intrinsics, 20 s of every compile on a 2-core machine.
    """

    def apply(self, func: tirx.PrimFunc, target: tvm.target.Target, tunable: bool):
        return super().apply(func, _target_without_tensorize(target), tunable)


def _target_without_tensorize(target: tvm.target.Target) -> tvm.target.Target:
    if target.kind.name == "cuda":
        attrs = {k: v for k, v in dict(target.export()).items() if k not in ("host", "tag", "keys")}
        return tvm.target.Target({**attrs, "arch": "sm_60"})
    if target.kind.name == "metal":
        return tvm.target.Target({"kind": "vulkan"})
    return target


def gpu_schedule_passes(_target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """DLight's default GPU schedules, first matching rule wins (TVM's own CUDA pipeline uses this list)."""
    return [
        dlight.ApplyDefaultSchedule(
            MatmulWithoutTensorize(),
            dlight.gpu.GEMV(),
            dlight.gpu.Reduction(),
            dlight.gpu.GeneralReduction(),
            dlight.gpu.Fallback(),
        )
    ]


def binds_gpu_threads(func: tirx.PrimFunc) -> bool:
    """Whether the function launches GPU threads (a thread-bound loop or a `thread_extent` attribute)."""
    found = False

    def thread_loop(loop: tirx.For) -> None:
        nonlocal found
        found = found or loop.kind == tirx.ForKind.THREAD_BINDING

    def thread_attr(attr: tirx.AttrStmt) -> None:
        nonlocal found
        found = found or attr.attr_key == "thread_extent"

    tvm_ffi.structural_walk(func.body, [(tirx.For, thread_loop), (tirx.AttrStmt, thread_attr)])
    return found


def kv_cache_functions(mod: tvm.IRModule) -> set[str]:
    """Names of the PrimFuncs the KV cache creator hands to the runtime."""
    creator = next((f for gv, f in mod.functions_items() if gv.name_hint == KV_CACHE_CREATOR), None)
    if not isinstance(creator, relax.Function):
        return set()
    names: set[str] = set()
    tvm_ffi.structural_walk(creator.body, [(tvm.ir.GlobalVar, lambda gv: names.add(gv.name_hint))])
    return names


def device_functions(mod: tvm.IRModule) -> list[str]:
    """PrimFuncs that run on the device, sorted by name."""
    return sorted(
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc) and binds_gpu_threads(func)
    )


def functions_left_on_host(mod: tvm.IRModule) -> list[str]:
    """Operators that no schedule moved onto the device, sorted by name.

    Not counted: the KV-cache functions, and the VM's own shape arithmetic (`tirx.is_host_func`), which
    is host code by design."""
    kv_cache = kv_cache_functions(mod)
    return sorted(
        gv.name_hint
        for gv, func in mod.functions_items()
        if isinstance(func, tirx.PrimFunc)
        and gv.name_hint not in kv_cache
        and not func.attrs.get("tirx.is_host_func", False)
        and not binds_gpu_threads(func)
    )


def unsupported_head_dim_reason(
    head_dim: int, num_kv_heads: int, num_heads: int, dtype: str, target: tvm.target.Target
) -> str | None:
    """Why TVM's GPU attention kernels cannot serve this head size (None: they can)."""
    if head_dim % DECODE_VECTOR:
        return f"its decode kernels read heads in vectors of {DECODE_VECTOR}"
    try:  # the tiling every prefill kernel (ragged, paged, tree) asks for, TVM's own legality check included
        _get_prefill_kernel_config(num_kv_heads, num_heads, head_dim, dtype, target)
    except (ValueError, AssertionError):
        return "its prefill kernels find no thread tiling for it"
    return None


def check_attention_head_dim(
    head_dim: int, num_kv_heads: int, num_heads: int, dtype: str, target: tvm.target.Target, name: str
) -> None:
    """Refuse, before any compiling, a head size TVM's GPU attention kernels do not build (or build wrong)."""
    reason = unsupported_head_dim_reason(head_dim, num_kv_heads, num_heads, dtype, target)
    if reason is None:
        return

    def supported(d: int) -> bool:
        return unsupported_head_dim_reason(d, num_kv_heads, num_heads, dtype, target) is None

    nearby = [d for d in range(max(DECODE_VECTOR, head_dim - 8), head_dim + 16) if supported(d)][:4]
    common = [d for d in COMMON_HEAD_DIMS if supported(d)]
    raise MegrezError(
        f"TVM's {target.kind.name} attention kernels do not support head_dim={head_dim} with {dtype} "
        f"({reason}), so target {name} cannot run this model; supported: {', '.join(map(str, nearby))} "
        f"nearby and {', '.join(map(str, common))}; compile for --target cpu, which has no such limit"
    )
