"""Structured output's cost per token: llguidance's token mask over Megrez's 122,880-token vocabulary.

    PYTHONPATH=$PWD python benchmarks/grammar_mask.py [--repeats 5] [--corpus-mb 60] [--cache-dir DIR]

No Megrez tokenizer can be downloaded here, so the benchmark trains one of the same kind and size: a
byte-level BPE (the Qwen2-style pre-tokenizer of megrez_mlc.tiny) with 120,000 tokens, Megrez's special
tokens at their real ids (120000-120025, with the same gaps), and logits 122,880 wide. It learns from the
English/Chinese message catalogs under /usr/share/locale/zh_* (where the machine has them) and the Python
sources and documents of this interpreter's site-packages, up to --corpus-mb MB; the tokenizer is cached
under $MEGREZ_MLC_HOME/bench (or --cache-dir).

Three answers are decoded through the grammar as a model would write them (their BPE tokens, one at a
time): a JSON object in JSON mode, an answer to a JSON schema (enums, bounded numbers, arrays, Chinese
strings), and a forced tool call. Before each token the matcher computes the mask of allowed tokens
(`compute_bitmask`), the runtime applies it to the logits (`GrammarMatcher.mask`: unpack, -inf where not
allowed), the token is checked to be allowed and accepted. The table gives per-token times over
--repeats runs, plus the one-time costs: the vocabulary (once per model) and a grammar (once per
request).
"""

from __future__ import annotations

import argparse
import gettext
import json
import statistics
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))

import numpy as np  # noqa: E402
from serve_load import at_megrez_ids, cpu_name  # noqa: E402

from megrez_mlc.conversation import FUNCTION_CALL_MARKERS  # noqa: E402
from megrez_mlc.home import megrez_home  # noqa: E402
from megrez_mlc.runtime.grammar import Grammar, GrammarVocabulary  # noqa: E402
from megrez_mlc.runtime.tokenizer import Tokenizer  # noqa: E402
from megrez_mlc.serve.protocol import ChatCompletionRequest  # noqa: E402
from megrez_mlc.serve.tools import forced_call_grammar  # noqa: E402
from megrez_mlc.tiny import MEGREZ_SPECIAL_TOKENS, build_tokenizer  # noqa: E402

BPE_TOKENS = 120_000  # Megrez's special tokens start at 120000
VOCAB_SIZE = 122_880  # its logits' width
STOP_TOKENS = ("<|turn_end|>", "<|eos|>", "<|turn_end>")

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 40},
        "country": {"enum": ["中国", "France", "Japan", "Brazil"]},
        "population_millions": {"type": "number", "minimum": 0},
        "districts": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
        "capital": {"type": "boolean"},
    },
    "required": ["city", "country", "population_millions", "districts", "capital"],
    "additionalProperties": False,
}
SCHEMA_ANSWER = {
    "city": "上海",
    "country": "中国",
    "population_millions": 24.87,
    "districts": ["黄浦区", "徐汇区", "浦东新区", "静安区"],
    "capital": False,
}
JSON_MODE_ANSWER = {
    "title": "Weekly report 每周报告",
    "items": [
        {"id": 1, "task": "Convert the checkpoint to q4f16_1", "done": True, "hours": 2.5},
        {"id": 2, "task": "在手机上测试模型", "done": False, "hours": None},
    ],
    "summary": "Two tasks; one finished, one left for next week.",
}
WEATHER = {
    "name": "get_weather",
    "parameters": {
        "type": "object",
        "properties": {"location": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["location"],
    },
}
CALL_ARGUMENTS = {"location": "北京市海淀区", "unit": "celsius"}


@dataclass
class Case:
    label: str
    grammar: Grammar
    answer: str


def cases() -> list[Case]:
    start, end = FUNCTION_CALL_MARKERS
    forced = ChatCompletionRequest(
        model="megrez",
        messages=[{"role": "user", "content": "北京天气怎么样?"}],
        tools=[{"type": "function", "function": WEATHER}],
        tool_choice="required",
    )
    call = json.dumps({"name": WEATHER["name"], "arguments": CALL_ARGUMENTS}, ensure_ascii=False)
    json_mode = json.dumps(JSON_MODE_ANSWER, ensure_ascii=False, indent=2)
    return [
        Case("JSON mode", Grammar.json_object(), json_mode),
        Case("json_schema", Grammar.json_schema(SCHEMA), json.dumps(SCHEMA_ANSWER, ensure_ascii=False)),
        Case("forced tool call", forced_call_grammar(forced), f"{start}{call}{end}"),
    ]


def corpus(limit_chars: int) -> tuple[list[str], str]:
    """Training texts: the Chinese message catalogs' English and Chinese strings, then Python sources and
    documents up to `limit_chars` in all; and a line saying what went in."""
    catalog_texts = []
    for path in sorted(Path("/usr/share/locale").glob("zh_*/LC_MESSAGES/*.mo")):
        try:
            with path.open("rb") as file:
                catalog = gettext.GNUTranslations(file)._catalog
        except (OSError, ValueError):  # not a catalog, or not UTF-8
            continue
        catalog_texts += [text for pair in catalog.items() for text in pair if isinstance(text, str) and text]
    texts = list(catalog_texts)
    total = sum(map(len, texts))
    site = Path(sysconfig.get_paths()["purelib"])
    for path in sorted(site.rglob("*")):
        if total >= limit_chars:
            break
        if path.suffix in {".py", ".md", ".rst", ".txt"} and path.is_file():
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            texts.append(text)
            total += len(text)
    catalog_mb = sum(map(len, catalog_texts)) / 1e6
    return (
        texts,
        f"{catalog_mb:.1f}M characters of zh_* message catalogs, {total / 1e6 - catalog_mb:.1f}M of {site}",
    )


def megrez_sized_tokenizer(cache: Path, corpus_mb: float) -> Tokenizer:
    folder = cache / "grammar-tokenizer"
    if not (folder / "tokenizer.json").is_file():
        texts, what = corpus(int(corpus_mb * 1e6))
        print(f"training a {BPE_TOKENS}-token BPE on {what} ...", flush=True)
        started = time.perf_counter()
        data = at_megrez_ids(json.loads(build_tokenizer(BPE_TOKENS, texts).to_str()))
        if (learned := len(data["model"]["vocab"]) - len(MEGREZ_SPECIAL_TOKENS)) != BPE_TOKENS:
            sys.exit(f"error: the corpus gave only {learned} BPE tokens; raise --corpus-mb")
        partial = cache / "grammar-tokenizer.partial"
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
        partial.rename(folder)
        print(f"trained in {time.perf_counter() - started:.0f} s", flush=True)
    return Tokenizer(folder)


@dataclass
class Result:
    label: str
    tokens: int
    grammar_ms: list[float]  # building the request's matcher, per run
    bitmask_ms: list[float]  # llguidance alone, per token
    mask_ms: list[float]  # the runtime's whole step: bitmask, unpack, -inf where not allowed, per token


def decode_through(vocabulary: GrammarVocabulary, case: Case, tokens: list[int], repeats: int) -> Result:
    """Time the answer's tokens `repeats` times each way, on a fresh matcher each: llguidance's bitmask
    alone, then the runtime's whole mask step (what a constrained request pays per token)."""
    rng = np.random.default_rng(0)
    result = Result(case.label, len(tokens), [], [], [])
    for _ in range(repeats):
        matcher = vocabulary.matcher(case.grammar)
        for token in tokens:
            started = time.perf_counter()
            matcher._matcher.compute_bitmask()
            result.bitmask_ms.append((time.perf_counter() - started) * 1e3)
            matcher.accept(token)
        started = time.perf_counter()
        matcher = vocabulary.matcher(case.grammar)
        result.grammar_ms.append((time.perf_counter() - started) * 1e3)
        for token in tokens:
            logits = rng.standard_normal(VOCAB_SIZE, dtype=np.float32)
            started = time.perf_counter()
            masked = matcher.mask(logits)
            result.mask_ms.append((time.perf_counter() - started) * 1e3)
            if not np.isfinite(masked[token]):
                sys.exit(f"error: {case.label}: the grammar refused token {token} of the answer")
            matcher.accept(token)
    return result


def print_table(results: list[Result], vocabulary_s: float, args: argparse.Namespace) -> None:
    print(f"\nllguidance token masks, vocabulary {VOCAB_SIZE} ({BPE_TOKENS} BPE tokens + Megrez's specials)")
    print(f"machine: {cpu_name()}; one thread; {args.repeats} runs per answer")
    print(f"vocabulary (once per model, on the first constrained request): {vocabulary_s:.2f} s")
    print("| answer | tokens | grammar, per request | bitmask p50/p90/max/mean | whole step p50/mean |")
    print("| --- | --- | --- | --- | --- |")
    for r in results:
        b = r.bitmask_ms
        bitmask = (
            f"{percentile(b, 50):.3f} / {percentile(b, 90):.3f} / {max(b):.3f} / {statistics.fmean(b):.3f}"
        )
        print(
            f"| {r.label} | {r.tokens} | {statistics.median(r.grammar_ms):.2f} ms | {bitmask} ms "
            f"| {percentile(r.mask_ms, 50):.3f} / {statistics.fmean(r.mask_ms):.3f} ms |"
        )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--corpus-mb", type=float, default=60.0)
    parser.add_argument("--cache-dir", type=Path, default=megrez_home() / "bench")
    args = parser.parse_args()

    tokenizer = megrez_sized_tokenizer(args.cache_dir, args.corpus_mb)
    started = time.perf_counter()
    stops = [tokenizer.token_to_id(token) for token in STOP_TOKENS]
    vocabulary = GrammarVocabulary(tokenizer, VOCAB_SIZE, stops)
    vocabulary_s = time.perf_counter() - started
    results = [
        decode_through(vocabulary, case, tokenizer.encode(case.answer), args.repeats) for case in cases()
    ]
    print_table(results, vocabulary_s, args)


if __name__ == "__main__":
    main()
