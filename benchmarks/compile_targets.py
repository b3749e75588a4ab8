"""Compile the full Megrez-3B graph for every target this machine can compile for; print a table.

No weights are needed to compile: the model folder is a config.json built from the shipped preset plus the
tiny test tokenizer, run through gen-config. Each compile runs as its own `megrez-mlc compile` process, so
the time is what a user waits (Python start-up included) and the peak RSS is that process's.

    python benchmarks/compile_targets.py [--quantization q4f16_1] [--targets cpu,cuda,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megrez_mlc.compile.targets import TARGETS
from megrez_mlc.config import load_preset
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.tiny import build_tokenizer

# The library kind each target writes when nothing else can be linked here.
SUFFIX = {"cpu": ".so", "cuda": ".so", "opencl": ".so", "vulkan": ".so"}


def full_size_model(workdir: Path, quantization: str) -> Path:
    hf_dir = workdir / "megrez-3b-instruct-config-only"
    hf_dir.mkdir(parents=True, exist_ok=True)
    config = load_preset("megrez-3b-instruct")["model_config"]
    (hf_dir / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    build_tokenizer().save(str(hf_dir / "tokenizer.json"))
    model_dir = workdir / f"megrez-3b-instruct-{quantization}"
    gen_config(hf_dir, model_dir, quantization, force=True)
    return model_dir


def compile_once(model_dir: Path, target: str, output: Path) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, error line or "") of one `megrez-mlc compile` process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "megrez_mlc",
            "compile",
            str(model_dir),
            "--target",
            target,
            "-o",
            str(output),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    error = "" if os.waitstatus_to_exitcode(status) == 0 else proc.stderr.read().strip().splitlines()[-1]
    return seconds, usage.ru_maxrss * 1024, error  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quantization", default="q4f16_1")
    parser.add_argument("--targets", default=",".join(TARGETS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model_dir = full_size_model(workdir, args.quantization)
        shape = "32 layers, hidden 2560, vocab 122880"
        print(f"full Megrez-3B graph ({shape}), {args.quantization}, {os.cpu_count()} cores")
        print("| target | output | compile (wall, s) | peak RSS (MiB) | library (MiB) |")
        print("| --- | --- | --- | --- | --- |")
        for target in args.targets.split(","):
            output = workdir / f"megrez-{target}{SUFFIX.get(target, '.tar')}"
            seconds, rss, error = compile_once(model_dir, target, output)
            size = f"{output.stat().st_size / 2**20:.1f}" if output.exists() else "-"
            result = f"{seconds:.1f}" if not error else f"failed: {error}"
            print(f"| {target} | {output.suffix} | {result} | {rss / 2**20:.0f} | {size} |", flush=True)


if __name__ == "__main__":
    main()
