"""GPU and cross targets, proven without their devices: every operator is scheduled onto the device, the
generated kernels build with a real compiler (nvcc for CUDA, PoCL and clang for OpenCL), Metal and WGSL
sources have a kernel per device function, and the objects for phones are for the phone's architecture.

Compiles use the tiny head_dim-64 model once per (target, quantization) for the whole session."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tvm
import tvm_ffi
from tvm import relax, tirx
from tvm.relax.frontend.nn.llm import _decode_kernels, _prefill_kernels

from megrez_mlc.compile import targets
from megrez_mlc.compile.compiler import CompileResult, compile_model
from megrez_mlc.compile.gpu import functions_left_on_host, unsupported_head_dim_reason
from megrez_mlc.compile.int8_matmul import select_isa
from megrez_mlc.compile.targets import host_llvm_target
from megrez_mlc.errors import MegrezError
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.tiny import TinyShape, make_tiny_checkpoint

from .conftest import run_cli
from .objects import object_architecture, tar_members
from .test_bad_input import assert_clean_failure

QUANTIZATIONS = ("q4f16_1", "q4f32_1", "q0f16", "q0f32")


@pytest.fixture(scope="session")
def compiled(gpu_model, tmp_path_factory: pytest.TempPathFactory):
    """(target, quantization, suffix) -> CompileResult, each compiled once per session."""
    root = tmp_path_factory.mktemp("gpu-libs")
    results: dict[tuple[str, str, str], CompileResult] = {}

    def get(target: str, quantization: str, suffix: str) -> CompileResult:
        key = (target, quantization, suffix)
        if key not in results:
            results[key] = compile_model(
                gpu_model(quantization), target, root / f"{target}-{quantization}{suffix}"
            )
        return results[key]

    return get


def kernel_names(result: CompileResult) -> set[str]:
    """TVM names the kernel of device function F `F_kernel`."""
    return {f"{name}_kernel" for name in result.device_functions}


# --- every operator on the device -------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_every_operator_is_an_opencl_kernel(compiled, quantization: str) -> None:
    result = compiled("opencl", quantization, ".so")
    functions = set(result.device_functions)
    # the weight-bound operators, dequantization fused into its consumer (never a kernel of its own)
    assert any("matmul" in f for f in functions) and any(
        f.startswith(("take", "dequantize_take")) for f in functions
    )
    if quantization.startswith("q4"):
        assert all("matmul" in f or "take" in f for f in functions if "dequantize" in f)
    sections = opencl_sections(result.device_source)
    assert set(sections) == kernel_names(result)


def test_a_compile_that_leaves_operators_on_the_host_fails(gpu_model, tmp_path: Path, monkeypatch) -> None:
    unscheduled = dataclasses.replace(targets.TARGETS["opencl"], schedules=targets.no_schedules)
    monkeypatch.setitem(targets.TARGETS, "opencl", unscheduled)
    output = tmp_path / "lib.so"
    with pytest.raises(
        MegrezError, match=r"operators got no opencl schedule and would run on the host CPU \(.*rms_norm"
    ):
        compile_model(gpu_model("q4f32_1"), "opencl", output)
    assert not output.exists()


def test_functions_left_on_host_ignores_kv_cache_and_shape_functions() -> None:
    from tvm.script import ir as I
    from tvm.script import relax as R
    from tvm.script import tirx as T

    @I.ir_module
    class Module:
        @T.prim_func
        def on_device(a: T.Buffer((64,), "float32")):
            for i in T.thread_binding(64, thread="threadIdx.x"):
                a[i] = T.float32(0)

        @T.prim_func
        def on_host(a: T.Buffer((64,), "float32")):
            for i in range(64):
                a[i] = T.float32(0)

        @T.prim_func
        def kv_append(a: T.Buffer((64,), "float32"), b: T.Buffer((64,), "float32")):
            for i in range(64):
                b[i] = a[i]

        @T.prim_func
        def shape_func(a: T.Buffer((64,), "float32")):
            T.func_attr({"tirx.is_host_func": True})
            for i in range(64):
                a[i] = T.float32(2)

        @R.function
        def create_tir_paged_kv_cache(x: R.Tensor((64,), "float32")):
            cls = Module
            y = R.call_tir(cls.kv_append, (x,), out_ty=R.Tensor((64,), "float32"))
            return y

    assert functions_left_on_host(Module) == ["on_host"]


# --- CUDA ---------------------------------------------------------------------------------------------------


def test_cuda_source_compiles_with_nvcc(compiled, tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed, so the generated CUDA C cannot be compiled here")
    result = compiled("cuda", "q4f16_1", ".so")
    assert "wmma" not in result.device_source and "mma.sync" not in result.device_source  # no tensorize
    source = tmp_path / "kernels.cu"
    source.write_text(result.device_source)
    cubin = tmp_path / "kernels.cubin"
    proc = subprocess.run(
        [nvcc, "-cubin", "-arch=sm_80", "-w", "-o", str(cubin), str(source)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    binary = cubin.read_bytes()
    missing = [k for k in sorted(kernel_names(result)) if k.encode() not in binary]
    assert not missing, missing


# --- OpenCL -------------------------------------------------------------------------------------------------


def opencl_sections(source: str) -> dict[str, str]:
    """TVM's OpenCL source is one program per kernel, each introduced by `// Function: NAME`."""
    parts = re.split(r"^// Function: (\w+)\n", source, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2]))


def pocl_device():
    """PoCL's CPU device if PoCL can compile a kernel on this CPU, else skip (with the reason)."""
    cl = pytest.importorskip("pyopencl", reason="pyopencl + pocl-binary-distribution are not installed")
    platforms = [p for p in cl.get_platforms() if "Portable Computing Language" in p.name]
    if not platforms:
        pytest.skip("no PoCL platform (pip install pocl-binary-distribution)")
    device = platforms[0].get_devices()[0]
    context = cl.Context(devices=[device])
    try:
        cl.Program(context, "__kernel void probe(__global float* a) { a[0] = 1.0f; }").build()
    except cl.RuntimeError as err:
        # PoCL 3.0 from PyPI bundles LLVM 14, which names CPUs newer than it (AMD Zen 5, say) "generic", and
        # its clang then rejects `-target-cpu generic`: nothing at all compiles on such a machine.
        log = [line.strip() for line in str(err).splitlines() if "error:" in line] or [str(err).strip()]
        pytest.skip(f"PoCL cannot compile even a one-line kernel on this CPU ({device.name}): {log[0]}")
    return cl, context


@pytest.mark.parametrize("quantization", ["q4f32_1", "q0f32"])
def test_float32_opencl_kernels_build_with_pocl(compiled, quantization: str) -> None:
    cl, context = pocl_device()
    result = compiled("opencl", quantization, ".so")
    for name, section in opencl_sections(result.device_source).items():
        program = cl.Program(context, section).build()
        assert name in {k.function_name for k in program.all_kernels()}


def clang_opencl_errors(section: str) -> tuple[list[str], set[str]]:
    """Errors of clang's OpenCL C front end (full semantic analysis, fp16 enabled) and the kernels defined."""
    cindex = pytest.importorskip("clang.cindex", reason="libclang is not installed")
    headers = pytest.importorskip("pocl_binary_distribution").__path__[0] + "/.libs/share/pocl/include"
    args = ["-x", "cl", "-cl-std=CL2.0", "-target", "spir64", "-cl-ext=+cl_khr_fp16", "-I", headers]
    args += ["-Xclang", "-fdeclare-opencl-builtins"]
    unit = cindex.Index.create().parse("kernel.cl", args=args, unsaved_files=[("kernel.cl", section)])
    errors = [str(d) for d in unit.diagnostics if d.severity >= cindex.Diagnostic.Error]
    defined = {
        c.spelling
        for c in unit.cursor.get_children()
        if c.kind == cindex.CursorKind.FUNCTION_DECL and c.is_definition()
    }
    return errors, defined


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_opencl_kernels_pass_clang(compiled, quantization: str) -> None:
    """Every kernel type-checks in clang's OpenCL C front end: float16 ones too, which PoCL cannot build."""
    result = compiled("opencl", quantization, ".so")
    for name, section in opencl_sections(result.device_source).items():
        errors, defined = clang_opencl_errors(section)
        assert not errors, (name, errors[:3])
        assert name in defined


def test_clang_check_catches_a_broken_kernel() -> None:
    errors, _ = clang_opencl_errors("__kernel void k(__global half* a) { a[0] = undefined_helper(a[1]); }")
    assert any("undefined_helper" in e for e in errors)


# --- Metal, WebGPU ------------------------------------------------------------------------------------------


def test_metal_source_has_a_kernel_per_device_function(compiled) -> None:
    result = compiled("metal", "q4f16_1", ".tar")
    kernels = set(re.findall(r"^kernel void (\w+)\(", result.device_source, flags=re.MULTILINE))
    assert kernels == kernel_names(result)
    assert "simdgroup" not in result.device_source  # DLight's Metal matmul (tensorize) was skipped
    assert {object_architecture(b) for b in tar_members(result.output).values()} == {"macho64-arm64"}


def test_wgsl_source_has_a_kernel_per_device_function(compiled) -> None:
    result = compiled("webgpu", "q4f16_1", ".tar")
    kernels = set(re.findall(r"^@compute[^\n]*\nfn (\w+)\(", result.device_source, flags=re.MULTILINE))
    assert kernels == kernel_names(result)
    assert {object_architecture(b) for b in tar_members(result.output).values()} == {"wasm"}


# --- hosts, output kinds ------------------------------------------------------------------------------------


def test_a_cpu_system_library_with_the_int8_kernels(gpu_model, tmp_path: Path) -> None:
    """A .tar for this CPU: its int8 and decode-attention kernels are built without their prefetches,
    which TVM 0.27's AttachGlobalSymbol cannot rename in a system library (it failed to compile before)."""
    output = tmp_path / "lib.tar"
    result = compile_model(gpu_model("q4f32_1"), "cpu", output)
    isa = select_isa(host_llvm_target())
    assert result.cpu_kernels == (f"int8 ({isa.name})" if isa else "exact")
    assert result.system_lib_prefix == "llama_q4f32_1_"
    assert any(b"llama_q4f32_1___tvm_ffi__library_bin" in b for b in tar_members(output).values())


def test_host_override_gives_objects_for_that_machine(gpu_model, tmp_path: Path) -> None:
    output = tmp_path / "lib.tar"
    result = compile_model(gpu_model("q4f32_1"), "cpu", output, host="aarch64-linux-gnu")
    members = tar_members(output)
    assert {object_architecture(b) for b in members.values()} == {"elf64-aarch64"}
    assert result.system_lib_prefix == "llama_q4f32_1_"
    assert any(b"llama_q4f32_1___tvm_ffi__library_bin" in b for b in members.values())


def test_unlinkable_output_is_a_one_line_error_suggesting_tar(gpu_model, tmp_path: Path) -> None:
    output = tmp_path / "lib.dylib"
    assert_clean_failure(
        ["compile", str(gpu_model("q4f16_1")), "--target", "metal", "-o", str(output)],
        "cannot link a .dylib for arm64-apple-darwin; that needs a Mac with Xcode; "
        "write an object archive instead (-o lib.tar)",
        output,
    )


@pytest.mark.parametrize(
    ("target", "output", "options", "message"),
    [
        (
            "android",
            "lib.so",
            {},
            "needs the NDK's clang in TVM_NDK_CC; write an object archive instead (-o lib.tar)",
        ),
        ("cpu", "lib.so", {"host": "aarch64-linux-gnu"}, "cannot link a .so for aarch64-linux-gnu"),
        ("iphone", "lib.so", {}, "target iphone writes .tar files"),
        ("cuda", "lib.so", {"cuda_arch": "ampere"}, "is not a CUDA architecture"),
        ("android", "lib.tar", {"system_lib_prefix": "llama_"}, "must be at least 8"),
    ],
)
def test_bad_outputs_are_refused_before_compiling(
    gpu_model, tmp_path: Path, target: str, output: str, options: dict, message: str
) -> None:
    with pytest.raises(MegrezError, match=re.escape(message)):
        compile_model(gpu_model("q4f16_1"), target, tmp_path / output, **options)
    assert list(tmp_path.iterdir()) == []


def test_wasm_needs_emscripten(gpu_model, tmp_path: Path) -> None:
    if shutil.which("emcc"):
        pytest.skip("emscripten is installed here, so a .wasm can be linked")
    output = tmp_path / "lib.wasm"
    assert_clean_failure(
        ["compile", str(gpu_model("q4f16_1")), "--target", "webgpu", "-o", str(output)],
        "needs emscripten",
        output,
    )


# --- `megrez-mlc targets`, target construction --------------------------------------------------------------


def test_targets_table_says_what_works_here() -> None:
    lines = run_cli("targets").stdout.splitlines()
    rows = {line.split()[0]: line.split(maxsplit=4) for line in lines[1:]}
    assert list(rows) == list(targets.TARGETS)
    assert rows["cpu"][1:4] == ["yes", "yes", ".so,.tar"]
    assert rows["metal"][3] == (".dylib,.so,.tar" if sys.platform == "darwin" else ".tar")
    for name in ("android", "iphone"):
        assert rows[name][1:3] == ["yes", "no"] and "it runs on" in rows[name][4]
    assert rows["cuda"][2] == ("yes" if tvm.cuda(0).exist else "no")
    # Both run on the webgpu runtime; .ci/run installs lavapipe, so CI has a Vulkan adapter.
    assert rows["webgpu"][1:4] == ["yes", "yes", ".tar,.so"]
    assert rows["vulkan"][1:4] == ["yes", "yes", ".so,.tar"]


def test_target_hosts_and_cuda_arch() -> None:
    android = targets.get_target("android").make()
    assert android.kind.name == "opencl" and android.host.attrs["mtriple"] == "aarch64-linux-android"
    assert targets.get_target("cpu").make("aarch64-linux-gnu").attrs["mtriple"] == "aarch64-linux-gnu"
    assert targets.get_target("cuda").make(cuda_arch="89").attrs["arch"] == "sm_89"
    assert targets.get_target("cuda").make(cuda_arch="sm_90a").attrs["arch"] == "sm_90a"
    expected = "sm_" + tvm.cuda(0).compute_version.replace(".", "") if tvm.cuda(0).exist else "sm_80"
    assert targets.get_target("cuda").make().attrs["arch"] == expected
    with pytest.raises(MegrezError, match="applies to --target cuda"):
        targets.get_target("opencl").make(cuda_arch="sm_80")


def test_compile_result_metadata_is_what_the_library_reports(gpu_model, tmp_path: Path) -> None:
    """`package` estimates memory from CompileResult.metadata: it must be exactly the library's _metadata."""
    result = compile_model(gpu_model("q4f32_1"), "cpu", tmp_path / "lib.so", prefill_chunk_size=64)
    vm = relax.VirtualMachine(tvm.runtime.load_module(str(result.output)), tvm.cpu())
    assert json.loads(vm["_metadata"]()) == result.metadata
    assert result.metadata["memory_usage"]["prefill"] > 0


# --- head sizes: every GPU target compiles the ones TVM's attention kernels support, refuses the rest ------


@pytest.fixture(scope="session")
def head_dim_model(tmp_path_factory: pytest.TempPathFactory):
    """(head_dim, quantization) -> a 1-layer model folder (config only: compiling reads no weights)."""
    root = tmp_path_factory.mktemp("head-dims")

    def get(head_dim: int, quantization: str) -> Path:
        model_dir = root / f"hd{head_dim}-{quantization}"
        if not model_dir.exists():
            shape = TinyShape(
                head_dim=head_dim, num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=2
            )
            gen_config(make_tiny_checkpoint(root / f"hf{head_dim}", shape=shape), model_dir, quantization)
        return model_dir

    return get


# A representative subset (each GPU preset once, float16 and float32, the sizes of common models); the rule
# behind it is checked against TVM's kernel generators for every target below.
@pytest.mark.parametrize(
    ("target", "head_dim", "quantization", "suffix"),
    [
        ("android", 80, "q4f16_1", ".tar"),
        ("cuda", 96, "q4f16_1", ".so"),
        ("opencl", 16, "q0f32", ".so"),  # float32 OpenCL prefill at 16 needed CSE off
        ("webgpu", 128, "q4f32_1", ".tar"),
        ("iphone", 256, "q4f16_1", ".tar"),
        ("metal", 64, "q4f32_1", ".tar"),
    ],
)
def test_supported_head_dims_compile(
    head_dim_model, tmp_path: Path, target: str, head_dim: int, quantization: str, suffix: str
) -> None:
    result = compile_model(head_dim_model(head_dim, quantization), target, tmp_path / f"lib{suffix}")
    assert result.metadata["kv_cache"]["head_dim"] == head_dim
    assert any(f.endswith("batch_decode_paged_kv") for f in result.device_functions)
    assert result.output.stat().st_size > 0


@pytest.mark.parametrize(
    ("target", "quantization", "nearby"),
    [
        ("android", "q4f16_1", "12, 16, 20, 24"),
        ("metal", "q4f32_1", "12, 16, 20, 24"),
        ("cuda", "q0f32", "16, 24, 32"),
    ],
)
def test_unsupported_head_dim_is_refused_before_compiling(
    head_dim_model, tmp_path: Path, target: str, quantization: str, nearby: str
) -> None:
    """The demo's head_dim 18: Metal's prefill tiles would take it, but the decode kernel would drop 2 of
    every 18 values; the CLI says so in one line and writes nothing."""
    output = tmp_path / "lib.tar"
    kind = targets.get_target(target).device_target["kind"]
    dtype = "float16" if quantization.endswith("f16_1") else "float32"
    assert_clean_failure(
        ["compile", str(head_dim_model(18, quantization)), "--target", target, "-o", str(output)],
        f"TVM's {kind} attention kernels do not support head_dim=18 with {dtype} (its decode kernels read "
        f"heads in vectors of 4), so target {target} cannot run this model; supported: {nearby} nearby and "
        "64, 80, 96, 128, 256",
        output,
    )


def _thread_x_and_vector(func: tirx.PrimFunc) -> tuple[int, int]:
    """threadIdx.x's extent and the widest vectorized loop of a GPU kernel."""
    found = {"threads": 0, "vector": 0}

    def visit(loop: tirx.For) -> None:
        if loop.kind == tirx.ForKind.THREAD_BINDING and loop.thread_binding.thread_tag == "threadIdx.x":
            found["threads"] = int(loop.extent)
        elif loop.kind == tirx.ForKind.VECTORIZED:
            found["vector"] = max(found["vector"], int(loop.extent))

    tvm_ffi.structural_walk(func.body, [(tirx.For, visit)])
    return found["threads"], found["vector"]


@pytest.mark.parametrize("head_dim", [18, 20, 64])
def test_tvm_decode_kernel_covers_head_dims_in_fours(head_dim: int) -> None:
    """Why head_dim % 4 is refused: TVM's decode kernel gives each of head_dim // 4 threads 4 values."""
    target = targets.get_target("android").make()
    func = _decode_kernels._attention_decode(1, 4, head_dim, "float16", False, {}, target)
    threads, vector = _thread_x_and_vector(func)
    assert threads * vector == head_dim - head_dim % 4
    assert (unsupported_head_dim_reason(head_dim, 1, 4, "float16", target) is None) == (head_dim % 4 == 0)


@pytest.mark.parametrize("target", ["cuda", "android", "metal", "webgpu"])
@pytest.mark.parametrize(
    ("head_dim", "dtype"), [(20, "float16"), (20, "float32"), (80, "float32"), (36, "float32")]
)
def test_head_dim_rule_agrees_with_tvm_prefill_kernels(target: str, head_dim: int, dtype: str) -> None:
    """A head size the rule accepts gets TVM's ragged prefill kernel; one refused for tiling, a ValueError."""
    tvm_target = targets.get_target(target).make()
    reason = unsupported_head_dim_reason(head_dim, 2, 6, dtype, tvm_target)
    try:
        _prefill_kernels._attention_prefill_ragged(2, 6, head_dim, head_dim, dtype, {}, tvm_target)
        built = True
    except ValueError:
        built = False
    assert built == (reason is None)


# --- a compile that fails inside TVM: one line, the details in a log ---------------------------------------

FAILING_COMPILE = """
import os, sys
import tvm
from megrez_mlc import cli
from megrez_mlc.compile import cpu_schedule

def broken(self, func, target, tunable):
    os.write(2, b"[tvm] a diagnostic TVM writes to fd 2 itself\\n")
    message = "Check failed: the schedule went wrong\\nthe IR with diagnostic is:\\n  T.evaluate(0)"
    raise tvm.error.InternalError(message)

cpu_schedule.TiledGEMM.apply = broken
sys.argv = ["megrez-mlc", *sys.argv[1:]]
cli.main()
"""


def test_a_tvm_failure_is_one_line_with_a_log(head_dim_model, tmp_path: Path) -> None:
    output = tmp_path / "lib.so"
    env = {**os.environ, "MEGREZ_MLC_HOME": str(tmp_path / "home")}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            FAILING_COMPILE,
            "compile",
            str(head_dim_model(64, "q4f32_1")),
            "-o",
            str(output),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    match = re.fullmatch(
        r"error: compiling for cpu failed \(a bug in megrez-mlc; please report it\): "
        r"Check failed: the schedule went wrong; full log: (\S+)",
        lines[0],
    )
    assert match, lines[0]
    log = Path(match.group(1))
    assert log.parent == tmp_path / "home" / "logs"
    text = log.read_text()
    assert (
        "T.evaluate(0)" in text and "in broken" in text and "a diagnostic TVM writes to fd 2 itself" in text
    )
    assert not output.exists()
