"""One prompt's generation, token by token: sample, stop at a stop token, a stop string or the budget, and
turn the tokens into final text.

Both drivers of the model share this: `Engine.run_requests` (a fixed batch, prefilled together and decoded
until all finish; `ChatSession` runs its turns through it) and the server's `Scheduler` (requests joining
and leaving a running batch). Each feeds a request the logits after its latest token and gets back one
`StreamDelta`. A request knows nothing of the KV cache: its driver holds the `Sequence` it runs in.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .grammar import GrammarMatcher
from .sampling import SamplingParams, TokenLogprob, sample_token, token_logprob
from .tokenizer import StreamingDetokenizer, Tokenizer


@dataclass
class GenerationStats:
    """Where one generation's time went: the prefill call(s) over its new prompt tokens, then one decode
    call per further token (model time; sampling and detokenization not included)."""

    prefill_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @staticmethod
    def _rate(tokens: int, seconds: float) -> float:
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def prefill_tokens_per_s(self) -> float:
        return self._rate(self.prefill_tokens, self.prefill_seconds)

    @property
    def decode_tokens_per_s(self) -> float:
        return self._rate(self.decode_tokens, self.decode_seconds)

    def __str__(self) -> str:
        return (
            f"prefill: {self.prefill_tokens} tok, {self.prefill_tokens_per_s:.1f} tok/s; "
            f"decode: {self.decode_tokens} tok, {self.decode_tokens_per_s:.1f} tok/s"
        )


@dataclass
class StreamDelta:
    """One step of a streamed generation: new final text, the token that produced it."""

    index: int  # which prompt of the batch
    text: str
    token_id: int | None
    finish_reason: str | None = None
    logprob: TokenLogprob | None = None  # of token_id, when the request asked for logprobs
    tool_call: str | None = None  # a function call's text, between its markers, when one ended here


@dataclass(frozen=True)
class CallMarkers:
    """The tokens a chat format writes around a function call (Megrez's <|function_start|>, ..._end|>)."""

    start: int
    end: int
    start_text: str  # how an unfinished call shows in the text


class StopStringMatcher:
    """Accumulates text, emits what can no longer be the start of a stop string, and cuts at a stop."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        self.text += delta
        # the earliest stop in the text wins (a delta of several tokens may hold more than one)
        found = [self.text.find(stop, max(0, self.emitted - len(stop))) for stop in self.stops]
        at = min((position for position in found if position != -1), default=-1)
        if at != -1:
            out, self.text = self.text[self.emitted : at], self.text[:at]
            self.emitted = at
            return out, True
        safe = len(self.text) - self._held_back()
        out = self.text[self.emitted : safe]
        self.emitted = max(self.emitted, safe)
        return out, False

    def _held_back(self) -> int:
        """Length of the longest text suffix that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def flush(self) -> str:
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out


@dataclass
class Request:
    """A prompt being completed: its settings, random state, text state and the tokens sampled so far."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int  # max_tokens, cut to the room one sequence leaves after the prompt
    rng: np.random.Generator
    detokenizer: StreamingDetokenizer
    stops: StopStringMatcher
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop token or string) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)
    matcher: GrammarMatcher | None = None  # the grammar's parse state, when the answer must match one
    call_markers: CallMarkers | None = None  # when function calls are parsed out of the answer
    call_ids: list[int] | None = None  # the tokens of a function call being written

    @classmethod
    def create(
        cls,
        prompt_ids: list[int],
        params: SamplingParams,
        tokenizer: Tokenizer,
        max_sequence_length: int,
        *,
        index: int = 0,
        seed: int | None = None,
        matcher: GrammarMatcher | None = None,
        call_markers: CallMarkers | None = None,
    ) -> Request:
        """A request for a prompt shorter than `max_sequence_length`, the most tokens its sequence may hold
        (`Engine.new_request` checks that)."""
        return cls(
            list(prompt_ids),
            params,
            min(params.max_tokens, max_sequence_length - len(prompt_ids)),
            np.random.default_rng(params.seed if seed is None else seed),
            StreamingDetokenizer(tokenizer),
            StopStringMatcher(params.stop),
            index=index,
            matcher=matcher,
            call_markers=call_markers,
        )

    def step(self, logits: np.ndarray) -> StreamDelta:
        """Sample the token after the latest one from its logits [vocab]; the delta says what became text.
        After a delta with a finish_reason the request takes no more steps."""
        p = self.params
        if len(self.output_ids) >= self.max_new_tokens:
            return self._finish("length", None)
        allowed = self.matcher.mask(logits) if self.matcher else logits
        token = sample_token(allowed, p, self.rng, (*self.prompt_ids, *self.output_ids))
        # A stop token ends the answer, unless ignore_eos; with a grammar only where the grammar allows it.
        if token in p.stop_token_ids and (self.matcher is not None or not p.ignore_eos):
            return self._finish("stop", None)
        self.output_ids.append(token)
        logprob = token_logprob(logits, token, p.top_logprobs) if p.logprobs else None
        if self.matcher:
            self.matcher.accept(token)
        text, call, stopped = self._text_of(token)
        if stopped or (self.matcher and self.matcher.finished):
            return self._finish("stop", token, text, logprob, call)
        if len(self.output_ids) >= self.max_new_tokens:
            return self._finish("length", token, text, logprob, call)
        return StreamDelta(self.index, text, token, logprob=logprob, tool_call=call)

    def _text_of(self, token: int) -> tuple[str, str | None, bool]:
        """What a new token adds: final text, a function call's text (when it ends one), and whether a stop
        string (or, without parallel calls, the end of a call) ends the answer."""
        markers = self.call_markers
        if markers and self.call_ids is not None:  # inside a call: its tokens are not the answer's text
            if token != markers.end:
                self.call_ids.append(token)
                return "", None, False
            call, self.call_ids = self.detokenizer.tokenizer.decode(self.call_ids), None
            return "", call, not self.params.parallel_tool_calls
        if markers and token == markers.start:
            # The text before the call is complete: what was held back (a stop string's start?) goes out.
            text, stopped = self.stops.feed(self.detokenizer.flush())
            if not stopped:
                self.call_ids = []
                text += self.stops.flush()
            return text, None, stopped
        text, stopped = self.stops.feed(self.detokenizer.put(token))
        return text, None, stopped

    def _finish(
        self,
        reason: str,
        token: int | None,
        text: str = "",
        logprob: TokenLogprob | None = None,
        call: str | None = None,
    ) -> StreamDelta:
        if self.call_ids is not None:  # a call cut off before its end marker is text, as the model wrote it
            markers = self.call_markers
            text += markers.start_text + self.detokenizer.tokenizer.decode(self.call_ids)  # type: ignore[union-attr]
            self.call_ids = None
        tail, stopped = self.stops.feed(self.detokenizer.flush())
        self.finish_reason = "stop" if stopped else reason
        return StreamDelta(
            self.index,
            text + tail + ("" if stopped else self.stops.flush()),
            token,
            self.finish_reason,
            logprob,
            call,
        )
