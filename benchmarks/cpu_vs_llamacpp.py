"""megrez-mlc against llama.cpp on this CPU: the full Megrez-3B shape, the same random weights, one run.

    python benchmarks/cpu_vs_llamacpp.py [--threads 2] [--rounds 3] [--prompt-len 128] [--gen-len 128]
                                         [--contexts 2048,8192] [--cache-dir DIR]

Builds and caches (under $MEGREZ_MLC_HOME/bench, or --cache-dir): a random bf16 Megrez-3B-shaped
checkpoint, its megrez-mlc conversions (q4f32_1, q4f16_1) and CPU libraries, an F16 GGUF of the same
weights quantized by llama.cpp to Q4_0 and Q4_K_M, and llama.cpp itself (llama-cpp-python from PyPI, built
from source on first use; the build time is printed). Then, with the same thread count, prompt and output
lengths, it measures the engines in turn, round after round (A B C D A B C D ...), so drift of a shared
machine hits all alike, and prints the medians, the ratios to llama.cpp Q4_K_M, the memory-bandwidth bound
measured in the same run, and decode speed after long contexts. PyTorch (transformers, bfloat16) runs as a
third peer unless --no-torch.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from bandwidth import read_bandwidth_gb_s  # noqa: E402
from fullsize import ensure_checkpoint  # noqa: E402
from llamacpp_gguf import quantize_gguf, write_f16_gguf  # noqa: E402

from megrez_mlc.home import megrez_home  # noqa: E402
from megrez_mlc.runtime.threads import configure_threads  # noqa: E402

OUR_QUANTIZATIONS = ("q4f32_1", "q4f16_1")
LLAMA_QUANTIZATIONS = ("Q4_0", "Q4_K_M")
REFERENCE = "llama.cpp Q4_K_M"
OURS = tuple(f"megrez-mlc {q}" for q in OUR_QUANTIZATIONS)


@dataclass
class Engine:
    """One model under test: `prefill(tokens)` then `decode(token)` calls, `reset()` between runs."""

    name: str
    kernels: str  # which weight kernels run: megrez-mlc's CPU path, llama.cpp's ggml build
    weight_bytes: int
    prefill: Callable[[list[int]], None]
    decode: Callable[[int], None]
    reset: Callable[[], None]


def megrez_engine(cache: Path, hf_dir: Path, quantization: str, max_len: int, build: bool = True) -> Engine:
    from megrez_mlc.compile.compiler import compile_model
    from megrez_mlc.quantize.convert import convert_weight
    from megrez_mlc.quantize.gen_config import gen_config
    from megrez_mlc.runtime.model_lib import ModelLibrary

    model_dir = cache / f"mlc-{quantization}"
    lib = model_dir / f"megrez-{quantization}-cpu.so"
    if not all((model_dir / f).is_file() for f in ("tensor-cache.json", "mlc-chat-config.json")):
        print(f"converting to {quantization} ...", flush=True)
        convert_weight(hf_dir, model_dir, quantization, force=True)
        gen_config(hf_dir, model_dir, quantization, force=True)
    kernels = "(as compiled by the parent run)"
    if build:  # always, but in a child: a cached library would hide changes to the kernels
        result = compile_model(model_dir, "cpu", lib)
        kernels = f"{result.cpu_kernels}, {result.kv_cache_dtype} KV cache"
        print(f"compiled {lib.name} ({kernels}) in {result.seconds:.1f} s", flush=True)
    model = ModelLibrary(model_dir, lib, max_batch_size=1, max_total_seq_len=max_len)
    state = {"seq": model.add_sequence()}

    def reset() -> None:
        model.remove_sequence(state["seq"])
        state["seq"] = model.add_sequence()

    weight_bytes = sum(p.stat().st_size for p in model_dir.glob("params_shard_*.bin"))
    return Engine(
        OURS[OUR_QUANTIZATIONS.index(quantization)],
        kernels,
        weight_bytes,
        lambda tokens: model.prefill([state["seq"]], [tokens]),
        lambda token: model.decode([state["seq"]], [token]),
        reset,
    )


def ensure_llama_cpp(cache: Path) -> str:
    """Import llama_cpp, building llama-cpp-python from PyPI the first time (the wheel is cached)."""
    try:
        import llama_cpp  # noqa: F401

        return (
            (cache / "llama-cpp-build.txt").read_text().strip()
            if (cache / "llama-cpp-build.txt").is_file()
            else "already installed"
        )
    except ImportError:
        pass
    wheels = cache / "wheels"
    start = time.perf_counter()
    print("building llama-cpp-python from source (once; this takes minutes) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "llama-cpp-python", "-w", str(wheels)], check=True
    )
    built = time.perf_counter() - start
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", *map(str, wheels.glob("llama_cpp*.whl"))],
        check=True,
    )
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "diskcache", "jinja2", "typing-extensions"], check=True
    )
    flags = os.environ.get("CMAKE_ARGS")
    note = f"built from source in {built:.0f} s" + (f" with CMAKE_ARGS={flags}" if flags else "")
    (cache / "llama-cpp-build.txt").write_text(note)
    return note


def ggml_features(system_info: str) -> str:
    """The SIMD paths llama.cpp's CPU backend was built with, from its system-info line."""
    flags = {
        part.split("=")[0].strip().split(":")[-1].strip() for part in system_info.split("|") if "= 1" in part
    }
    paths = ("AVX2", "AVX_VNNI", "AVX512", "AVX512_VNNI", "AMX_INT8")
    return "ggml " + "+".join(f for f in paths if f in flags)


def llama_engine(cache: Path, hf_dir: Path, kind: str, threads: int, max_len: int) -> Engine:
    import llama_cpp

    f16 = cache / "megrez-f16.gguf"
    out = cache / f"megrez-{kind}.gguf"
    if not out.is_file():
        if not f16.is_file():
            print("writing the F16 GGUF ...", flush=True)
            write_f16_gguf(hf_dir, f16.with_suffix(".partial"))
            f16.with_suffix(".partial").rename(f16)
        print(f"quantizing to {kind} with llama.cpp ...", flush=True)
        quantize_gguf(f16, out.with_suffix(".partial"), kind, threads)
        out.with_suffix(".partial").rename(out)
    llm = llama_cpp.Llama(
        str(out),
        n_ctx=max_len,
        n_batch=512,
        n_ubatch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    return Engine(
        f"llama.cpp {kind}",
        ggml_features(llama_cpp.llama_print_system_info().decode()),
        out.stat().st_size,
        lambda tokens: llm.eval(tokens),
        lambda token: llm.eval([token]),
        llm.reset,
    )


def torch_engine(hf_dir: Path, threads: int) -> Engine:
    """transformers in bfloat16 (eager, as the model card runs it): PyTorch's CPU matmuls use the CPU's
    bf16 instructions (AVX512-BF16 here; AMX where the CPU has it)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).eval()
    state: dict = {}

    def forward(tokens: list[int]) -> None:
        with torch.inference_mode():
            out = model(torch.tensor([tokens]), past_key_values=state["cache"], use_cache=True)
        state["cache"] = out.past_key_values

    def reset() -> None:
        state["cache"] = DynamicCache()

    reset()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = "PyTorch bf16 (transformers)"
    return Engine(name, "torch", weight_bytes, forward, lambda t: forward([t]), reset)


def measure(engine: Engine, prompt: list[int], gen: list[int]) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s) of one run."""
    engine.reset()
    start = time.perf_counter()
    engine.prefill(prompt)
    prefilled = time.perf_counter()
    for token in gen:
        engine.decode(token)
    done = time.perf_counter()
    return len(prompt) / (prefilled - start), len(gen) / (done - prefilled)


def memory_of_this_process() -> tuple[float, float]:
    """(peak, current) resident set in MiB, as the kernel counts them for this process since its exec."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(status[key].split()[0]) / 1024 for key in ("VmHWM", "VmRSS"))


def memory_alone(args: argparse.Namespace, name: str) -> tuple[float, float]:
    """(peak, after decoding) RSS of one engine in a fresh process that loads it, prefills the prompt and
    decodes: resident memory of one process is the user's measure, and in this one all engines share it."""
    child = [sys.executable, __file__, "--memory-of", name, "--cache-dir", str(args.cache_dir)]
    child += ["--threads", str(args.threads)] if args.threads else []
    child += ["--prompt-len", str(args.prompt_len), "--gen-len", str(args.gen_len)]
    child += ["--contexts", args.contexts]  # the KV cache's size
    out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    peak, current = json.loads(out.strip().splitlines()[-1])
    return peak, current


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    return f"{cpu}, {len(os.sched_getaffinity(0))} CPUs, {mem:.0f} GiB, {platform.machine()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=megrez_home() / "bench")
    parser.add_argument("--threads", type=int, default=None, help="both engines (default: physical cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=128)
    parser.add_argument("--contexts", default="2048,8192", help="decode after these contexts ('' to skip)")
    parser.add_argument("--no-torch", dest="torch", action="store_false", help="leave PyTorch bf16 out")
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # the child of memory_alone
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    cache = args.cache_dir
    cache.mkdir(parents=True, exist_ok=True)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    max_len = max([args.prompt_len, *contexts]) + args.gen_len + 16
    hf_dir = ensure_checkpoint(cache)
    rng = np.random.default_rng(0)
    vocab = json.loads((hf_dir / "config.json").read_text())["vocab_size"]
    prompt = rng.integers(0, vocab, args.prompt_len).tolist()
    gen = rng.integers(0, vocab, args.gen_len).tolist()

    if args.memory_of:
        quantization = args.memory_of.split()[-1]
        if args.memory_of.startswith("megrez-mlc"):
            engine = megrez_engine(cache, hf_dir, quantization, max_len, build=False)
        else:
            engine = llama_engine(cache, hf_dir, quantization, threads, max_len)
        measure(engine, prompt, gen)
        print(json.dumps(memory_of_this_process()))
        return

    build_note = ensure_llama_cpp(cache)
    engines = [megrez_engine(cache, hf_dir, q, max_len) for q in OUR_QUANTIZATIONS]
    engines += [llama_engine(cache, hf_dir, k, threads, max_len) for k in LLAMA_QUANTIZATIONS]
    if args.torch:
        engines.append(torch_engine(hf_dir, threads))
    gc.collect()
    for engine in engines:  # warm-up: page the weights in, start the thread pools
        measure(engine, prompt[:16], gen[:4])
    results: dict[str, list[tuple[float, float]]] = {e.name: [] for e in engines}
    bandwidth = []
    for round_no in range(args.rounds):
        bandwidth.append(read_bandwidth_gb_s(threads, repeats=2))
        for engine in engines:
            results[engine.name].append(measure(engine, prompt, gen))
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)
    gb_s = statistics.median(bandwidth)

    print()
    print(f"machine: {machine()}; {threads} threads for every engine; llama-cpp-python {build_note}")
    rounds = f"median of {args.rounds} interleaved rounds"
    print(f"prompt {args.prompt_len} tokens, {args.gen_len} generated, {rounds}")
    print(f"memory read bandwidth (same run, {threads} threads): {gb_s:.1f} GB/s")
    print()
    print(
        "| engine | kernels | weights (GB) | prefill tok/s | decode tok/s | prefill vs Q4_K_M "
        "| decode vs Q4_K_M | decode bound (bandwidth / weights) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    medians = {
        name: (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
        for name, runs in results.items()
    }
    ref_prefill, ref_decode = medians[REFERENCE]
    for engine in engines:
        prefill, decode = medians[engine.name]
        bound = gb_s * 1e9 / engine.weight_bytes
        print(
            f"| {engine.name} | {engine.kernels} | {engine.weight_bytes / 1e9:.2f} | {prefill:.1f} "
            f"| {decode:.2f} "
            f"| {prefill / ref_prefill:.2f}x | {decode / ref_decode:.2f}x | {bound:.1f} |"
        )

    print()
    print(
        f"resident memory, each engine alone in a fresh process (load, prefill {args.prompt_len}, decode "
        f"{args.gen_len}; KV cache for {max_len} tokens):"
    )
    print("| engine | peak RSS (MiB) | RSS after decoding (MiB) | peak vs Q4_K_M |")
    print("| --- | ---: | ---: | ---: |")
    alone = {e.name: memory_alone(args, e.name) for e in engines if not e.name.startswith("PyTorch")}
    for name, (peak, current) in alone.items():
        print(f"| {name} | {peak:.0f} | {current:.0f} | {peak / alone[REFERENCE][0]:.2f}x |", flush=True)

    if contexts:
        print()
        print(f"decode tok/s after a long prompt ({min(args.gen_len, 32)} tokens generated):")
        print(
            "| engine | "
            + " | ".join(f"after {args.prompt_len}" if c == 0 else f"after {c}" for c in [0, *contexts])
            + " | longest / shortest |"
        )
        print("| --- |" + " ---: |" * (len(contexts) + 2))
        long_context_engines = [e for e in engines if e.name in (*OURS, REFERENCE)]
        prompts = [prompt] + [rng.integers(0, vocab, context).tolist() for context in contexts]
        for engine in long_context_engines:
            # the short prompt again, right before the long ones: the machine's speed drifts over a run
            speeds = [measure(engine, long_prompt, gen[:32])[1] for long_prompt in prompts]
            cells = " | ".join(f"{s:.2f}" for s in speeds)
            ratio = speeds[-1] / speeds[0]
            print(f"| {engine.name} | {cells} | {ratio:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
