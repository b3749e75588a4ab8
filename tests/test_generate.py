"""Generation: greedy tokens identical to transformers, batching, sampling, stopping, the generate verb."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megrez_mlc.runtime import Engine, SamplingParams
from megrez_mlc.runtime.tokenizer import Tokenizer

from .conftest import reference_model, run_cli

GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


def transformers_greedy(model, prompt_ids: list[int], steps: int) -> list[int]:
    hf = reference_model(model.hf_dir, model.model_dir)
    tokens = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt_ids) :]


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
def test_cli_greedy_tokens_equal_transformers(built, quantization: str) -> None:
    model = built(quantization)
    prompt = "The quick brown fox 你好"
    # --repetition-penalty 1: plain greedy (the model's config recommends 1.02, which transformers'
    # argmax loop below does not apply)
    proc = run_cli(
        "generate",
        str(model.model_dir),
        "--model-lib",
        str(model.lib),
        "--prompt",
        prompt,
        "--raw",
        "--temperature",
        "0",
        "--repetition-penalty",
        "1",
        "--max-tokens",
        "32",
        "--ignore-eos",
        "--json",
    )
    out = json.loads(proc.stdout)
    prompt_ids = Tokenizer(model.model_dir).encode(prompt)
    assert out["token_ids"] == transformers_greedy(model, prompt_ids, 32)
    assert out["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 32}
    assert out["text"] == Tokenizer(model.model_dir).decode(out["token_ids"])


def test_cli_prompt_uses_the_chat_template(built) -> None:
    from transformers import AutoTokenizer

    model = built("q4f32_1")
    proc = run_cli(
        "generate",
        str(model.model_dir),
        "--model-lib",
        str(model.lib),
        "--prompt",
        "你好！",
        "--temperature",
        "0",
        "--max-tokens",
        "4",
        "--ignore-eos",
        "--json",
    )
    hf_tokenizer = AutoTokenizer.from_pretrained(model.hf_dir)
    expected = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "你好！"}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert json.loads(proc.stdout)["usage"]["prompt_tokens"] == len(expected)


@pytest.fixture(scope="module")
def engine(built) -> Engine:
    model = built("q4f32_1")
    return Engine(model.model_dir, model.lib, max_batch_size=4, prefill_chunk_size=16)


def test_batched_sequences_equal_each_alone(built) -> None:
    """Six sequences: more than the CPU runtime decodes one at a time, so batch_decode runs (and a few
    finish early, so later steps batch fewer)."""
    model = built("q4f32_1")
    engine = Engine(model.model_dir, model.lib, max_batch_size=8, prefill_chunk_size=16)
    prompts = [
        "hello world",
        "你好，世界！今天天气很好。我们一起去公园散步吧。",
        "The",
        "def main():",
        "A",
        "2024 3.14",
    ]
    together = engine.generate_batch(prompts, GREEDY_32)
    alone = [engine.generate(p, GREEDY_32) for p in prompts]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert engine.kv_status()["sequences"] == 0  # every sequence's KV pages were freed


def test_a_sequence_handle_decodes_as_generate_does(engine: Engine) -> None:
    prompt = engine.tokenizer.encode("Once upon a time")
    with engine.new_sequence() as seq:
        logits = seq.prefill(prompt)
        tokens = []
        for _ in range(8):
            tokens.append(int(logits.argmax()))
            logits = seq.decode(tokens[-1])
        assert seq.length == len(prompt) + 8
        seq.truncate(len(prompt) + 3)  # back to just after the third generated token was fed
        assert seq.length == len(prompt) + 3
        assert int(seq.decode(tokens[3]).argmax()) == tokens[4]
        assert engine.kv_status()["tokens"] == len(prompt) + 4
    status = engine.kv_status()
    assert seq.closed and (status["sequences"], status["tokens"]) == (0, 0)
    seq.close()  # closing again does nothing
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    assert tokens == engine.generate(prompt, greedy).token_ids


def test_seeded_sampling_is_reproducible_and_varies_with_seed(engine: Engine) -> None:
    def sample(seed: int) -> list[int]:
        params = SamplingParams(
            max_tokens=24, temperature=1.0, top_p=0.95, top_k=50, seed=seed, ignore_eos=True
        )
        return engine.generate("hello", params).token_ids

    assert sample(11) == sample(11)
    assert sample(11) != sample(12)


def test_top_k_1_and_tiny_top_p_are_greedy(engine: Engine) -> None:
    greedy = engine.generate("hello", GREEDY_32).token_ids
    top_k = SamplingParams(max_tokens=32, temperature=1.5, top_k=1, seed=0, ignore_eos=True)
    top_p = SamplingParams(max_tokens=32, temperature=1.5, top_p=1e-6, seed=0, ignore_eos=True)
    assert engine.generate("hello", top_k).token_ids == greedy
    assert engine.generate("hello", top_p).token_ids == greedy


def test_stop_token_ends_generation_without_emitting_it(engine: Engine) -> None:
    greedy = engine.generate("hello", GREEDY_32).token_ids
    stop_at = greedy[5]
    first = greedy.index(stop_at)
    result = engine.generate("hello", SamplingParams(max_tokens=32, temperature=0, stop_token_ids=[stop_at]))
    assert result.token_ids == greedy[:first]
    assert result.finish_reason == "stop"
    ignored = engine.generate(
        "hello", SamplingParams(max_tokens=32, temperature=0, stop_token_ids=[stop_at], ignore_eos=True)
    )
    assert ignored.token_ids == greedy and ignored.finish_reason == "length"


def test_stop_string_cuts_the_text(engine: Engine) -> None:
    full = engine.generate("hello", GREEDY_32)
    stop = full.text[7:10]
    cut = engine.generate("hello", SamplingParams(max_tokens=32, temperature=0, stop=[stop], ignore_eos=True))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(
        d.text
        for d in engine.stream(
            "hello", SamplingParams(max_tokens=32, temperature=0, stop=[stop], ignore_eos=True)
        )
    )
    assert streamed == cut.text


def test_repetition_penalty_changes_greedy_choice(engine: Engine) -> None:
    plain = engine.generate("hello", GREEDY_32).token_ids
    penalized = engine.generate(
        "hello", SamplingParams(max_tokens=32, temperature=0, repetition_penalty=5.0, ignore_eos=True)
    ).token_ids
    assert penalized != plain
    # a strong penalty makes repeats rarer than in the plain greedy run
    assert len(set(penalized)) > len(set(plain))


def test_max_tokens_and_context_window(engine: Engine) -> None:
    assert (
        len(engine.generate("hello", SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)).token_ids)
        == 5
    )
    window = engine.context_window_size
    long_prompt = np.random.default_rng(0).integers(0, 300, window - 3).tolist()
    result = engine.generate(long_prompt, SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    assert len(result.token_ids) == 3 and result.finish_reason == "length"
