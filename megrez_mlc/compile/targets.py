"""The target table: how each `--target` name becomes a TVM target, its schedules, and how it is saved."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import tvm
from tvm import relax
from tvm.target import codegen

from ..errors import MegrezError
from .cpu_schedule import cpu_schedule_passes


def host_llvm_target(host: str | None = None) -> tvm.target.Target:
    """LLVM for this machine's CPU (its vector ISA: AVX2, AVX-512...), or for the `--host` triple given.

    The target is its own host: TVM compiles host-side helpers (shape functions) into the same LLVM
    module, and a default generic host would make LLVM compile every kernel for a generic x86-64
    (measured: the prefill GEMM ran 3x slower, its accumulators spilled to the stack).
    """
    if host:
        config = {"kind": "llvm", "mtriple": host}
    else:
        config = {"kind": "llvm", "mcpu": codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    return tvm.target.Target(config, host=config)


@dataclass(frozen=True)
class TargetPreset:
    name: str
    description: str
    make: Callable[[str | None], tvm.target.Target]
    library_suffixes: tuple[str, ...]
    system_lib: bool = False
    schedules: Callable[[tvm.target.Target], list[tvm.transform.Pass]] = field(default=lambda _t: [])

    def schedule_passes(self, target: tvm.target.Target) -> list[tvm.transform.Pass]:
        return self.schedules(target)

    def check_output(self, output: Path) -> None:
        suffix = "".join(output.suffixes[-1:])
        if suffix not in self.library_suffixes:
            raise MegrezError(
                f"-o {output}: target {self.name} writes {' or '.join(self.library_suffixes)} files; "
                f"e.g. -o model-{self.name}{self.library_suffixes[0]}"
            )

    def export(self, executable: relax.VMExecutable, path: Path) -> None:
        executable.export_library(str(path))


TARGETS: dict[str, TargetPreset] = {
    preset.name: preset
    for preset in (
        TargetPreset(
            name="cpu",
            description="this machine's CPU through LLVM",
            make=host_llvm_target,
            library_suffixes=(".so", ".tar"),
            schedules=cpu_schedule_passes,
        ),
    )
}


def get_target(name: str) -> TargetPreset:
    try:
        return TARGETS[name]
    except KeyError:
        raise MegrezError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None
