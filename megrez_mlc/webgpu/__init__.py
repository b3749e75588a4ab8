"""TVM's webgpu device on a desktop: our WebGPU runtime (runtime.cc) over wgpu-native.

The TVM wheel runs webgpu libraries only in a browser. runtime.cc gives it the webgpu device here: it is
compiled once per machine with the C++ compiler TVM links libraries with, against the headers the tvm,
tvm-ffi and wgpu wheels ship, cached under $MEGREZ_MLC_HOME/runtime, and loaded into the process before
the first webgpu library or device is touched. wgpu-native then runs the WGSL kernels on Vulkan (any
Linux or Windows GPU, or Mesa's lavapipe on the CPU), Metal or D3D12.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import tvm
import tvm_ffi
import wgpu
from tvm.support import cc

from ..errors import MegrezError
from ..home import megrez_home

SOURCE = Path(__file__).with_name("runtime.cc")
BACKEND_ENV = "MEGREZ_MLC_WGPU_BACKEND"
BACKENDS = ("vulkan", "metal", "dx12", "gl")
# The `--device` names that run on this runtime, and the wgpu backend each asks for ("": wgpu's choice).
DEVICE_BACKENDS = {"webgpu": "", "vulkan": "vulkan"}
DRIVER_HINT = (
    "install a Vulkan driver for your GPU (on Debian/Ubuntu without a GPU, Mesa's CPU driver: "
    "apt-get install mesa-vulkan-drivers)"
)


@dataclass(frozen=True)
class Adapter:
    """The GPU wgpu-native opened, and the limits that decide what runs on it."""

    backend: str
    name: str
    description: str
    shader_f16: bool
    max_storage_buffer_binding_size: int
    max_buffer_size: int

    def __str__(self) -> str:
        detail = f" ({self.description})" if self.description else ""
        return f"{self.name}{detail} on {self.backend}, shader-f16 {'yes' if self.shader_f16 else 'no'}"


def _wheel_dirs() -> dict[str, Path]:
    return {
        "tvm": Path(tvm.__file__).parent,
        "tvm_ffi": Path(tvm_ffi.__file__).parent,
        "wgpu": Path(wgpu.__file__).parent / "resources",
    }


def _build_command(output: Path) -> list[str]:
    compiler = cc.get_cc()
    if compiler is None or not Path(compiler).name.startswith(("g++", "clang++", "c++")):
        compiler = next((c for c in ("g++", "clang++", "c++") if shutil.which(c)), None)
    if compiler is None:
        raise MegrezError(
            "the webgpu runtime is compiled on this machine and needs a C++ compiler; "
            "install g++ or clang++ (or set CXX)"
        )
    dirs = _wheel_dirs()
    libs = [dirs["tvm"] / "lib", dirs["tvm_ffi"] / "lib", dirs["wgpu"]]
    return [
        compiler,
        "-std=c++17",
        "-O2",
        "-shared",
        "-fPIC",
        str(SOURCE),
        "-o",
        str(output),
        "-I",
        str(dirs["tvm"] / "include"),
        "-I",
        str(dirs["tvm_ffi"] / "include"),
        "-I",
        str(dirs["wgpu"]),
        *[f"-L{lib}" for lib in libs],
        *[f"-Wl,-rpath,{lib}" for lib in libs],
        "-ltvm_runtime",
        "-ltvm_ffi",
        "-l:libwgpu_native-release.so",
    ]


def runtime_library() -> Path:
    """The compiled runtime for this source and these wheels, built on first use (temp file, then rename)."""
    key = hashlib.sha256(
        SOURCE.read_bytes() + f"{tvm.__version__} {tvm_ffi.__version__} {wgpu.__version__}".encode()
    ).hexdigest()[:16]
    library = megrez_home() / "runtime" / f"libmegrez_webgpu-{key}.so"
    if library.is_file():
        return library
    library.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=f".{library.name}.", dir=library.parent)
    os.close(fd)
    try:
        result = subprocess.run(_build_command(Path(partial)), capture_output=True, text=True)
        if result.returncode != 0:
            log = library.with_suffix(".log")
            log.write_text(result.stdout + result.stderr)
            raise MegrezError(
                f"building the webgpu runtime failed (a bug in megrez-mlc; please report it); full log: {log}"
            )
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return library


@cache
def load_runtime() -> None:
    """Make TVM's webgpu device and module loader this runtime's (once per process)."""
    ctypes.CDLL(str(runtime_library()), mode=ctypes.RTLD_GLOBAL)


def open_adapter(backend: str | None = None) -> Adapter:
    """The adapter of `backend` (None: $MEGREZ_MLC_WGPU_BACKEND, else wgpu's choice), opened once; a
    MegrezError in one line when there is none."""
    load_runtime()
    if backend is None:
        backend = os.environ.get(BACKEND_ENV, "")
    if backend and backend not in BACKENDS:
        raise MegrezError(f"{BACKEND_ENV}={backend}: unknown wgpu backend; use one of {', '.join(BACKENDS)}")
    error = _quiet_open(backend)
    if error:
        raise MegrezError(f"no WebGPU adapter: {one_line(error)}; {DRIVER_HINT}")
    info = json.loads(tvm.get_global_func("megrez_webgpu.adapter_info")())
    return Adapter(**{field: info[field] for field in Adapter.__dataclass_fields__})


def one_line(message: str) -> str:
    """wgpu's multi-line error report ("Validation Error", "Caused by:", the cause) as one line."""
    lines = [line.strip() for line in message.splitlines()]
    return " ".join(line for line in lines if line and line not in ("Validation Error", "Caused by:"))


def device_adapter(device_kind: str) -> Adapter:
    """The adapter a `--device` of DEVICE_BACKENDS (webgpu, vulkan) runs on."""
    return open_adapter(DEVICE_BACKENDS[device_kind] or None)


# Printed by libwayland inside Mesa's Vulkan loader on a machine with no desktop session; harmless.
_NOISE = ("XDG_RUNTIME_DIR",)


def _quiet_open(backend: str) -> str:
    """Open the adapter with fd 2 captured: Vulkan drivers print to it while they probe, and of that only
    lines that are not known noise are passed on."""
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            error = str(tvm.get_global_func("megrez_webgpu.open")(backend))
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        captured.seek(0)
        lines = captured.read().decode(errors="replace").splitlines(keepends=True)
    kept = "".join(line for line in lines if not any(noise in line for noise in _NOISE))
    if kept:
        sys.stderr.write(kept)
    return error
