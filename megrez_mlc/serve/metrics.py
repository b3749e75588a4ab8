"""The server's counters and latency histograms, written in Prometheus' text format for `GET /metrics`.

The engine loop records into a `ServerMetrics` (under the scheduler's lock); `render` reads it together
with the scheduler's status (running and waiting requests, KV pages, the prefix cache).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

PREFIX = "megrez"
# Seconds. Time to first token spans a cached one-token prefill on a GPU to a long prompt on a phone's CPU.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
OUTCOMES = ("stop", "length", "cancelled", "error")


@dataclass
class Histogram:
    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


@dataclass
class ServerMetrics:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    cached_tokens: int = 0
    time_to_first_token: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS))
    time_per_output_token: Histogram = field(default_factory=lambda: Histogram(TOKEN_BUCKETS))


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf"
    return repr(float(value)) if isinstance(value, float) else str(value)


def _family(lines: list[str], name: str, kind: str, help_text: str) -> str:
    full = f"{PREFIX}_{name}"
    lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}"]
    return full


def _histogram(lines: list[str], name: str, help_text: str, histogram: Histogram) -> None:
    full = _family(lines, name, "histogram", help_text)
    cumulative = 0
    for bound, count in zip((*histogram.bounds, math.inf), histogram.counts):
        cumulative += count
        lines.append(f'{full}_bucket{{le="{_number(bound)}"}} {cumulative}')
    lines += [f"{full}_sum {_number(histogram.total)}", f"{full}_count {cumulative}"]


def render(metrics: ServerMetrics, status: dict[str, Any], total_pages: int) -> str:
    """The exposition text: `metrics` plus the scheduler's `status()`."""
    lines: list[str] = []
    full = _family(lines, "requests_total", "counter", "Requests finished, by outcome.")
    lines += [f'{full}{{outcome="{o}"}} {status["requests"][o]}' for o in OUTCOMES]
    full = _family(lines, "preemptions_total", "counter", "Running requests preempted for KV-cache pages.")
    lines.append(f"{full} {status['requests']['preempted']}")
    for name, value, help_text in (
        ("prompt_tokens_total", metrics.prompt_tokens, "Prompt tokens of admitted requests."),
        ("generation_tokens_total", metrics.generated_tokens, "Tokens generated."),
        ("cached_prompt_tokens_total", metrics.cached_tokens, "Prompt tokens taken from the prefix cache."),
    ):
        full = _family(lines, name, "counter", help_text)
        lines.append(f"{full} {value}")
    _histogram(
        lines,
        "time_to_first_token_seconds",
        "From a request's arrival to its first generated token.",
        metrics.time_to_first_token,
    )
    _histogram(
        lines,
        "time_per_output_token_seconds",
        "Between consecutive generated tokens of a request.",
        metrics.time_per_output_token,
    )
    prefix = status["prefix_cache"]
    free = status["kv_cache"]["free_pages"]
    for name, value, help_text in (
        ("running_requests", status["running"], "Requests in the running batch."),
        ("waiting_requests", status["waiting"], "Requests waiting for a sequence slot or KV pages."),
        ("kv_cache_used_pages", total_pages - free, "KV-cache pages holding tokens (prefix cache included)."),
        ("kv_cache_free_pages", free, "KV-cache pages holding nothing."),
        ("prefix_cache_sequences", prefix["sequences"], "Finished sequences kept for reuse."),
        (
            "prefix_cache_hit_rate",
            prefix["hits"] / prefix["lookups"] if prefix["lookups"] else 0.0,
            "Share of admitted requests that reused a cached or running prefix.",
        ),
    ):
        full = _family(lines, name, "gauge", help_text)
        lines.append(f"{full} {_number(value)}")
    return "\n".join(lines) + "\n"
