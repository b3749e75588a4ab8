"""`megrez-mlc serve`'s prefix cache: a 10-turn chat through the openai client, with and without it.

    PYTHONPATH=$PWD python benchmarks/serve_turns.py [--turns 10] [--user-words 40] [--max-tokens 24]
        [--threads N] [--cache-dir DIR] [--model DIR --model-lib LIB]

The model is serve_load.py's (the full Megrez-3B shape, random weights, a full-vocabulary tokenizer). A chat
client re-sends the whole conversation each turn; each user message is `--user-words` English words (the
tokenizer's byte-level BPE part, about 3 tokens a word), each answer `--max-tokens` greedy tokens
(ignore_eos), streamed. Random weights answer in the tokenizer's filler words, which it splits into
several tokens when the history comes back as text, so each turn reuses the previous prompt but prefills
the previous answer again (a trained model's answers mostly come back as the same tokens). The same
conversation runs against a server started with `--prefix-cache 0` and one with the default, one after
the other; the table gives each turn's prompt length, the tokens the server reported reusing
(usage.prompt_tokens_details.cached_tokens), the time to the first token in both, and whether both gave
the same answer. Both get the same history: the second server's turns carry the first one's answers.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from serve_load import MODEL_NAME, cpu_name, free_port, prepare_fullsize, start_server

from megrez_mlc.home import megrez_home

SYSTEM = "You are a helpful assistant."


WORDS = (
    "the",
    "weather",
    "in",
    "city",
    "was",
    "cold",
    "and",
    "bright",
    "this",
    "morning",
    "while",
    "people",
    "walked",
    "to",
    "work",
    "along",
    "river",
    "past",
    "old",
    "houses",
    "small",
    "shops",
    "a",
    "market",
    "where",
    "farmers",
    "sold",
    "apples",
    "bread",
    "cheese",
    "fresh",
    "flowers",
)


def user_messages(turns: int, words: int) -> list[str]:
    """English words in a different order every turn."""
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "?" for _ in range(turns)]


def converse(
    url: str, messages: list[str], max_tokens: int, answers: list[str] | None = None
) -> list[tuple[int, int, float, str]]:
    """Per turn: prompt tokens, cached tokens, seconds to the first token, the answer. The history holds
    `answers` where given, else the server's own."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    history: list[dict[str, str]] = [{"role": "system", "content": SYSTEM}]
    turns = []
    for turn, message in enumerate(messages):
        history.append({"role": "user", "content": message})
        started, first, text, usage = time.perf_counter(), None, [], None
        stream = client.chat.completions.create(
            model=MODEL_NAME,
            messages=history,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text.append(chunk.choices[0].delta.content)
            usage = chunk.usage or usage
        answer = "".join(text)
        history.append({"role": "assistant", "content": answers[turn] if answers else answer})
        cached = usage.prompt_tokens_details.cached_tokens
        turns.append((usage.prompt_tokens, cached, (first or time.perf_counter()) - started, answer))
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--user-words", type=int, default=40, help="Words of each user message.")
    parser.add_argument("--max-tokens", type=int, default=24, help="Tokens of each answer.")
    parser.add_argument("--threads", type=int, default=None, help="The server's CPU threads.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="Default: $MEGREZ_MLC_HOME/bench.")
    parser.add_argument("--model", type=Path, default=None, help="Serve this converted model instead.")
    parser.add_argument("--model-lib", type=Path, default=None, help="Its library (with --model).")
    args = parser.parse_args()
    args.max_num_sequence, args.max_total_seq_len = 4, 8192

    if args.model:
        model_dir, lib = args.model, args.model_lib
    else:
        model_dir, lib = prepare_fullsize(args.cache_dir or megrez_home() / "bench")
    messages = user_messages(args.turns, args.user_words)
    runs = {}
    for name, options in (("without", ["--prefix-cache", "0"]), ("with", [])):
        port = free_port()
        log = Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_turns-{port}.log"
        print(f"server {name} the prefix cache (log: {log}) ...", flush=True)
        server = start_server(model_dir, lib, port, args, log, *options)
        try:
            earlier = [turn[3] for turn in runs["without"]] if runs else None
            runs[name] = converse(f"http://127.0.0.1:{port}", messages, args.max_tokens, earlier)
        finally:
            server.terminate()
            server.wait(30)

    threads = f"{args.threads} threads" if args.threads else "threads: physical cores"
    print(f"\n{cpu_name()}, {os.cpu_count()} logical CPUs, {threads}; {model_dir.name}")
    print(
        "| turn | prompt tokens | cached | TTFT without cache (s) | TTFT with cache (s) | speed-up | same |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for turn, (without, with_) in enumerate(zip(runs["without"], runs["with"]), 1):
        print(
            f"| {turn} | {with_[0]} | {with_[1]} | {without[2]:.2f} | {with_[2]:.2f} | "
            f"{without[2] / with_[2]:.1f}x | {'yes' if without[3] == with_[3] else 'no'} |"
        )
    total = [sum(t[2] for t in runs[name]) for name in ("without", "with")]
    print(f"| all | | | {total[0]:.1f} | {total[1]:.1f} | {total[0] / total[1]:.1f}x | |")


if __name__ == "__main__":
    main()
