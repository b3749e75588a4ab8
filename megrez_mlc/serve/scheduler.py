"""Continuous batching: one engine loop that owns the model and serves many requests at once.

Each turn of the loop
1. drops cancelled requests (their KV-cache pages are freed at once) and admits waiting ones, oldest first,
   while a sequence slot and KV-cache pages for their prompts are free;
2. prefills at most prefill_chunk_size prompt tokens, from as many sequences as fit in that chunk (a long
   prompt takes several turns, so the running requests keep decoding in between);
3. decodes every sequence whose prompt is in the cache, all together, with one batch_decode call.
A request that finishes leaves the batch in the turn it finishes; its sequence goes to the prefix cache
(prefix_cache.py), from which a later request that starts with the same tokens is forked, prefilling only
the rest. When the cache has no page for a step, cached sequences are evicted first; then the most
recently admitted request is preempted: its sequence is freed and it goes back to the front of the queue,
to be prefilled again with the tokens it has generated so far (its stream just continues, later).

The loop runs on its own thread, which loads the model: TVM's CPU thread pool belongs to the thread that
calls into TVM, and the KV cache is not thread-safe. Other threads only `submit` and `cancel`.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MegrezError
from ..runtime.engine import Engine
from ..runtime.request import Request, StreamDelta
from ..runtime.sampling import SamplingParams
from ..runtime.sequence import Sequence
from .metrics import ServerMetrics, render
from .prefix_cache import CachedSequence, PrefixCache, PrefixMatch

log = logging.getLogger("megrez_mlc")

# How long an idle loop sleeps before looking again (submit and cancel wake it at once anyway).
IDLE_WAIT_S = 1.0


class QueueFull(MegrezError):
    """Every sequence slot is busy and the waiting queue is full; try again in `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class Ticket:
    """A submitted request as the loop tracks it. `on_delta` is called on the loop thread for every delta
    (the last one has a finish_reason: "stop", "length", "cancelled" or "error"); it must not block."""

    request: Request
    on_delta: Callable[[StreamDelta], None]
    pending: list[int]  # tokens to write into the KV cache before the next token is sampled
    sequence: Sequence | None = None  # its KV-cache sequence while it is running
    decoding: bool = False  # the prompt is in the cache: `pending` is the one token sampled last
    cancelled: bool = False
    error: str | None = None  # why a request finished with "error"
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float = 0.0
    last_token_at: float = 0.0
    cached_tokens: int = 0  # prompt tokens found in the prefix cache, not prefilled
    deltas: list[StreamDelta] = field(default_factory=list)  # produced this turn, delivered at its end


class Scheduler:
    """Serves generation requests from one model with continuous batching (see the module docstring)."""

    def __init__(
        self,
        load: Callable[[], Engine],
        *,
        max_num_sequence: int,
        max_queue: int = 64,
        prefix_cache: int = 0,
    ) -> None:
        """`load` builds the Engine (on the loop's thread), with room for max_num_sequence + `prefix_cache`
        sequences: that many finished ones are kept for reuse (0: none)."""
        if max_num_sequence < 1:
            raise MegrezError(f"--max-num-sequence must be at least 1, got {max_num_sequence}")
        if max_queue < 0:
            raise MegrezError(f"--max-queue must be at least 0, got {max_queue}")
        if prefix_cache < 0:
            raise MegrezError(f"--prefix-cache must be at least 0, got {prefix_cache}")
        self.prefix_cache = PrefixCache(prefix_cache)
        self.max_num_sequence = max_num_sequence
        self.max_queue = max_queue
        self._load = load
        self._cond = threading.Condition()
        self._waiting: collections.deque[Ticket] = collections.deque()  # guarded by _cond
        self._running: list[Ticket] = []  # in admission order; changed by the loop, under _cond
        self._stopping = False
        self._ready = threading.Event()
        self._load_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="megrez-engine-loop", daemon=True)
        self._seconds_per_request = 0.0  # moving average, for Retry-After
        self._kv_snapshot: dict[str, int] = {}
        self._prefix_snapshot: dict[str, int] = {}
        self._counts: collections.Counter[str] = collections.Counter()  # finish reasons, and preemptions
        self._metrics = ServerMetrics()  # guarded by _cond
        self._total_pages = 0  # of the KV cache, counted when it is empty
        self.engine: Engine

    # --- life cycle (any thread) ---------------------------------------------------------------------------

    def start(self) -> Scheduler:
        """Start the loop thread and wait until it has loaded the model (its errors are raised here)."""
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            self._thread.join()
            raise self._load_error
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the loop: every unfinished request ends with "error" and its sequence is freed."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # --- requests (any thread) -----------------------------------------------------------------------------

    def submit(
        self, prompt_ids: list[int], params: SamplingParams, on_delta: Callable[[StreamDelta], None]
    ) -> Ticket:
        """Queue a request. Raises MegrezError for a prompt that cannot fit (PromptTooLong when it leaves no
        room for an answer), QueueFull when full."""
        request = self.engine.new_request(prompt_ids, params)
        ticket = Ticket(request, on_delta, list(request.prompt_ids))
        with self._cond:
            if self._stopping:
                raise MegrezError("the server is shutting down")
            free_slots = max(0, self.max_num_sequence - len(self._running))
            if len(self._waiting) >= self.max_queue + free_slots:
                raise QueueFull(
                    f"the server is busy: {len(self._running)} requests running and {len(self._waiting)} "
                    "waiting; retry later",
                    self._retry_after(),
                )
            self._waiting.append(ticket)
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a request (a client went away); its last delta has finish_reason "cancelled"."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify()

    def status(self) -> dict[str, Any]:
        """Requests running and waiting, and the KV cache's sequences and pages after the last turn."""
        with self._cond:
            return {
                "running": len(self._running),
                "waiting": len(self._waiting),
                "max_num_sequence": self.max_num_sequence,
                "context_window_size": self.engine.context_window_size,
                "max_single_sequence_length": self.engine.max_single_sequence_length,
                "kv_cache": dict(self._kv_snapshot),
                "prefix_cache": dict(self._prefix_snapshot),
                "requests": {
                    key: self._counts[key] for key in ("stop", "length", "cancelled", "error", "preempted")
                },
            }

    def metrics_text(self) -> str:
        """Prometheus' text format: counters, latency histograms, and the state `status` gives."""
        status = self.status()
        with self._cond:
            return render(self._metrics, status, self._total_pages)

    def _retry_after(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served max_num_sequence at a time."""
        ahead = len(self._waiting) + 1
        return max(1, min(60, math.ceil(self._seconds_per_request * ahead / self.max_num_sequence)))

    # --- the loop (its own thread) -------------------------------------------------------------------------

    def _main(self) -> None:
        try:
            self.engine = self._load()
            needed = self.max_num_sequence + self.prefix_cache.capacity
            if self.engine.max_sequences < needed:
                raise MegrezError(
                    f"the engine's KV cache holds {self.engine.max_sequences} sequences but serving "
                    f"{self.max_num_sequence} at once with {self.prefix_cache.capacity} cached takes {needed}"
                )
        except BaseException as err:  # handed to start(), which raises it in the caller's thread
            self._load_error = err
            self._ready.set()
            return
        self._total_pages = self.engine.free_pages()
        self._publish_kv()
        self._ready.set()
        while True:
            with self._cond:
                if not self._waiting and not self._running and not self._stopping:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stopping:
                    break
            try:
                self._turn()
            except Exception as err:  # a failed forward pass: fail the batch, keep serving the queue
                log.exception("engine step failed")
                self._fail_running(f"the engine failed: {err}")
        self._shutdown()

    def _turn(self) -> None:
        self._drop_cancelled()
        self._admit()
        for forward in (self._prefill_chunk, self._decode):
            touched = forward()
            self._publish_kv()  # before the deltas go out: a client that saw its answer end sees it freed
            for ticket in touched:
                self._deliver(ticket)

    def _drop_cancelled(self) -> None:
        with self._cond:
            gone = [t for t in self._waiting if t.cancelled]
            for ticket in gone:
                self._waiting.remove(ticket)
        gone += [t for t in self._running if t.cancelled]
        for ticket in gone:
            ticket.request.finish_reason = "cancelled"
            self._release(ticket)
            ticket.deltas.append(StreamDelta(0, "", None, "cancelled"))
            self._deliver(ticket)

    def _admit(self) -> None:
        """Oldest first (a big request is never overtaken for good): a free slot and the pages to prefill it
        plus one decode step, after the pages the running requests still need for theirs; cached sequences
        are evicted to make that room. A request starts from the longest prefix of its tokens in the cache."""
        reserved = sum(self._pages_for_next_step(t) for t in self._running)
        with self._cond:
            while self._waiting and len(self._running) < self.max_num_sequence:
                ticket = self._waiting[0]
                match = self._room_to_start(ticket, reserved)
                if match is None:
                    break
                reserved += self._pages_to_start(ticket, match)
                self._waiting.popleft()
                self._start(ticket, match)
                self._running.append(ticket)

    def _room_to_start(self, ticket: Ticket, reserved: int) -> PrefixMatch | None:
        """The prefix a waiting request starts from, once the free pages less `reserved` can start it
        (cached sequences evicted, least recently used first, the one it would fork from last; then it
        starts from the next best prefix, or none); None: it has to wait."""
        cache = self.prefix_cache
        while True:
            match = cache.match(ticket.pending, self._running_prefixes())
            if self._pages_to_start(ticket, match) <= self.engine.free_pages() - reserved:
                return match
            if not (cache.evict_oldest(keep=match.source) or cache.evict(match.source)):
                return None

    def _pages_to_start(self, ticket: Ticket, match: PrefixMatch) -> int:
        """Pages a waiting request takes for its prompt and one decode step: a fork starts with a copy of
        a partly filled page, a sequence taken over whole owns it already."""
        total = len(ticket.pending) + 1
        if match.adopt:
            return self.engine.pages_to_append([match.source], [total - match.length])  # type: ignore[list-item]
        return self.engine.pages_for(total, shared=match.length)

    def _start(self, ticket: Ticket, match: PrefixMatch) -> None:
        if match.length:
            ticket.sequence = self.prefix_cache.take(match)
            ticket.pending = ticket.pending[match.length :]
        else:
            ticket.sequence = self.engine.new_sequence()
        if not ticket.admitted_at:  # a request preempted and admitted again counts what it reused first
            self.prefix_cache.record(match)
            ticket.admitted_at = time.perf_counter()
            ticket.cached_tokens = match.length
            self._metrics.prompt_tokens += len(ticket.request.prompt_ids)
            self._metrics.cached_tokens += match.length

    def _running_prefixes(self) -> list[CachedSequence]:
        """What each running request's sequence holds: the first tokens of its prompt and answer."""
        prefixes = []
        for ticket in self._running:
            sequence, request = ticket.sequence, ticket.request
            if sequence is not None and sequence.length:
                tokens = (request.prompt_ids + request.output_ids)[: sequence.length]
                prefixes.append(CachedSequence(tokens, sequence))
        return prefixes

    def _make_room(self) -> None:
        """No page for the next pass: evict the least recently used cached sequence, else preempt."""
        if not self.prefix_cache.evict_oldest():
            self._preempt_newest()

    def _pages_for_next_step(self, ticket: Ticket) -> int:
        return self.engine.pages_to_append([ticket.sequence], [len(ticket.pending)])  # type: ignore[list-item]

    def _prefill_chunk(self) -> list[Ticket]:
        """One prefill call over up to prefill_chunk_size tokens of the prompts not yet in the cache."""
        engine = self.engine
        while True:
            budget, plan = engine.prefill_chunk_size, []
            for ticket in self._running:
                if not ticket.decoding and budget > 0:
                    plan.append((ticket, ticket.pending[:budget]))
                    budget -= len(plan[-1][1])
            if not plan:
                return []
            sequences = [t.sequence for t, _ in plan]
            if engine.pages_to_append(sequences, [len(p) for _, p in plan]) <= engine.free_pages():
                break
            self._make_room()
        logits = engine.prefill(sequences, [piece for _, piece in plan])
        done = []
        for (ticket, piece), row in zip(plan, logits):
            ticket.pending = ticket.pending[len(piece) :]
            if not ticket.pending:  # the whole prompt is in: its logits give the first new token
                self._step(ticket, row)
                done.append(ticket)
        return done

    def _decode(self) -> list[Ticket]:
        """One batch_decode call: every sequence whose prompt is in the cache gets its last token written."""
        engine = self.engine
        while True:
            batch = [t for t in self._running if t.decoding]
            if not batch:
                return []
            sequences = [t.sequence for t in batch]
            if engine.pages_to_append(sequences, [1] * len(batch)) <= engine.free_pages():
                break
            self._make_room()
        logits = engine.decode(sequences, [t.pending[0] for t in batch])
        for ticket, row in zip(batch, logits):
            self._step(ticket, row)
        return batch

    def _step(self, ticket: Ticket, logits: Any) -> None:
        delta = ticket.request.step(logits)
        ticket.deltas.append(delta)
        if delta.token_id is not None:
            now = time.perf_counter()
            with self._cond:
                metrics = self._metrics
                metrics.generated_tokens += 1
                if ticket.last_token_at:
                    metrics.time_per_output_token.observe(now - ticket.last_token_at)
                else:
                    metrics.time_to_first_token.observe(now - ticket.submitted_at)
            ticket.last_token_at = now
        if delta.finish_reason is not None:
            self._release(ticket)
            return
        ticket.decoding = True
        ticket.pending = [delta.token_id]  # type: ignore[list-item]  # an unfinished step samples a token

    def _preempt_newest(self) -> None:
        """Free the newest request's sequence and queue it first again (the oldest alone always fits: a
        request's prompt + answer is capped at the cache size)."""
        ticket = self._running[-1]
        if len(self._running) == 1:
            raise MegrezError("the KV cache cannot hold a single request; raise --max-total-seq-len")
        log.info("KV cache full: request preempted after %d tokens", len(ticket.request.output_ids))
        request = ticket.request
        self._free_sequence(ticket)
        ticket.pending = request.prompt_ids + request.output_ids
        ticket.decoding = False
        with self._cond:
            self._running.pop()
            self._waiting.appendleft(ticket)
            self._counts["preempted"] += 1

    def _release(self, ticket: Ticket) -> None:
        """Take a finished or cancelled request out of the batch: a finished one's sequence goes to the
        prefix cache, a cancelled one's pages are freed (its client is gone, and so, likely, its history)."""
        request = ticket.request
        if request.finish_reason in ("stop", "length") and ticket.sequence is not None:
            held = (request.prompt_ids + request.output_ids)[: ticket.sequence.length]
            self.prefix_cache.add(held, ticket.sequence)
            ticket.sequence = None
        self._free_sequence(ticket)
        with self._cond:
            if ticket in self._running:
                self._running.remove(ticket)
            self._counts[request.finish_reason or "error"] += 1
        if ticket.admitted_at:
            seconds = time.perf_counter() - ticket.admitted_at
            self._seconds_per_request = 0.8 * self._seconds_per_request + 0.2 * seconds

    @staticmethod
    def _free_sequence(ticket: Ticket) -> None:
        if ticket.sequence is not None:
            ticket.sequence.close()
            ticket.sequence = None

    def _deliver(self, ticket: Ticket) -> None:
        deltas, ticket.deltas = ticket.deltas, []
        for delta in deltas:
            try:
                ticket.on_delta(delta)
            except Exception:  # the receiver is gone (its event loop closed): nobody is listening
                ticket.cancelled = True

    def _publish_kv(self) -> None:
        snapshot = self.engine.kv_status()
        prefix = self.prefix_cache.counts()
        with self._cond:
            self._kv_snapshot, self._prefix_snapshot = snapshot, prefix

    def _fail_running(self, message: str) -> None:
        running = list(self._running)
        with self._cond:
            self._running.clear()
        for ticket in running:
            # A failed pass gave back the positions it had taken, so each sequence can simply be freed.
            self._free_sequence(ticket)
            self._fail(ticket, message)
        self._publish_kv()

    def _fail(self, ticket: Ticket, message: str) -> None:
        ticket.request.finish_reason = "error"
        ticket.error = message
        with self._cond:
            self._counts["error"] += 1
        ticket.deltas.append(StreamDelta(0, "", None, "error"))
        self._deliver(ticket)

    def _shutdown(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        self._fail_running("the server is shutting down")
        self.prefix_cache.clear()
        for ticket in waiting:
            self._fail(ticket, "the server is shutting down")
