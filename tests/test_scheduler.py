"""The continuous-batching engine loop on its own (no HTTP): many requests through a small KV cache."""

from __future__ import annotations

import threading

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


def test_a_full_cache_preempts_and_every_answer_matches_the_engine_alone(model) -> None:
    """8 requests of up to 64 + 48 tokens need up to 7 pages of 16 tokens each; the cache has 17, so the
    newest requests are preempted and prefilled again later. Each answer still equals the same request run
    alone with the plain Engine, token for token."""
    reference = Engine(model.model_dir, model.lib, max_batch_size=1)
    params = reference.default_sampling(temperature=0.0, max_tokens=48, ignore_eos=True)
    prompts = [
        reference.tokenizer.encode(f"Hello {i}! " + "The quick brown fox. " * (i // 2)) for i in range(8)
    ]
    assert max(map(len, prompts)) <= 64
    alone = [reference.generate(prompt, params).token_ids for prompt in prompts]

    scheduler = Scheduler(
        lambda: Engine(model.model_dir, model.lib, max_batch_size=8, max_total_seq_len=256),
        max_num_sequence=8,
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
        assert status["kv_cache"]["sequences"] == 0
        assert status["kv_cache"]["free_pages"] == 256 // 16 + 1
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
