"""`megrez-mlc serve` under load: throughput and latency at 1, 4 and 16 concurrent streaming clients.

    PYTHONPATH=$PWD python benchmarks/serve_load.py [--concurrency 1,4,16] [--requests-per-client 2]
        [--prompt-tokens 32] [--max-tokens 32] [--max-num-sequence 16] [--max-total-seq-len 4096]
        [--threads N] [--cache-dir DIR]
        [--model DIR --model-lib LIB]

By default it serves the full Megrez-3B shape: the random bf16 checkpoint of benchmarks/fullsize.py,
converted to q4f32_1 (cached under $MEGREZ_MLC_HOME/bench, or --cache-dir) and compiled for this CPU (on
every run, so the table shows the kernels of the tree it runs from).
That checkpoint has no tokenizer, so the benchmark gives it one covering the whole 122880-token vocabulary:
the tiny test tokenizer's byte-level BPE, then one filler word per remaining id and Megrez's special
tokens at their real ids, so every generated token streams as visible text.

The server runs as its own process (`megrez-mlc serve`, as a user starts it). Each client is a thread with
the `openai` package that sends its requests one after the other to /v1/completions: a prompt of
`--prompt-tokens` token ids, greedy, `--max-tokens` tokens every time (ignore_eos). Per request it
records the time to the first token, the gaps between tokens as they arrive, and the end-to-end time;
throughput is all generated tokens over the wall time of a level. Each level starts after a warm-up
request.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from fullsize import ensure_checkpoint  # noqa: E402

from megrez_mlc.home import megrez_home  # noqa: E402
from megrez_mlc.tiny import MEGREZ_SPECIAL_TOKENS, build_tokenizer  # noqa: E402

QUANTIZATION = "q4f32_1"
MODEL_NAME = "megrez-3b"
# Megrez's special tokens (tiny.MEGREZ_SPECIAL_TOKENS order) and their ids.
MEGREZ_SPECIAL_IDS = (
    120000, 120001, 120002, 120003, 120004, 120005, 120014, 120015, 120016,
    120020, 120021, 120022, 120023, 120024, 120025,
)  # fmt: skip


def at_megrez_ids(data: dict) -> dict:
    """tokenizer.json data with Megrez's special tokens moved to their real ids, in the model's vocabulary
    too (the tokenizers library keeps an added token's id only when the vocabulary has it there); the ids
    between them stay free."""
    vocab = {token: i for token, i in data["model"]["vocab"].items() if token not in MEGREZ_SPECIAL_TOKENS}
    special = dict(zip(MEGREZ_SPECIAL_TOKENS, MEGREZ_SPECIAL_IDS))
    data["model"]["vocab"] = vocab | special
    data["added_tokens"] = [
        {
            "id": special[token],
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for token in MEGREZ_SPECIAL_TOKENS
    ]
    return data


def full_vocab_tokenizer(vocab_size: int) -> str:
    """tokenizer.json: the tiny byte-level BPE, Megrez's special tokens at their real ids, filler words
    (`Ġw<id>`, " w<id>" as text) at every other id up to `vocab_size`."""
    data = at_megrez_ids(json.loads(build_tokenizer().to_str()))
    taken = set(data["model"]["vocab"].values())
    data["model"]["vocab"] |= {f"Ġw{i}": i for i in range(vocab_size) if i not in taken}
    return json.dumps(data, ensure_ascii=False)


def prepare_fullsize(cache: Path) -> tuple[Path, Path]:
    """The full-size model in q4f32_1 with the full-vocabulary tokenizer, and a freshly compiled library."""
    from megrez_mlc.compile.compiler import compile_model
    from megrez_mlc.quantize.convert import convert_weight
    from megrez_mlc.quantize.gen_config import gen_config

    checkpoint = ensure_checkpoint(cache)
    hf_view = cache / "serve-hf"  # the checkpoint's files (linked) plus the tokenizer
    model_dir = cache / f"serve-{QUANTIZATION}"
    lib = model_dir / f"megrez-{QUANTIZATION}-cpu.so"
    if not (hf_view / "tokenizer.json").is_file():
        hf_view.mkdir(parents=True, exist_ok=True)
        for path in checkpoint.iterdir():
            if not (hf_view / path.name).exists():
                (hf_view / path.name).symlink_to(path)
        vocab_size = json.loads((checkpoint / "config.json").read_text())["vocab_size"]
        (hf_view / "tokenizer.json").write_text(full_vocab_tokenizer(vocab_size), encoding="utf-8")
    if not (model_dir / "mlc-chat-config.json").is_file():
        print(f"converting to {QUANTIZATION} ...", flush=True)
        convert_weight(hf_view, model_dir, QUANTIZATION, force=True)
        gen_config(hf_view, model_dir, QUANTIZATION, force=True)
    # always compiled: a cached library would hide changes to the kernels
    result = compile_model(model_dir, "cpu", lib)
    print(f"compiled {lib.name} in {result.seconds:.1f} s", flush=True)
    return model_dir, lib


@dataclass
class Timing:
    ttft_s: float
    e2e_s: float
    token_gaps_s: list[float]
    completion_tokens: int
    prompt_tokens: int


@dataclass
class Level:
    concurrency: int
    wall_s: float
    timings: list[Timing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, lib: Path, port: int, args: argparse.Namespace, log: Path, *options: str
) -> subprocess.Popen:
    command = [sys.executable, "-m", "megrez_mlc", "serve", str(model_dir), "--model-lib", str(lib)]
    command += ["--port", str(port), "--served-model-name", MODEL_NAME, *options]
    command += ["--max-num-sequence", str(args.max_num_sequence)]
    command += ["--max-total-seq-len", str(args.max_total_seq_len)]
    command += ["--threads", str(args.threads)] if args.threads else []
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ})
    import httpx

    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).raise_for_status()
            return proc
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                proc.kill()
                raise SystemExit(f"the server did not start:\n{log.read_text()}") from None
            time.sleep(0.5)


def one_request(client, index: int, args: argparse.Namespace) -> Timing:
    # Token ids: an exact prompt length whatever the tokenizer (ids past the tiny test vocabulary, so the
    # prompts of the full-size model are filler words; each request's differ).
    rng = np.random.default_rng(index + 1)
    prompt = rng.integers(*args.prompt_ids, size=args.prompt_tokens).tolist()
    start = time.perf_counter()
    arrivals, usage = [], None
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=args.max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices and chunk.choices[0].text:
            arrivals.append(time.perf_counter())
    end = time.perf_counter()
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    return Timing(arrivals[0] - start, end - start, gaps, usage.completion_tokens, usage.prompt_tokens)


def run_level(url: str, concurrency: int, args: argparse.Namespace) -> Level:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    one_request(client, -1, args)  # warm-up
    level = Level(concurrency, 0.0)
    lock = threading.Lock()

    def worker(worker_index: int) -> None:
        for r in range(args.requests_per_client):
            try:
                timing = one_request(client, worker_index * args.requests_per_client + r, args)
                with lock:
                    level.timings.append(timing)
            except Exception as err:  # counted and shown, never hidden
                with lock:
                    level.errors.append(f"{type(err).__name__}: {err}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    level.wall_s = time.perf_counter() - start
    return level


def percentiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49], cuts[89], cuts[98]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def print_table(levels: list[Level], args: argparse.Namespace, prompt_tokens: int) -> None:
    print(
        f"\n{MODEL_NAME} ({args.model or 'full Megrez-3B shape, random weights'}), {QUANTIZATION}, "
        f"{cpu_name()}, {os.cpu_count()} CPUs; --max-num-sequence {args.max_num_sequence}, "
        f"--max-total-seq-len {args.max_total_seq_len}; "
        f"prompt {prompt_tokens} tokens, {args.max_tokens} generated tokens per "
        f"request (greedy, ignore_eos), {args.requests_per_client} requests per client\n"
    )
    print(
        "| clients | requests | output tok/s | TTFT p50 / p90 / p99 (s) | inter-token p50 / p90 / p99 (ms) "
        "| end-to-end p50 / p90 / p99 (s) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for level in levels:
        ttft = percentiles([t.ttft_s for t in level.timings])
        gaps = percentiles([g * 1000 for t in level.timings for g in t.token_gaps_s])
        e2e = percentiles([t.e2e_s for t in level.timings])
        tokens = sum(t.completion_tokens for t in level.timings)
        print(
            f"| {level.concurrency} | {len(level.timings)} | {tokens / level.wall_s:.1f} "
            f"| {ttft[0]:.2f} / {ttft[1]:.2f} / {ttft[2]:.2f} "
            f"| {gaps[0]:.0f} / {gaps[1]:.0f} / {gaps[2]:.0f} "
            f"| {e2e[0]:.1f} / {e2e[1]:.1f} / {e2e[2]:.1f} |"
        )
    for level in levels:
        for error in level.errors:
            print(f"error at {level.concurrency} clients: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", default="1,4,16", help="Client counts, comma-separated.")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=32, help="Prompt length (token ids).")
    parser.add_argument("--max-tokens", type=int, default=32, help="Tokens generated per request.")
    parser.add_argument("--max-num-sequence", type=int, default=16, help="The server's batch limit.")
    parser.add_argument(
        "--max-total-seq-len",
        type=int,
        default=4096,
        help="The server's KV cache in tokens (Megrez's 32k context window in float32 would take 5 GB).",
    )
    parser.add_argument("--threads", type=int, default=None, help="The server's CPU threads.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="Default: $MEGREZ_MLC_HOME/bench.")
    parser.add_argument("--model", type=Path, default=None, help="Serve this converted model instead.")
    parser.add_argument("--model-lib", type=Path, default=None, help="Its library (with --model).")
    args = parser.parse_args()

    if args.model:
        model_dir, lib = args.model, args.model_lib
    else:
        model_dir, lib = prepare_fullsize(args.cache_dir or megrez_home() / "bench")
    vocab_size = json.loads((model_dir / "mlc-chat-config.json").read_text())["vocab_size"]
    args.prompt_ids = (min(400, vocab_size // 2), min(100_000, vocab_size))
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_load-{port}.log"
    print(f"starting the server (log: {log}) ...", flush=True)
    started = time.perf_counter()
    server = start_server(model_dir, lib, port, args, log)
    print(f"server ready in {time.perf_counter() - started:.1f} s", flush=True)
    levels = []
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            print(f"{concurrency} concurrent clients ...", flush=True)
            levels.append(run_level(f"http://127.0.0.1:{port}", concurrency, args))
    finally:
        server.terminate()
        server.wait(30)
    prompt_tokens = levels[0].timings[0].prompt_tokens if levels and levels[0].timings else 0
    print_table(levels, args, prompt_tokens)


if __name__ == "__main__":
    main()
