"""The server's continuous-batching loop over the fake engine (tests/unit/conftest.py): admission, preemption,
cancellation, a failed step and the prompt check, with exact page accounting and no TVM."""

from __future__ import annotations

import threading

import pytest

from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime.engine import PromptTooLong
from megrez_mlc.runtime.request import StreamDelta
from megrez_mlc.serve.scheduler import Scheduler

from ..conftest import Collector

TIMEOUT_S = 10.0


def serve(
    engine, prompts: list[list[int]], params, *, max_num_sequence: int
) -> tuple[Scheduler, list[Collector]]:
    """Submit every prompt to a scheduler over `engine` and wait until each request has finished."""
    scheduler = Scheduler(lambda: engine, max_num_sequence=max_num_sequence).start()
    collectors = [Collector() for _ in prompts]
    try:
        for prompt, collector in zip(prompts, collectors):
            scheduler.submit(prompt, params, collector)
        for collector in collectors:
            assert collector.done.wait(TIMEOUT_S)
    finally:
        scheduler.stop()
    return scheduler, collectors


def alone(fake_engine, prompts: list[list[int]], params) -> list[list[int]]:
    reference = fake_engine(max_batch_size=1)
    return [reference.generate(prompt, params).token_ids for prompt in prompts]


def test_requests_beyond_the_free_slots_wait_and_each_answer_equals_a_run_alone(fake_engine) -> None:
    engine = fake_engine(max_batch_size=2, max_total_seq_len=512)
    params = engine.default_sampling(max_tokens=12, ignore_eos=True)
    prompts = [list(f"request {i}".encode()) for i in range(5)]
    scheduler, collectors = serve(engine, prompts, params, max_num_sequence=2)
    assert [c.token_ids for c in collectors] == alone(fake_engine, prompts, params)
    assert all(c.finish_reason == "length" for c in collectors)
    assert max(len(written) for _, written in engine.model.passes) <= 2
    status = scheduler.status()
    assert status["requests"]["length"] == 5 and status["requests"]["preempted"] == 0
    assert status["kv_cache"] == {
        "sequences": 0,
        "tokens": 0,
        "free_pages": 512 // 16 + 1,
        "max_total_seq_len": 512,
    }


def test_a_full_cache_preempts_the_newest_which_resumes_with_what_it_generated(fake_engine) -> None:
    """A 64-token cache has 5 pages; three requests of 10 + 40 tokens need 4 each at the end, so the newest
    are preempted and prefilled again later with prompt + answer so far."""
    engine = fake_engine(max_batch_size=3, max_total_seq_len=64, prefill_chunk_size=128)
    params = engine.default_sampling(max_tokens=40, ignore_eos=True)
    prompts = [list(f"prompt {i}:x".encode()) for i in range(3)]
    scheduler, collectors = serve(engine, prompts, params, max_num_sequence=3)
    expected = alone(fake_engine, prompts, params)
    assert [c.token_ids for c in collectors] == expected
    assert scheduler.status()["requests"]["preempted"] > 0
    resumed = [
        tokens
        for kind, written in engine.model.passes
        if kind == "prefill"
        for tokens in written.values()
        if len(tokens) > 10
    ]
    assert resumed and all(
        any(tokens == (p + e)[: len(tokens)] for p, e in zip(prompts, expected)) for tokens in resumed
    )


def test_the_oldest_waiting_request_is_admitted_first_even_when_a_newer_one_would_fit(fake_engine) -> None:
    """A (40 tokens) holds 3 of 5 pages; B (50) needs 4 and must wait for A; C (5) fits beside A but is newer
    than B, so it waits too."""
    engine = fake_engine(max_batch_size=3, max_total_seq_len=64, prefill_chunk_size=64)
    params = engine.default_sampling(max_tokens=8, ignore_eos=True)
    prompts = [[ord("A")] * 40, [ord("B")] * 50, [ord("C")] * 5]
    scheduler, collectors = serve(engine, prompts, params, max_num_sequence=3)
    assert [c.token_ids for c in collectors] == alone(fake_engine, prompts, params)
    first_prefill = {
        tokens[0]: i
        for i, (kind, written) in reversed(list(enumerate(engine.model.passes)))
        if kind == "prefill"
        for tokens in written.values()
    }
    assert first_prefill[ord("A")] < first_prefill[ord("B")] <= first_prefill[ord("C")]
    assert scheduler.status()["requests"]["preempted"] == 0


def test_a_cancelled_request_frees_its_sequence_at_once(fake_engine) -> None:
    engine = fake_engine(max_batch_size=1)
    scheduler = Scheduler(lambda: engine, max_num_sequence=1).start()
    collector, first, go_on = Collector(), threading.Event(), threading.Event()

    def hold_after_the_first_delta(delta: StreamDelta) -> None:
        collector(delta)
        if len(collector.deltas) == 1:
            first.set()
            assert go_on.wait(TIMEOUT_S)  # the loop waits here until the request is cancelled

    try:
        params = engine.default_sampling(max_tokens=400, ignore_eos=True)
        ticket = scheduler.submit([1, 2, 3], params, hold_after_the_first_delta)
        assert first.wait(TIMEOUT_S)
        scheduler.cancel(ticket)
        go_on.set()
        assert collector.done.wait(TIMEOUT_S)
        # the turn in flight may still decode one more token; then the request leaves at once
        assert collector.finish_reason == "cancelled" and len(collector.token_ids) <= 2
        status = scheduler.status()
        assert status["kv_cache"]["sequences"] == 0 and status["requests"]["cancelled"] == 1
    finally:
        go_on.set()
        scheduler.stop()


def test_a_failed_step_fails_the_running_requests_and_the_loop_serves_on(fake_engine) -> None:
    engine = fake_engine(max_batch_size=2)
    params = engine.default_sampling(max_tokens=6, ignore_eos=True)
    engine.model.fail_after(2, RuntimeError("kernel exploded"))
    scheduler = Scheduler(lambda: engine, max_num_sequence=2).start()
    try:
        failed = Collector()
        ticket = scheduler.submit([7, 8, 9], params, failed)
        assert failed.done.wait(TIMEOUT_S)
        assert failed.finish_reason == "error" and ticket.error == "the engine failed: kernel exploded"
        assert engine.kv_status()["sequences"] == 0
        served = Collector()
        scheduler.submit([7, 8, 9], params, served)
        assert served.done.wait(TIMEOUT_S)
        assert served.token_ids == alone(fake_engine, [[7, 8, 9]], params)[0]
        assert scheduler.status()["requests"]["error"] == 1
    finally:
        scheduler.stop()


def test_prompts_that_cannot_fit_one_sequence_are_refused(fake_engine) -> None:
    engine = fake_engine(max_batch_size=1, context_window_size=512, max_total_seq_len=100)
    scheduler = Scheduler(lambda: engine, max_num_sequence=1).start()
    try:
        params = engine.default_sampling(max_tokens=4)
        # the KV cache (100 tokens) is smaller than the context window (512): it bounds a request
        with pytest.raises(
            PromptTooLong, match=r"^the prompt has 100 tokens but the KV cache holds 100 tokens"
        ):
            scheduler.submit([5] * 100, params, Collector())
        with pytest.raises(MegrezError, match="outside"):
            scheduler.submit([5, 10**6], params, Collector())
        with pytest.raises(MegrezError, match="empty"):
            scheduler.submit([], params, Collector())
        collector = Collector()
        scheduler.submit([5] * 99, params, collector)  # the longest that fits: room for one token
        assert collector.done.wait(TIMEOUT_S)
        assert len(collector.token_ids) == 1 and collector.finish_reason == "length"
        assert scheduler.status()["max_single_sequence_length"] == 100
    finally:
        scheduler.stop()
    small_window = fake_engine(context_window_size=64, max_total_seq_len=256)
    with pytest.raises(PromptTooLong, match=r"^the prompt has 64 tokens but the context window is 64"):
        small_window.new_request([5] * 64, params)
