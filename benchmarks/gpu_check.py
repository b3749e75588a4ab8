"""On a machine with a GPU: q4f16_1 for `--target cuda` (the default) or `webgpu` (megrez-mlc's WebGPU
runtime, Vulkan through wgpu-native), checked against the CPU and timed (gpu_check.sh runs both).

1. Correctness: a tiny random checkpoint with Megrez's head_dim (64), q4f16_1, compiled for cpu (exact
   kernels) and for the target; 32 greedy ids of each from the same prompt must be the same.
2. Speed on the full Megrez-3B shape (random weights, benchmarks/fullsize.py): prefill 128 tokens and
   decode 128 at batch 1, then 8 sequences of 128 prompt tokens decoding 128 each (prefill included),
   printed next to the model card's vLLM throughput on an H100.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

from fullsize import ensure_checkpoint  # noqa: E402

from megrez_mlc.compile.compiler import compile_model  # noqa: E402
from megrez_mlc.home import megrez_home  # noqa: E402
from megrez_mlc.quantize.convert import convert_weight  # noqa: E402
from megrez_mlc.quantize.gen_config import gen_config  # noqa: E402
from megrez_mlc.runtime.model_lib import ModelLibrary  # noqa: E402
from megrez_mlc.tiny import TinyShape, make_tiny_checkpoint  # noqa: E402

QUANTIZATION = "q4f16_1"
MODEL_CARD_TOKENS_PER_S = 2329.4  # vLLM, H100, batch 8, 128 in / 128 out (the model card's table)
BATCH, PROMPT_LEN, GEN_LEN = 8, 128, 128


def convert(hf_dir: Path, out: Path) -> Path:
    if not (out / "mlc-chat-config.json").is_file():
        convert_weight(hf_dir, out, QUANTIZATION, force=True)
        gen_config(hf_dir, out, QUANTIZATION, force=True)
    return out


def greedy(lib: ModelLibrary, prompt: list[int], steps: int) -> list[int]:
    seq = lib.add_sequence()
    logits = lib.prefill([seq], [prompt])[0]
    ids = []
    for _ in range(steps):
        ids.append(int(np.argmax(logits)))
        logits = lib.decode([seq], [ids[-1]])[0]
    lib.remove_sequence(seq)
    return ids


def check_greedy_ids(work: Path, target: str) -> bool:
    hf_dir = make_tiny_checkpoint(work / "tiny", shape=TinyShape(head_dim=64), seed=2)
    model_dir = convert(hf_dir, work / f"tiny-{QUANTIZATION}")
    compile_model(model_dir, "cpu", work / "tiny-cpu.so", cpu_kernels="exact")
    compile_model(model_dir, target, work / f"tiny-{target}.so")
    prompt = np.random.default_rng(0).integers(0, 300, 23).tolist()
    on_cpu = greedy(ModelLibrary(model_dir, work / "tiny-cpu.so"), prompt, 32)
    on_gpu = greedy(ModelLibrary(model_dir, work / f"tiny-{target}.so", device=target), prompt, 32)
    same = on_cpu == on_gpu
    print(
        f"greedy ids, {target} vs cpu exact (tiny model, 32 tokens): {'identical' if same else 'DIFFERENT'}"
    )
    if not same:
        print(f"  cpu    {on_cpu}\n  {target} {on_gpu}")
    return same


def measure_speed(cache: Path, target: str) -> None:
    model_dir = convert(ensure_checkpoint(cache), cache / f"mlc-{QUANTIZATION}")
    lib_path = cache / f"megrez-{QUANTIZATION}-{target}.so"
    result = compile_model(model_dir, target, lib_path, max_batch_size=BATCH)
    print(f"compiled {lib_path.name} in {result.seconds:.1f} s")
    lib = ModelLibrary(model_dir, lib_path, device=target, max_batch_size=BATCH)
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 1000, PROMPT_LEN).tolist()
    greedy(lib, prompt[:16], 4)  # warm-up
    seq = lib.add_sequence()
    start = time.perf_counter()
    lib.prefill([seq], [prompt])
    prefilled = time.perf_counter()
    for token in rng.integers(0, 1000, GEN_LEN).tolist():
        lib.decode([seq], [token])
    done = time.perf_counter()
    lib.remove_sequence(seq)
    prefill, decode = PROMPT_LEN / (prefilled - start), GEN_LEN / (done - prefilled)
    print(f"batch 1: prefill {prefill:.1f} tok/s, decode {decode:.1f} tok/s")

    seqs = [lib.add_sequence() for _ in range(BATCH)]
    prompts = [rng.integers(0, 1000, PROMPT_LEN).tolist() for _ in seqs]
    start = time.perf_counter()
    lib.prefill(seqs, prompts)
    for _ in range(GEN_LEN):
        lib.decode(seqs, rng.integers(0, 1000, BATCH).tolist())
    seconds = time.perf_counter() - start
    tokens = BATCH * (PROMPT_LEN + GEN_LEN)
    print(
        f"batch {BATCH}, {PROMPT_LEN} in / {GEN_LEN} out: {tokens / seconds:.1f} tok/s (prompt + generated), "
        f"{BATCH * GEN_LEN / seconds:.1f} generated tok/s; "
        f"model card (vLLM, H100): {MODEL_CARD_TOKENS_PER_S} tok/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("cuda", "webgpu"), default="cuda")
    target = parser.parse_args().target
    if target == "webgpu":
        from megrez_mlc.webgpu import open_adapter

        print(f"webgpu adapter: {open_adapter()}")
    with tempfile.TemporaryDirectory() as work:
        same = check_greedy_ids(Path(work), target)
    cache = megrez_home() / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    measure_speed(cache, target)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
