"""The continuous-batching engine loop on its own (no HTTP): many requests through a small KV cache."""

from __future__ import annotations

import threading
import time

import pytest

from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime import Engine
from megrez_mlc.runtime.engine import PromptTooLong
from megrez_mlc.serve.scheduler import Scheduler

from .conftest import Collector

TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def model(built):
    return built("q4f32_1")


@pytest.mark.parametrize("prefix_cache", [0, 3])
def test_a_full_cache_preempts_and_every_answer_matches_the_engine_alone(model, prefix_cache: int) -> None:
    """8 requests of up to 64 + 48 tokens need up to 7 pages of 16 tokens each; the cache has 17, so the
    newest requests are preempted and prefilled again later. Each answer still equals the same request run
    alone with the plain Engine, token for token. With a prefix cache the prompts' shared start ("Hello")
    may be forked from another request's sequence, and finished sequences are kept only while nobody needs
    their pages."""
    reference = Engine(model.model_dir, model.lib, max_batch_size=1)
    params = reference.default_sampling(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = [
        reference.tokenizer.encode(f"Hello {i}! " + "The quick brown fox. " * (i // 2)) for i in range(8)
    ]
    assert max(map(len, prompts)) <= 64
    alone = [reference.generate(prompt, params).token_ids for prompt in prompts]

    scheduler = Scheduler(
        lambda: Engine(
            model.model_dir,
            model.lib,
            max_batch_size=8,
            max_total_seq_len=256,
            max_sequences=8 + prefix_cache,
        ),
        max_num_sequence=8,
        prefix_cache=prefix_cache,
    ).start()
    try:
        collectors = [Collector() for _ in prompts]
        for prompt, collector in zip(prompts, collectors):
            scheduler.submit(prompt, params, collector)
        for collector in collectors:
            assert collector.done.wait(TIMEOUT_S)
        assert [c.token_ids for c in collectors] == alone
        assert all(c.deltas[-1].finish_reason == "length" for c in collectors)
        status = scheduler.status()
        assert status["requests"]["preempted"] > 0
        assert status["requests"]["length"] == 8
        assert status["kv_cache"]["sequences"] == status["prefix_cache"]["sequences"] <= prefix_cache
        if prefix_cache == 0:
            assert status["kv_cache"]["free_pages"] == 256 // 16 + 1
        scheduler.prefix_cache.clear()
        assert scheduler.engine.free_pages() == 256 // 16 + 1  # a shared page is freed with its last user
    finally:
        scheduler.stop()
    assert "megrez-engine-loop" not in [thread.name for thread in threading.enumerate()]  # stop() joined it


def test_prompts_that_cannot_fit_are_refused_with_numbers(model) -> None:
    scheduler = Scheduler(
        lambda: Engine(model.model_dir, model.lib, max_batch_size=2, max_total_seq_len=100),
        max_num_sequence=2,
    ).start()
    try:
        params = scheduler.engine.default_sampling(max_tokens=4)
        # The cache (100 tokens) is smaller than the context window (512): it bounds a request.
        with pytest.raises(PromptTooLong, match=r"^the prompt has 100 tokens but the KV cache holds 100 "):
            scheduler.submit([5] * 100, params, Collector())
        with pytest.raises(MegrezError, match="outside"):
            scheduler.submit([5, 10**6], params, Collector())
        with pytest.raises(MegrezError, match="empty"):
            scheduler.submit([], params, Collector())
        collector = Collector()
        scheduler.submit([5] * 99, params, collector)  # the longest that fits: room for one token
        assert collector.done.wait(TIMEOUT_S)
        assert len(collector.token_ids) <= 1 and collector.deltas[-1].finish_reason in ("stop", "length")
    finally:
        scheduler.stop()


def test_a_load_error_is_raised_by_start(model, tmp_path) -> None:
    scheduler = Scheduler(lambda: Engine(model.model_dir, tmp_path / "missing.so"), max_num_sequence=1)
    with pytest.raises(MegrezError, match=r"missing\.so not found"):
        scheduler.start()


def cached_scheduler(model, prefix_cache: int, max_total_seq_len: int = 512) -> Scheduler:
    return Scheduler(
        lambda: Engine(
            model.model_dir,
            model.lib,
            max_batch_size=2,
            max_total_seq_len=max_total_seq_len,
            max_sequences=2 + prefix_cache,
        ),
        max_num_sequence=2,
        prefix_cache=prefix_cache,
    ).start()


def run(scheduler: Scheduler, prompt_ids: list[int], params) -> tuple[list[int], int]:
    """The answer's tokens and the prompt tokens taken from the prefix cache."""
    collector = Collector()
    ticket = scheduler.submit(prompt_ids, params, collector)
    assert collector.done.wait(TIMEOUT_S)
    return collector.token_ids, ticket.cached_tokens


def test_a_conversations_next_turn_prefills_only_its_new_tokens(model) -> None:
    """Three turns of a chat, then a new chat with the same system prompt: each turn reuses at least all of
    the previous turn's prompt, and of its answer what the re-rendered history repeats token for token; the
    new chat shares only the system prompt's tokens (a fork of a cached sequence, partly filled page and
    all). Every answer equals the Engine's without any cache."""
    reference = Engine(model.model_dir, model.lib, max_batch_size=1)
    params = reference.chat_sampling(reference.default_sampling(temperature=0.0, max_tokens=12))
    system = {
        "role": "system",
        "content": "You answer in short sentences about the weather of big cities. " * 2,
    }
    scheduler = cached_scheduler(model, prefix_cache=2)
    try:
        history, held, previous_prompt = [system], [], []
        for turn, question in enumerate(["Hello there!", "And in Paris?", "What about Rome tomorrow?"]):
            history.append({"role": "user", "content": question})
            prompt = reference.encode_chat(history)
            expected = reference.generate(prompt, params)
            answer, cached = run(scheduler, prompt, params)
            assert answer == expected.token_ids, turn
            assert cached == prefix_length(prompt, held), turn
            assert cached >= len(previous_prompt), turn
            history.append({"role": "assistant", "content": expected.text})
            held = prompt + answer[:-1]  # the last sampled token was never written
            previous_prompt = prompt

        other = reference.encode_chat([system, {"role": "user", "content": "Is it cold in Oslo?"}])
        answer, cached = run(scheduler, other, params)
        assert answer == reference.generate(other, params).token_ids
        assert cached == prefix_length(other, prompt) and cached % 16 != 0
        assert scheduler.status()["prefix_cache"]["sequences"] == 2
    finally:
        scheduler.stop()


def test_a_continued_completion_takes_the_cached_sequence_over(model) -> None:
    """A raw completion that continues a finished one token for token (its prompt and answer, and more)
    extends that very sequence: no fork, no copy, one cached sequence afterwards."""
    reference = Engine(model.model_dir, model.lib, max_batch_size=1)
    params = reference.default_sampling(temperature=0.0, max_tokens=10, ignore_eos=True)
    scheduler = cached_scheduler(model, prefix_cache=2)
    try:
        prompt = reference.tokenizer.encode("Once upon a time, in a city by the sea,")
        previous: list[int] = []
        for turn in range(3):
            answer, cached = run(scheduler, prompt, params)
            assert answer == reference.generate(prompt, params).token_ids, turn
            assert cached == (0 if turn == 0 else len(previous) - 1), turn
            status = scheduler.status()["prefix_cache"]
            assert (status["sequences"], status["tokens"]) == (1, len(prompt) + len(answer) - 1), turn
            previous = prompt + answer
            prompt = previous + reference.tokenizer.encode(" and then")
        assert (status["lookups"], status["hits"]) == (3, 2)
    finally:
        scheduler.stop()


def prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_cached_sequences_make_room_before_anyone_waits(model) -> None:
    """A 96-token KV cache (7 pages): a cached 60-token sequence is evicted for an unrelated 60-token prompt
    rather than that request waiting, and a prompt that repeats all of a cached one leaves its last token to
    prefill (its logits give the first answer token)."""
    scheduler = cached_scheduler(model, prefix_cache=2, max_total_seq_len=96)
    try:
        params = scheduler.engine.default_sampling(temperature=0.0, max_tokens=4, ignore_eos=True)
        first = [7 + i % 50 for i in range(60)]
        run(scheduler, first, params)
        assert scheduler.status()["prefix_cache"]["sequences"] == 1
        second = [100 + i % 40 for i in range(60)]
        answer, cached = run(scheduler, second, params)
        assert cached == 0 and len(answer) == 4
        status = scheduler.status()
        assert status["prefix_cache"]["sequences"] == 1 and status["requests"]["preempted"] == 0
        assert status["prefix_cache"]["tokens"] == 63  # the second's 60 + 3 of its 4 answer tokens

        _, cached = run(scheduler, second, params)
        assert cached == 59
    finally:
        scheduler.stop()


def test_a_running_request_shares_its_prefix_with_a_new_one(model) -> None:
    """A request arriving while another with the same long start is decoding forks from the running
    sequence; both answer as the Engine does alone."""
    reference = Engine(model.model_dir, model.lib, max_batch_size=1)
    params = reference.default_sampling(temperature=0.0, max_tokens=16, ignore_eos=True)
    long_params = reference.default_sampling(temperature=0.0, max_tokens=300, ignore_eos=True)
    shared = reference.tokenizer.encode("A long shared instruction for every request. " * 4)
    prompts = [shared + reference.tokenizer.encode(f" Question {i}?") for i in range(2)]
    expected = [
        reference.generate(prompts[0], long_params).token_ids,
        reference.generate(prompts[1], params).token_ids,
    ]
    scheduler = cached_scheduler(model, prefix_cache=1)
    try:
        first = Collector()
        scheduler.submit(prompts[0], long_params, first)
        while not first.deltas:
            time.sleep(0.001)
        first_running = []
        second = Collector()
        second_ticket = scheduler.submit(
            prompts[1], params, lambda d: (first_running.append(not first.done.is_set()), second(d))
        )
        assert first.done.wait(TIMEOUT_S) and second.done.wait(TIMEOUT_S)
        assert first_running[0]  # the second request's first token came while the first was decoding
        assert second_ticket.cached_tokens == prefix_length(prompts[0], prompts[1]) >= len(shared) - 1
        assert [first.token_ids, second.token_ids] == expected
    finally:
        scheduler.stop()


def test_the_sequence_a_request_would_fork_from_is_evicted_when_only_that_makes_room(model) -> None:
    """A 96-token KV cache (7 pages) holding a finished 80-token sequence: a new 80-token request sharing
    its first 20 tokens cannot fork from it (the fork needs 5 pages of its own, 1 is free), so the cached
    sequence goes and the request starts afresh instead of waiting for ever."""
    reference = Engine(model.model_dir, model.lib, max_batch_size=1)
    scheduler = cached_scheduler(model, prefix_cache=1, max_total_seq_len=96)
    try:
        params = scheduler.engine.default_sampling(temperature=0.0, max_tokens=4, ignore_eos=True)
        shared = [7 + i % 50 for i in range(20)]
        first = shared + [100 + i % 40 for i in range(60)]
        run(scheduler, first, params)
        assert scheduler.status()["prefix_cache"]["sequences"] == 1
        second = shared + [150 + i % 30 for i in range(60)]
        answer, cached = run(scheduler, second, params)
        assert cached == 0 and answer == reference.generate(second, params).token_ids
        status = scheduler.status()
        assert status["requests"]["preempted"] == 0 and status["prefix_cache"]["sequences"] == 1
    finally:
        scheduler.stop()
