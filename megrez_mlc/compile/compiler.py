"""`compile`: a converted model folder in, a model library (MLC-LLM's engine ABI) out."""

from __future__ import annotations

import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from ..artifacts.chat_config import read_chat_config, resolve_limits
from ..artifacts.param_names import stored_model_tensors
from ..artifacts.schemes import QuantScheme, get_scheme
from ..config import ModelConfig
from ..errors import MegrezError
from ..home import megrez_home
from ..omni.config import WHISPER_CONTEXT
from ..omni.images import max_slice_patches
from .gpu import check_attention_head_dim, device_functions, functions_left_on_host
from .int8_matmul import DotIsa, select_isa
from .model import MegrezForCausalLM
from .pipeline import build_pipeline
from .quantized import quantize_model
from .targets import LibraryOutput, TargetPreset, get_target

# IRModule.get_attr crashes on string attributes of 7 characters or fewer (TVM 0.27 wheel).
MIN_SYSTEM_LIB_PREFIX = 8


@dataclass(frozen=True)
class CompileResult:
    output: Path
    target: str
    seconds: float
    metadata: dict[str, Any]  # what `_metadata()` returns, memory_usage included
    system_lib_prefix: str  # "" for a shared library
    device_functions: tuple[str, ...]  # the PrimFuncs that run on the GPU (empty for cpu)
    device_source: str  # the generated kernels: CUDA C, OpenCL C, Metal or WGSL ("" for cpu)
    cpu_kernels: str  # the CPU weight kernels: "int8 (avx512-vnni)", "exact", ... ("" for GPU targets)
    kv_cache_dtype: str  # what the KV cache holds: "float16" or "float32"


# `compile --cpu-kernels`: int8 dot products (compile/int8_matmul.py) or the float32 kernels, whose results
# are the reference the token-identity tests compare with transformers.
CPU_KERNELS = ("int8", "exact")


def int8_isa_for(target: tvm.target.Target, scheme: QuantScheme, cpu_kernels: str) -> DotIsa | None:
    """The ISA of the int8 kernels a CPU library gets, or None for the exact float32 ones."""
    if cpu_kernels not in CPU_KERNELS:
        raise MegrezError(f"--cpu-kernels {cpu_kernels}: choose one of {', '.join(CPU_KERNELS)}")
    if cpu_kernels == "exact" or not scheme.quantized or target.kind.name != "llvm":
        return None
    return select_isa(target)  # None without AVX2: the exact kernels


# `compile --kv-cache-dtype` (CPU targets): float16 halves what decode reads per cached token, which at
# long contexts rivals the weights (80 KiB a token for Megrez-3B, 640 MiB at 8K); float32 keeps the
# cached keys and values as the float32 model computed them.
KV_CACHE_DTYPES = ("float16", "float32")


def kv_cache_dtype_for(
    target: tvm.target.Target, scheme: QuantScheme, int8_isa: DotIsa | None, requested: str | None
) -> str:
    """The KV cache's float type: as requested, or by default float16 with the int8 CPU kernels (the fast
    path, and llama.cpp's default cache type) and the model's float type otherwise (the exact path, and every
    GPU target as in MLC-LLM)."""
    if requested is None:
        return "float16" if int8_isa is not None else scheme.model_dtype
    if requested not in KV_CACHE_DTYPES:
        raise MegrezError(f"--kv-cache-dtype {requested}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    if target.kind.name != "llvm" and requested != scheme.model_dtype:
        raise MegrezError(
            f"--kv-cache-dtype {requested} is for CPU targets; a GPU library keeps its KV cache in the "
            f"model's float type ({scheme.model_dtype} for {scheme.name}): leave the option out"
        )
    return requested


def describe_cpu_kernels(target: tvm.target.Target, isa: DotIsa | None) -> str:
    if target.kind.name != "llvm":
        return ""
    return f"int8 ({isa.name})" if isa else "exact"


def library_metadata(
    config: ModelConfig,
    scheme: QuantScheme,
    named_params: list[tuple[str, Any]],
    prefill_chunk_size: int,
    max_batch_size: int,
) -> dict[str, Any]:
    """What `_metadata()` returns, memory usage aside (the pipeline adds it after memory planning)."""
    return {
        "model_type": "llama",
        "quantization": scheme.name,
        "context_window_size": config.context_window_size,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "prefill_chunk_size": prefill_chunk_size,
        "max_batch_size": max_batch_size,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "disaggregation": False,
        "kv_state_kind": "kv_cache",
        "params": [
            {"name": name, "shape": [int(d) for d in param.shape], "dtype": param.dtype, "preprocs": []}
            for name, param in named_params
        ],
        "kv_cache": {
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
        },
    }


def build_ir_module(
    config: ModelConfig,
    scheme: QuantScheme,
    target: tvm.target.Target,
    int8_isa: DotIsa | None = None,
    kv_cache_dtype: str | None = None,
    prefetch: bool = True,
) -> tuple[tvm.IRModule, list[tuple[str, Any]]]:
    """The graph and its parameters. `prefetch`: the CPU kernels may prefetch (not in a system library:
    TVM 0.27's AttachGlobalSymbol, which renames every function there, cannot rewrite the pointers a
    prefetch takes)."""
    model = quantize_model(
        MegrezForCausalLM(config, target, kv_cache_dtype, prefetch), scheme, int8_isa, prefetch
    )
    mod, named_params = model.export_tvm(spec=model.get_default_spec())
    check_params_match_weights(named_params, config, scheme)
    return mod, named_params


def check_params_match_weights(
    named_params: list[tuple[str, Any]], config: ModelConfig, scheme: QuantScheme
) -> None:
    """The graph's parameters are, in order, the tensors convert-weight writes (same names, shapes, dtypes).

    The graph and artifacts/param_names.py describe the weights separately, and the library finds its weights
    by these names: a difference would otherwise surface only when the library runs on those weights."""
    graph = [(name, tuple(int(d) for d in param.shape), param.dtype) for name, param in named_params]
    weights = [(t.name, tuple(t.shape), t.dtype) for t in stored_model_tensors(config, scheme)]
    for index, (ours, written) in enumerate(zip_longest(graph, weights)):
        if ours != written:
            raise MegrezError(
                f"parameter {index} of the {scheme.name} graph is {_describe(ours)}, but convert-weight "
                f"writes {_describe(written)}; this is a bug in megrez-mlc, please report it"
            )


def _describe(tensor: tuple[str, tuple[int, ...], str] | None) -> str:
    if tensor is None:
        return "nothing"
    name, shape, dtype = tensor
    return f"{name} {list(shape)} {dtype}"


def default_model_lib(quantization: str) -> str:
    """MLC's `{model_type}_{quantization}`: the name an app knows a model's library by."""
    return f"llama_{quantization}"


def default_system_lib_prefix(scheme: QuantScheme) -> str:
    """The library's symbol prefix: how an app finds this model among the static libraries."""
    return f"{default_model_lib(scheme.name)}_"


def check_system_lib_prefix(prefix: str) -> str:
    if len(prefix) < MIN_SYSTEM_LIB_PREFIX or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
        raise MegrezError(
            f"system library prefix {prefix!r} must be at least {MIN_SYSTEM_LIB_PREFIX} letters, digits or "
            "underscores (it starts C symbol names), e.g. llama_q4f16_1_"
        )
    return prefix


def compile_model(
    model: Path,
    target_name: str,
    output: Path,
    *,
    host: str | None = None,
    cpu: str | None = None,
    cuda_arch: str | None = None,
    cpu_kernels: str = "int8",
    kv_cache_dtype: str | None = None,
    system_lib_prefix: str | None = None,
    max_batch_size: int | None = None,
    prefill_chunk_size: int | None = None,
    context_window_size: int | None = None,
) -> CompileResult:
    """Compile the model in `model` for `target_name`; the suffix of `output` picks the library kind."""
    start = time.perf_counter()
    _, chat_config = read_chat_config(model)
    limits = resolve_limits(
        chat_config.limits,
        context_window_size=context_window_size,
        prefill_chunk_size=prefill_chunk_size,
        max_batch_size=max_batch_size,
    )
    config = chat_config.model_config.replace(context_window_size=limits.context_window_size)
    scheme = get_scheme(chat_config.quantization)
    preset: TargetPreset = get_target(target_name)
    preset.check_can_compile()
    target = preset.make(host, cuda_arch, cpu, output)
    int8_isa = int8_isa_for(target, scheme, cpu_kernels)
    kv_dtype = kv_cache_dtype_for(target, scheme, int8_isa, kv_cache_dtype)
    library = preset.output(output, host)  # before compiling: an unwritable -o fails fast
    prefix = check_system_lib_prefix(system_lib_prefix or default_system_lib_prefix(scheme))
    bounds = {
        "seq_len": limits.prefill_chunk_size,
        "batch_size": limits.max_batch_size,
        "total_seq_len": limits.context_window_size,
    }
    if chat_config.image_processor is not None:
        bounds["num_patches"] = max_slice_patches(chat_config.image_processor)
    if config.audio is not None:
        bounds["encoder_frames"] = WHISPER_CONTEXT
    if preset.is_gpu:
        check_attention_head_dim(
            config.head_dim,
            config.num_key_value_heads,
            config.num_attention_heads,
            kv_dtype,
            target,
            preset.name,
        )

    with failures_logged_as_bugs(preset.name):
        executable, metadata, on_device = _build(
            config, scheme, target, int8_isa, kv_dtype, preset, library, prefix, bounds
        )
    _export(executable, output, preset, library)
    return CompileResult(
        output,
        preset.name,
        time.perf_counter() - start,
        metadata,
        prefix if library.system_lib else "",
        on_device,
        device_source(executable),
        describe_cpu_kernels(target, int8_isa),
        kv_dtype,
    )


def _build(
    config: ModelConfig,
    scheme: QuantScheme,
    target: tvm.target.Target,
    int8_isa: DotIsa | None,
    kv_cache_dtype: str,
    preset: TargetPreset,
    library: LibraryOutput,
    prefix: str,
    bounds: dict[str, int],
) -> tuple[relax.VMExecutable, dict[str, Any], tuple[str, ...]]:
    """The TVM work: graph, pipeline, code generation; returns (executable, metadata, device functions)."""
    mod, named_params = build_ir_module(
        config, scheme, target, int8_isa, kv_cache_dtype, prefetch=not library.system_lib
    )
    if library.system_lib:
        mod = mod.with_attr("system_lib_prefix", prefix)
    metadata = library_metadata(config, scheme, named_params, bounds["seq_len"], bounds["batch_size"])
    pipeline = build_pipeline(target, bounds, metadata, preset.schedule_passes(target))
    with target:
        mod = pipeline(mod)
    on_device: tuple[str, ...] = ()
    if preset.is_gpu:
        on_device = tuple(device_functions(mod))
        check_all_on_device(mod, preset)
    # TIR's common-subexpression pass breaks some of TVM's own attention kernels in this wheel ("variable
    # used before definition": Android's tree attention, float32 OpenCL prefill at head_dim 16 or 32).
    # It is only an optimization, and the GPU compilers that take the generated source do it themselves.
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": preset.is_gpu}):
        executable = relax.build(mod, target, relax_pipeline=None, system_lib=library.system_lib)
    return executable, metadata, on_device


@contextmanager
def failures_logged_as_bugs(target_name: str) -> Iterator[None]:
    """Turn an unexpected failure inside TVM into one MegrezError line that points to a log file.

    TVM's messages run to hundreds of lines (a TIR dump with the failing statement marked), and its C++
    side writes diagnostics straight to file descriptor 2, past sys.stderr. So while TVM works, fd 2 goes to
    a temporary file; on failure the log gets that, the traceback and the full message; on success whatever
    TVM printed is passed on to the real stderr unchanged."""
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved_stderr = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except MegrezError:
            raise
        except Exception as err:
            sys.stderr.flush()
            captured.seek(0)
            output = captured.read().decode(errors="replace")
            log = write_failure_log(target_name, f"{traceback.format_exc()}\n--- TVM output ---\n{output}")
            raise MegrezError(
                f"compiling for {target_name} failed (a bug in megrez-mlc; please report it): "
                f"{first_line(err)}; full log: {log}"
            ) from None
        finally:
            sys.stderr.flush()
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
        captured.seek(0)
        os.write(2, captured.read())


def first_line(err: Exception) -> str:
    """The first line of an exception's message, and for a TVM schedule error the line saying what broke."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    detail = next((line for line in lines[1:] if line.startswith("Error message:")), None)
    return f"{lines[0]} {detail}" if detail else lines[0]


def write_failure_log(target_name: str, text: str) -> Path:
    """Write `text` to a new file in $MEGREZ_MLC_HOME/logs, or in the temporary folder when that is not
    writable; returns the file."""
    name = f"compile-{target_name}-{time.strftime('%Y%m%d-%H%M%S')}-"
    try:
        folder = megrez_home() / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(prefix=name, suffix=".log", dir=folder)
    except OSError:
        fd, path = tempfile.mkstemp(prefix=name, suffix=".log")
    with os.fdopen(fd, "w") as log:
        log.write(text)
    return Path(path)


def check_all_on_device(mod: tvm.IRModule, preset: TargetPreset) -> None:
    left = functions_left_on_host(mod)
    if left:
        raise MegrezError(
            f"{len(left)} operators got no {preset.name} schedule and would run on the host CPU "
            f"({', '.join(left)}); this is a bug in megrez-mlc's GPU schedules, please report it"
        )


def device_source(executable: relax.VMExecutable) -> str:
    """The kernels' source code (CUDA C, OpenCL C, Metal, WGSL), "" when there is no device module."""
    pending = list(executable.mod.imports)
    while pending:
        module = pending.pop()
        if module.kind not in ("llvm", "c", "static_library"):
            return module.inspect_source("")
        pending.extend(module.imports)
    return ""


def _export(
    executable: relax.VMExecutable, output: Path, preset: TargetPreset, library: LibraryOutput
) -> None:
    """Write the library beside its final path, then rename: a failed build leaves nothing behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        partial = Path(tmp) / output.name
        try:
            if library.link is None:
                executable.export_library(str(partial))
            else:
                executable.export_library(str(partial), fcompile=library.link)
        except Exception as err:  # linker and toolchain failures surface as assorted TVM/OS errors
            raise MegrezError(f"could not write {output} for target {preset.name}: {err}") from None
        os.replace(partial, output)
