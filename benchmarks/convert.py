"""convert-weight at real scale: a full-size random Megrez-3B-shaped bf16 checkpoint, every quantization.

    PYTHONPATH=$PWD python benchmarks/convert.py [--cache-dir DIR] [-q q4f16_1 ...] [--repeat N]
        [--threads N] [--cold] [--layout bin] [--keep]

The checkpoint (config.json + three bf16 safetensors shards + model.safetensors.index.json, ~5.8 GB, laid
out like a Hugging Face download) is generated once and cached under $MEGREZ_MLC_HOME/bench (or
--cache-dir). Each quantization runs `megrez-mlc convert-weight` in a child process; its wall time, CPU
time and peak RSS (the child's own rusage, from wait4) and its output size are printed as a table: the
fastest of --repeat runs, the one least disturbed by other jobs on a shared machine. Outputs are deleted
unless --keep. --threads sets convert-weight's thread count. --cold evicts the checkpoint from the page
cache before each run (posix_fadvise), so it is read from disk as on a first conversion. --layout bin
converts the same weights saved as pytorch_model-*.bin shards (made once from the safetensors).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from fullsize import CHECKPOINT_NAME, make_checkpoint  # noqa: E402

from megrez_mlc.home import megrez_home  # noqa: E402

QUANTIZATIONS = ("q4f16_1", "q4f32_1", "q0f16", "q0f32")


def make_bin_checkpoint(safetensors_dir: Path, hf_dir: Path) -> None:
    """The same weights as pytorch_model-*.bin shards + index (torch.save; one shard in memory at a time)."""
    import torch
    from safetensors.torch import load_file

    partial = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copyfile(safetensors_dir / "config.json", partial / "config.json")
    weight_map = {}
    sources = sorted(safetensors_dir.glob("*.safetensors"))
    for i, source in enumerate(sources):
        file_name = f"pytorch_model-{i + 1:05d}-of-{len(sources):05d}.bin"
        print(f"writing {partial / file_name}")
        state = load_file(source)
        torch.save(state, partial / file_name)
        weight_map |= dict.fromkeys(state, file_name)
        del state
    index = {"metadata": {}, "weight_map": weight_map}
    (partial / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    partial.rename(hf_dir)


def weight_files(hf_dir: Path) -> list[Path]:
    return sorted([*hf_dir.glob("*.safetensors"), *hf_dir.glob("*.bin")])


def evict_from_page_cache(hf_dir: Path) -> None:
    for path in weight_files(hf_dir):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def run_convert(
    hf_dir: Path, out_dir: Path, quantization: str, threads: int | None
) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds (user + system) and peak RSS bytes of one `megrez-mlc convert-weight`."""
    cmd = [sys.executable, "-m", "megrez_mlc", "convert-weight", str(hf_dir), "-q", quantization]
    cmd += ["--threads", str(threads)] if threads else []
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    start = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "-o", str(out_dir)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage, not the maximum over all children
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.exit(
            f"convert-weight -q {quantization} failed ({proc.returncode}):\n{proc.stderr.read().decode()}"
        )
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024  # ru_maxrss is in KiB on Linux


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, Python {platform.python_version()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=megrez_home() / "bench")
    parser.add_argument("-q", "--quantization", action="append", choices=QUANTIZATIONS)
    parser.add_argument(
        "--layout", choices=("safetensors", "bin"), default="safetensors", help="checkpoint file format"
    )
    parser.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache first")
    parser.add_argument("--threads", type=int, help="converter threads (default: convert-weight's)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per quantization; the fastest is shown")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--keep", action="store_true", help="keep the converted outputs")
    args = parser.parse_args()

    hf_dir = args.cache_dir / CHECKPOINT_NAME
    bin_dir = args.cache_dir / "megrez-3b-instruct-random-bf16-bin"
    if args.generate_only:
        if not (hf_dir / "model.safetensors.index.json").is_file():
            start = time.perf_counter()
            make_checkpoint(hf_dir)
            print(f"generated {hf_dir} in {time.perf_counter() - start:.0f} s")
        if args.layout == "bin" and not (bin_dir / "pytorch_model.bin.index.json").is_file():
            make_bin_checkpoint(hf_dir, bin_dir)
        return
    # Generated in a child: a child's peak RSS counts its parent's at the time it was spawned (vfork), so
    # this measuring process must stay small.
    generate = [sys.executable, __file__, "--generate-only", "--cache-dir", str(args.cache_dir)]
    subprocess.run([*generate, "--layout", args.layout], check=True)
    hf_dir = bin_dir if args.layout == "bin" else hf_dir
    sources = weight_files(hf_dir)
    source_bytes = sum(p.stat().st_size for p in sources)
    print(f"machine: {machine()}")
    print(f"source: {hf_dir} ({source_bytes / 1e9:.2f} GB bf16, {len(sources)} {args.layout} shards)")
    print(f"threads: {args.threads or 'default (one per core)'}; fastest of {args.repeat} run(s) each")
    print(
        f"page cache: {'evicted before each run (cold)' if args.cold else 'as left by earlier runs (warm)'}"
    )
    print()
    print("| quantization | wall (s) | CPU (s) | peak RSS (MiB) | output (MiB) | shards |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for quantization in args.quantization or QUANTIZATIONS:
        out_dir = args.cache_dir / f"out-{quantization}"
        runs = []
        for _ in range(args.repeat):  # the fastest run: the one least disturbed by other jobs
            shutil.rmtree(out_dir, ignore_errors=True)
            if args.cold:
                evict_from_page_cache(hf_dir)
            runs.append(run_convert(hf_dir, out_dir, quantization, args.threads))
        wall, cpu, peak_rss = min(runs)
        shards = list(out_dir.glob("params_shard_*.bin"))
        size = sum(p.stat().st_size for p in out_dir.iterdir())
        print(
            f"| {quantization} | {wall:.1f} | {cpu:.1f} | {peak_rss / 2**20:.0f} | {size / 2**20:.0f} "
            f"| {len(shards)} |",
            flush=True,
        )
        if not args.keep:
            shutil.rmtree(out_dir)
    own_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n(this measuring process peaked at {own_peak:.0f} MiB, below every child's peak)")


if __name__ == "__main__":
    main()
