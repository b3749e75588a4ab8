"""`bench`: prefill and decode speed of a compiled model, as llama.cpp's llama-bench measures them.

Each run prefills `batch` random prompts of `prompt_len` tokens, then decodes `gen_len` tokens for all of
them together (greedy), timing the two phases apart. A first run warms caches and is not counted; the
median of the counted runs is reported.
"""

from __future__ import annotations

import resource
import statistics
import time
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import MegrezError
from .engine import Engine


@dataclass(frozen=True)
class BenchResult:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_ms: float  # time to first token: the prefill plus choosing the first token
    peak_rss_mb: float
    prompt_len: int
    gen_len: int
    batch: int
    threads: int
    runs: int

    def to_json(self) -> dict:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class _Run:
    prefill_s: float
    first_token_s: float
    decode_s: float


def _one_run(engine: Engine, prompts: list[list[int]], gen_len: int) -> _Run:
    with ExitStack() as stack:
        sequences = [stack.enter_context(engine.new_sequence()) for _ in prompts]
        start = time.perf_counter()
        logits = engine.prefill(sequences, prompts)
        prefilled = time.perf_counter()
        tokens = np.argmax(logits, axis=-1).tolist()
        first_token = time.perf_counter()
        for _ in range(gen_len - 1):
            tokens = np.argmax(engine.decode(sequences, tokens), axis=-1).tolist()
        done = time.perf_counter()
    return _Run(prefilled - start, first_token - start, done - first_token)


def run_bench(
    model_dir: Path,
    model_lib: Path,
    *,
    device: str = "cpu",
    prompt_len: int = 128,
    gen_len: int = 128,
    batch: int = 1,
    threads: int | None = None,
    runs: int = 3,
    seed: int = 0,
) -> BenchResult:
    if min(prompt_len, gen_len, batch, runs) < 1:
        raise MegrezError("--prompt-len, --gen-len, --batch and --runs must be at least 1")
    engine = Engine(
        model_dir,
        model_lib,
        device,
        max_batch_size=batch,
        max_total_seq_len=batch * (prompt_len + gen_len),
        threads=threads,
    )
    if prompt_len + gen_len > engine.context_window_size:
        raise MegrezError(
            f"--prompt-len + --gen-len = {prompt_len + gen_len} exceeds the library's context window "
            f"({engine.context_window_size}); compile with a larger --context-window-size"
        )
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, engine.vocab_size, prompt_len).tolist() for _ in range(batch)]
    _one_run(engine, prompts, min(gen_len, 4))  # warm-up: page in weights, start the thread pool
    measured = [_one_run(engine, prompts, gen_len) for _ in range(runs)]
    prefill_s = statistics.median(r.prefill_s for r in measured)
    first_token_s = statistics.median(r.first_token_s for r in measured)
    decode_s = statistics.median(r.decode_s for r in measured)
    decoded = batch * (gen_len - 1)  # the first token of each sequence comes from the prefill
    return BenchResult(
        prefill_tok_s=batch * prompt_len / prefill_s,
        decode_tok_s=decoded / decode_s if decoded else 0.0,
        ttft_ms=first_token_s * 1e3,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        prompt_len=prompt_len,
        gen_len=gen_len,
        batch=batch,
        threads=engine.threads,
        runs=runs,
    )
