"""Choosing the next token from float32 logits: greedy, or temperature / top-k / top-p sampling."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np

from ..errors import MegrezError
from .grammar import Grammar


@dataclass(frozen=True)
class _Range:
    """The values a sampling setting may take: a number above `low` (or equal to it, if `low_included`), at
    most `high`, finite, and whole if `integer`."""

    low: float
    low_included: bool
    high: float | None = None
    integer: bool = False
    meaning: str = ""  # what a special value does, shown in the error

    def allows(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, Integral if self.integer else Real):
            return False
        # Comparisons with NaN are all False, so NaN fails here as well; ints are exact (a huge seed is fine).
        finite = isinstance(value, Integral) or math.isfinite(value)
        above = value >= self.low if self.low_included else value > self.low
        return finite and above and (self.high is None or value <= self.high)

    def describe(self) -> str:
        if self.high is not None:
            opening = "[" if self.low_included else "("
            text = f"must be in {opening}{self.low:g}, {self.high:g}]"
        else:
            kind = "an integer" if self.integer else "a finite number"
            text = f"must be {kind} {'>=' if self.low_included else '>'} {self.low:g}"
        return text + (f" ({self.meaning})" if self.meaning else "")


MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat

# The one definition of each setting's range: SamplingParams (the Python API, the server, chat's /set) and the
# CLI's options are checked against it.
SAMPLING_RANGES = {
    "max_tokens": _Range(1, True, integer=True),
    "temperature": _Range(0, True, meaning="0 = greedy"),
    "top_p": _Range(0, False, 1),
    "top_k": _Range(0, True, integer=True, meaning="0 = no top-k cut"),
    "repetition_penalty": _Range(0, False, meaning="1 = none"),
    "seed": _Range(0, True, integer=True),
    "top_logprobs": _Range(0, True, MAX_TOP_LOGPROBS, integer=True),
}


def sampling_problem(name: str, value: object) -> str | None:
    """What is wrong with `value` for the setting `name` ("must be ..., got ..."), None when it is fine or
    unset (the seed)."""
    if value is None and name == "seed":
        return None
    limits = SAMPLING_RANGES[name]
    return None if limits.allows(value) else f"{limits.describe()}, got {value!r}"


@dataclass
class SamplingParams:
    """Per-request generation settings (OpenAI / MLC names). temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False  # each sampled token's log-probability, and its `top_logprobs` likeliest rivals
    top_logprobs: int = 0
    grammar: Grammar | None = None  # what the answer must match (Grammar.json_schema(...)); it ends with it
    # The answer may call functions in the chat format's markers: each call's text comes apart from the
    # answer's text (StreamDelta.tool_call); without parallel calls the answer ends after the first.
    tool_calls: bool = False
    parallel_tool_calls: bool = True

    def __post_init__(self) -> None:
        for name in SAMPLING_RANGES:
            problem = sampling_problem(name, getattr(self, name))
            if problem:
                raise MegrezError(f"{name} {problem}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's natural-log probability under the model (its raw logits: before the repetition
    penalty, temperature and top-k/top-p), and the `top` likeliest tokens with theirs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: np.ndarray, token_id: int, top: int) -> TokenLogprob:
    """log_softmax(logits) at the token, and its `top` largest entries (ties: the lower id first)."""
    wide = logits.astype(np.float64)
    peak = wide.max()
    log_total = peak + math.log(np.exp(wide - peak).sum())
    best: tuple[tuple[int, float], ...] = ()
    if top:
        candidates = np.argpartition(-wide, top - 1)[:top] if top < wide.size else np.arange(wide.size)
        ranked = sorted(candidates.tolist(), key=lambda i: (-wide[i], i))
        best = tuple((i, float(wide[i] - log_total)) for i in ranked)
    return TokenLogprob(token_id, float(wide[token_id] - log_total), best)


def apply_repetition_penalty(logits: np.ndarray, seen: Iterable[int], penalty: float) -> np.ndarray:
    """CTRL-style penalty (as in transformers and MLC): seen tokens' logits divided (or, if negative,
    multiplied) by `penalty`."""
    if penalty == 1.0:
        return logits
    ids = np.fromiter(set(seen), dtype=np.int64)
    ids = ids[ids >= 0]  # media ids (an image's embedding rows in the prompt) are no vocabulary token
    if ids.size == 0:
        return logits
    logits = logits.copy()
    picked = logits[ids]
    logits[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def sample_token(
    logits: np.ndarray, params: SamplingParams, rng: np.random.Generator, seen: Iterable[int] = ()
) -> int:
    """The next token for one sequence's logits [vocab]."""
    logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        keep = order[: int(np.searchsorted(cumulative, params.top_p) + 1)]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    return int(rng.choice(probs.size, p=probs))
