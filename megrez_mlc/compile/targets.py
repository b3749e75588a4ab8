"""The target table: how each `--target` name becomes a TVM target, its schedules, and how it is saved.

A target is a device code generator (none for `cpu`) plus an LLVM host: the host code that launches the
kernels runs on the machine the library is for, which for `android`, `iphone` and a browser's `webgpu`
(.wasm) is not this one. Whether a target can compile here depends on the TVM build and is checked when
asked, so a TVM built with more works without a code change. `webgpu` as a .so and `vulkan` run here on
megrez-mlc's own WebGPU runtime (megrez_mlc/webgpu): TVM writes WGSL, and wgpu-native turns it into
SPIR-V for Vulkan (or MSL for Metal, HLSL for D3D12) when the kernels are first loaded.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm.support import cc, emcc, ndk
from tvm.target import codegen

from ..errors import MegrezError
from ..staging import check_writable
from ..webgpu import DEVICE_BACKENDS, device_adapter
from .cpu_schedule import cpu_schedule_passes
from .gpu import gpu_schedule_passes

DEFAULT_CUDA_ARCH = "sm_80"
SchedulePasses = Callable[[tvm.target.Target], list[tvm.transform.Pass]]


def no_schedules(_target: tvm.target.Target) -> list[tvm.transform.Pass]:
    return []


def this_machine_triple() -> str:
    return codegen.llvm_get_system_triple()


def host_llvm_target(host: str | None = None, cpu: str | None = None) -> tvm.target.Target:
    """LLVM for this machine's CPU (its vector ISA: AVX2, AVX-512...), or for the `--host` triple given,
    with `--cpu` naming the CPU (an LLVM CPU name such as haswell, znver3, sapphirerapids)."""
    triple = host or this_machine_triple()
    if cpu and not codegen.llvm_is_valid_cpu(cpu, triple):
        raise MegrezError(
            f"--cpu {cpu}: LLVM knows no such CPU for {triple}; use an LLVM CPU name such as haswell, "
            "znver3 or sapphirerapids (`llc -mtriple={triple} -mcpu=help` lists them)"
        )
    if host:
        return tvm.target.Target({"kind": "llvm", "mtriple": host, **({"mcpu": cpu} if cpu else {})})
    return tvm.target.Target(
        {"kind": "llvm", "mcpu": cpu or codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    )


def _platform(triple: str) -> tuple[str, str]:
    """(architecture, operating system) of an LLVM triple, e.g. ("aarch64", "android")."""
    arch = triple.split("-")[0].replace("arm64", "aarch64")
    for os_name in ("android", "darwin", "macos", "ios", "linux", "windows", "wasm"):
        if os_name in triple:
            return arch, {"macos": "darwin", "ios": "darwin"}.get(os_name, os_name)
    return arch, "unknown"


@dataclass(frozen=True)
class LibraryOutput:
    """How `-o` is written: as a system library (static, functions registered under a prefix) or not,
    and the TVM link function (None: TVM's default for the suffix, `tar` for .tar)."""

    system_lib: bool
    link: Callable[..., None] | None = None


def library_output(output: Path, host_triple: str) -> LibraryOutput:
    """The way to write `output` for code whose host is `host_triple`, or a MegrezError saying why this
    machine cannot (the one format that always works is a .tar of object files)."""
    suffix = output.suffix
    tar_hint = (
        f"write an object archive instead (-o {output.with_suffix('.tar').name}) and link it where that "
        "toolchain is"
    )
    if suffix == ".tar":
        return LibraryOutput(system_lib=True)
    if suffix == ".wasm":
        missing = [what for what, found in _wasm_toolchain().items() if not found]
        if missing:
            raise MegrezError(f"-o {output}: linking a .wasm needs {' and '.join(missing)}; {tar_hint}")
        return LibraryOutput(system_lib=True, link=emcc.create_tvmjs_wasm)
    arch, host_os = _platform(host_triple)
    if suffix == ".dylib" and host_os != "darwin":
        raise MegrezError(f"-o {output}: a .dylib is a macOS library but the host is {host_triple}; use .so")
    if host_os == "android":
        if "TVM_NDK_CC" not in os.environ:
            raise MegrezError(
                f"-o {output}: linking an Android shared library needs the NDK's clang in TVM_NDK_CC; "
                f"{tar_hint}"
            )
        return LibraryOutput(system_lib=False, link=ndk.create_shared)
    if (arch, host_os) != _platform(this_machine_triple()) or cc.get_cc() is None:
        where = "a Mac with Xcode" if host_os == "darwin" else f"a linker for {host_triple}"
        raise MegrezError(
            f"-o {output}: this machine ({this_machine_triple()}) cannot link a {suffix} for {host_triple}; "
            f"that needs {where}; {tar_hint}"
        )
    return LibraryOutput(system_lib=False)


def _wasm_toolchain() -> dict[str, bool]:
    return {
        "emscripten (emcc on PATH)": shutil.which("emcc") is not None,
        "TVM's web runtime (wasm_runtime.bc from a TVM source build, found through TVM_HOME)": (
            emcc.find_wasm_lib("wasm_runtime.bc", optional=True) is not None
        ),
    }


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    device: str  # the TVM device the library runs on
    codegen: str  # TVM's code generator for the kernels: the global function `target.build.<codegen>`
    library_suffixes: tuple[str, ...]  # what -o may end with, the usual one first
    device_target: dict | None = None  # the device's TVM target attributes (None: host code only)
    default_host: str | None = None  # LLVM triple of the machine the library runs on (None: this one)
    native_suffixes: tuple[str, ...] = ()  # -o suffixes whose host is this machine despite default_host
    runs_elsewhere: str | None = None  # where the library runs when it is never on this machine
    schedules: SchedulePasses = field(default=no_schedules)

    def make(
        self,
        host: str | None = None,
        cuda_arch: str | None = None,
        cpu: str | None = None,
        output: Path | None = None,
    ) -> tvm.target.Target:
        """The TVM target, host included; `host` overrides the host triple, `cpu` the host CPU, and the
        suffix of `output` picks between a browser's and this machine's host where a target has both."""
        if cuda_arch and self.codegen != "cuda":
            raise MegrezError(f"--cuda-arch applies to --target cuda, not {self.name}")
        host_target = host_llvm_target(self._host(host, output), cpu)
        if self.device_target is None:
            return host_target
        attrs = dict(self.device_target)
        if self.codegen == "cuda":
            attrs["arch"] = cuda_arch_name(cuda_arch) if cuda_arch else local_cuda_arch()
        return tvm.target.Target(attrs, host=host_target)

    def schedule_passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        return self.schedules(target)

    @property
    def is_gpu(self) -> bool:
        return self.device_target is not None

    def _host(self, host: str | None, output: Path | None) -> str | None:
        if host or (output is not None and output.suffix in self.native_suffixes):
            return host
        return self.default_host

    def host_triple(self, host: str | None = None, output: Path | None = None) -> str:
        return self._host(host, output) or this_machine_triple()

    @property
    def local_suffix(self) -> str:
        """The -o suffix of a library for this machine (the model-library cache's)."""
        return self.native_suffixes[0] if self.native_suffixes else self.library_suffixes[0]

    def output(self, output: Path, host: str | None = None) -> LibraryOutput:
        """How `-o output` is written, or a MegrezError for a suffix this target or machine cannot write, or
        a path this process cannot write to."""
        if output.suffix not in self.library_suffixes:
            raise MegrezError(
                f"-o {output}: target {self.name} writes {' or '.join(self.library_suffixes)} files; "
                f"e.g. -o model-{self.name}{self.library_suffixes[0]}"
            )
        library = library_output(output, self.host_triple(host, output))
        check_writable(output, folder=False)
        return library

    def cannot_compile_reason(self) -> str | None:
        """Why this TVM build cannot generate this target's code (None: it can)."""
        if tvm.get_global_func(f"target.build.{self.codegen}", allow_missing=True) is None:
            return f"this TVM build has no {self.codegen} code generator (target.build.{self.codegen})"
        return None

    def cannot_run_reason(self) -> str | None:
        """Why a library for this target cannot run on this machine (None: it can)."""
        if self.runs_elsewhere:
            return f"it runs {self.runs_elsewhere}"
        if self.name in DEVICE_BACKENDS:  # runs on megrez-mlc's WebGPU runtime (megrez_mlc/webgpu)
            return wgpu_unavailable_reason(self.name)
        if tvm.get_global_func(f"device_api.{self.device}", allow_missing=True) is None:
            return f"TVM has no {self.device} runtime here ({RUNTIME_HINTS.get(self.device, 'not built in')})"
        if not tvm.device(self.device).exist:
            return f"no {self.device} device found"
        return None

    def check_can_compile(self) -> None:
        reason = self.cannot_compile_reason()
        if reason:
            raise MegrezError(f"cannot compile for target {self.name}: {reason}")


def cuda_arch_name(arch: str) -> str:
    """`sm_89`, `89` or `sm_90a` -> the `sm_*` name TVM and nvcc use."""
    match = re.fullmatch(r"(?:sm_)?(\d{2,3}a?)", arch.strip())
    if not match:
        raise MegrezError(f"--cuda-arch {arch!r} is not a CUDA architecture like sm_80, sm_89 or sm_90a")
    return f"sm_{match.group(1)}"


def local_cuda_arch() -> str:
    """The architecture of this machine's first CUDA GPU, or sm_80 (A100 and later) when there is none."""
    device = tvm.cuda(0)
    if device.exist:
        return "sm_" + device.compute_version.replace(".", "")
    return DEFAULT_CUDA_ARCH


def wgpu_unavailable_reason(device_kind: str) -> str | None:
    """Why the webgpu runtime finds no adapter for `--device device_kind` here (None: it does)."""
    try:
        device_adapter(device_kind)
    except MegrezError as err:
        return str(err)
    return None


# Why TVM may lack a device runtime (its `device_api.<device>` function), by device.
RUNTIME_HINTS = {
    "cuda": "it loads only with an NVIDIA driver, libcuda.so.1",
    "metal": "Metal exists only on macOS and iOS",
    "opencl": "the PyPI wheel is built without it",
}
# Limits MLC-LLM uses for iPhone GPUs (smaller than a Mac's); the warp size of 1 keeps kernels portable.
IPHONE_METAL = {
    "kind": "metal",
    "max_threads_per_block": 256,
    "max_shared_memory_per_block": 32768,
    "thread_warp_size": 1,
    "libs": ["iphoneos"],
}
CUDA = {
    "kind": "cuda",
    "max_threads_per_block": 1024,
    "max_shared_memory_per_block": 49152,
    "thread_warp_size": 32,
}

TARGETS: dict[str, TargetPreset] = {
    preset.name: preset
    for preset in (
        TargetPreset(
            name="cpu",
            description="this machine's CPU through LLVM",
            device="cpu",
            codegen="llvm",
            library_suffixes=(".so", ".dylib", ".tar"),
            schedules=cpu_schedule_passes,
        ),
        TargetPreset(
            name="cuda",
            description="NVIDIA GPUs (sm from the local GPU, --cuda-arch, or sm_80)",
            device="cuda",
            codegen="cuda",
            library_suffixes=(".so", ".tar"),
            device_target=CUDA,
            schedules=gpu_schedule_passes,
        ),
        TargetPreset(
            name="metal",
            description="Apple GPUs on macOS (Apple silicon unless --host says otherwise)",
            device="metal",
            codegen="metal",
            library_suffixes=(".dylib", ".so", ".tar"),
            device_target={"kind": "metal"},
            default_host=None if sys.platform == "darwin" else "arm64-apple-darwin",
            schedules=gpu_schedule_passes,
        ),
        TargetPreset(
            name="iphone",
            description="iPhone/iPad GPUs (Metal), a static library for the MLCChat iOS app",
            device="metal",
            codegen="metal",
            library_suffixes=(".tar",),
            device_target=IPHONE_METAL,
            default_host="arm64-apple-darwin",
            runs_elsewhere="on an iPhone/iPad, linked into an app such as MLCChat",
            schedules=gpu_schedule_passes,
        ),
        TargetPreset(
            name="opencl",
            description="OpenCL GPUs on this machine's OS",
            device="opencl",
            codegen="opencl",
            library_suffixes=(".so", ".tar"),
            device_target={"kind": "opencl"},
            schedules=gpu_schedule_passes,
        ),
        TargetPreset(
            name="android",
            description="Android phones (OpenCL: Adreno, Mali), a static library for the MLCChat app",
            device="opencl",
            codegen="opencl",
            library_suffixes=(".tar", ".so"),
            device_target={"kind": "opencl"},
            default_host="aarch64-linux-android",
            runs_elsewhere="on an arm64 Android phone with OpenCL, linked into an app such as MLCChat",
            schedules=gpu_schedule_passes,
        ),
        TargetPreset(
            name="webgpu",
            description=(
                "WGSL kernels: .wasm/.tar for browsers (WebLLM), .so for this machine's GPU through "
                "wgpu-native (Vulkan, Metal, D3D12)"
            ),
            device="webgpu",
            codegen="webgpu",
            library_suffixes=(".wasm", ".tar", ".so", ".dylib"),
            device_target={"kind": "webgpu"},
            default_host="wasm32-unknown-unknown-wasm",
            native_suffixes=(".so", ".dylib"),
            schedules=gpu_schedule_passes,
        ),
        TargetPreset(
            name="vulkan",
            description="Vulkan GPUs: the webgpu kernels, made SPIR-V by wgpu-native's Vulkan backend",
            device="webgpu",
            codegen="webgpu",
            library_suffixes=(".so", ".tar"),
            device_target={"kind": "webgpu"},
            schedules=gpu_schedule_passes,
        ),
    )
}


def get_target(name: str) -> TargetPreset:
    try:
        return TARGETS[name]
    except KeyError:
        raise MegrezError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None


@dataclass(frozen=True)
class TargetStatus:
    name: str
    description: str
    cannot_compile: str | None
    cannot_run: str | None
    outputs_here: tuple[str, ...]  # the -o suffixes this machine can write for it


def target_statuses() -> list[TargetStatus]:
    """What this machine and TVM build can do with each target (`megrez-mlc targets`)."""
    statuses = []
    for preset in TARGETS.values():
        outputs = []
        for suffix in preset.library_suffixes:
            try:
                path = Path(f"model{suffix}")
                library_output(path, preset.host_triple(output=path))  # what the toolchain allows
                outputs.append(suffix)
            except MegrezError:
                pass
        statuses.append(
            TargetStatus(
                preset.name,
                preset.description,
                preset.cannot_compile_reason(),
                preset.cannot_run_reason(),
                tuple(outputs),
            )
        )
    return statuses
