"""`Engine`: load a converted model and its library, then generate text from prompts.

The hot loop reads top to bottom: prefill every prompt (chunked), then decode all unfinished sequences
together, one token each step, until each hits a stop token, a stop string or its token budget.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..conversation import Conversation
from ..errors import MegrezError
from ..quantize.gen_config import read_chat_config
from .model_lib import ModelLibrary
from .sampling import SamplingParams, sample_token
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
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" (stop token or string) or "length"
    stats: GenerationStats = field(default_factory=GenerationStats)

    @property
    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": len(self.token_ids)}


@dataclass
class StreamDelta:
    """One step of a streamed generation: new final text, the token that produced it."""

    index: int  # which prompt of the batch
    text: str
    token_id: int | None
    finish_reason: str | None = None


class _StopStringMatcher:
    """Accumulates text, emits what can no longer be the start of a stop string, and cuts at a stop."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.emitted = 0

    def feed(self, delta: str) -> tuple[str, bool]:
        self.text += delta
        for stop in self.stops:
            at = self.text.find(stop, max(0, self.emitted - len(stop)))
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
class _Request:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    rng: np.random.Generator
    detokenizer: StreamingDetokenizer
    stops: _StopStringMatcher
    seq_id: int = -1  # -1: the run adds a sequence for it and removes it at the end
    cached: int = 0  # leading prompt tokens already in that sequence's KV cache (a chat's earlier turns)
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stats: GenerationStats = field(default_factory=GenerationStats)


class Engine:
    """A Megrez model ready to generate: weights and library loaded on a device, tokenizer, chat format."""

    def __init__(
        self,
        model_dir: str | Path,
        model_lib: str | Path,
        device: str = "cpu",
        *,
        max_batch_size: int = 8,
        max_total_seq_len: int | None = None,
        prefill_chunk_size: int | None = None,
        threads: int | None = None,
    ) -> None:
        self.model_dir, self.chat_config = read_chat_config(Path(model_dir))
        self.tokenizer = Tokenizer(self.model_dir)
        self.model = ModelLibrary(
            self.model_dir,
            Path(model_lib),
            device,
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            threads=threads,
        )
        self.conversation = Conversation.from_json(self.chat_config["conv_template"])

    # --- settings ------------------------------------------------------------------------------------------

    def default_sampling(self, **overrides: Any) -> SamplingParams:
        """The model's recommended settings (mlc-chat-config.json) and its chat stop tokens, overridden."""
        c = self.chat_config
        settings: dict[str, Any] = {
            "temperature": c.get("temperature", 0.7),
            "top_p": c.get("top_p", 0.9),
            "repetition_penalty": c.get("repetition_penalty", 1.0),
            "stop_token_ids": list(self.conversation.stop_token_ids),
        }
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**settings)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode(self.conversation.render(messages))

    @property
    def context_window_size(self) -> int:
        return self.model.context_window_size

    # --- generation ----------------------------------------------------------------------------------------

    def generate(self, prompt: str | list[int], params: SamplingParams | None = None) -> GenerationResult:
        """Complete one prompt (text is tokenized as is: no template, no BOS)."""
        return self.generate_batch([prompt], params)[0]

    def generate_batch(
        self, prompts: list[str | list[int]], params: SamplingParams | None = None
    ) -> list[GenerationResult]:
        """Complete several prompts together (batched prefill and decode)."""
        texts = [""] * len(prompts)
        results: list[GenerationResult | None] = [None] * len(prompts)
        requests = self._make_requests(prompts, params)
        for delta in self._run(requests):
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
                r = requests[delta.index]
                results[delta.index] = GenerationResult(
                    texts[delta.index], r.output_ids, len(r.prompt_ids), delta.finish_reason, r.stats
                )
        return results  # type: ignore[return-value]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Text deltas of one completion as they are decoded; the last one carries finish_reason."""
        yield from self._run(self._make_requests([prompt], params))

    def chat(
        self, messages: list[dict[str, str]], stream: bool = True, **sampling: Any
    ) -> Iterator[str] | str:
        """Answer a conversation of OpenAI-style messages ({"role", "content"}; a first system message
        replaces the default one): the reply's text deltas as they are decoded, or the whole reply with
        stream=False. Unset sampling settings take the model's. Each call starts from an empty KV cache;
        a `ChatSession` keeps it between turns."""
        from .chat import ChatSession

        session = ChatSession(self, **sampling)
        session.load(messages)

        def deltas() -> Iterator[str]:
            with session:
                yield from session.respond()

        return deltas() if stream else "".join(deltas())

    def _make_requests(self, prompts: list[str | list[int]], params: SamplingParams | None) -> list[_Request]:
        params = params or self.default_sampling()
        return [self._request(prompt, params, index) for index, prompt in enumerate(prompts)]

    def _request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        index: int = 0,
        seq_id: int = -1,
        cached: int = 0,
    ) -> _Request:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise MegrezError("the prompt is empty; give at least one token")
        if len(ids) >= self.context_window_size:
            raise MegrezError(
                f"the prompt has {len(ids)} tokens but the context window is {self.context_window_size}; "
                "shorten it or compile with a larger --context-window-size"
            )
        seed = None if params.seed is None else params.seed + index
        return _Request(
            index,
            ids,
            params,
            np.random.default_rng(seed),
            StreamingDetokenizer(self.tokenizer),
            _StopStringMatcher(params.stop),
            seq_id=seq_id,
            cached=cached,
        )

    def _run(self, requests: list[_Request]) -> Iterator[StreamDelta]:
        model = self.model
        owned = [r for r in requests if r.seq_id < 0]
        try:
            for r in owned:
                r.seq_id = model.add_sequence()
            start = time.perf_counter()
            logits = model.prefill([r.seq_id for r in requests], [r.prompt_ids[r.cached :] for r in requests])
            elapsed = time.perf_counter() - start
            for r in requests:
                r.stats.prefill_tokens, r.stats.prefill_seconds = len(r.prompt_ids) - r.cached, elapsed
            active = requests
            while active:
                for r, row in zip(active, logits):
                    yield self._step(r, row)
                active = [r for r in active if r.finish_reason is None]
                if active:
                    start = time.perf_counter()
                    logits = model.decode([r.seq_id for r in active], [r.output_ids[-1] for r in active])
                    elapsed = time.perf_counter() - start
                    for r in active:
                        r.stats.decode_tokens += 1
                        r.stats.decode_seconds += elapsed
        finally:
            for r in owned:
                if r.seq_id in model.sequence_lengths:
                    model.remove_sequence(r.seq_id)

    def _step(self, r: _Request, logits: np.ndarray) -> StreamDelta:
        """Sample one token for a request and turn it into a stream delta."""
        p = r.params
        budget = min(p.max_tokens, self.context_window_size - len(r.prompt_ids))
        if len(r.output_ids) >= budget:
            return self._finish(r, "length", None)
        token = sample_token(logits, p, r.rng, (*r.prompt_ids, *r.output_ids))
        if token in p.stop_token_ids and not p.ignore_eos:
            return self._finish(r, "stop", None)
        r.output_ids.append(token)
        text, stopped = r.stops.feed(r.detokenizer.put(token))
        if stopped:
            r.finish_reason = "stop"
            return StreamDelta(r.index, text, token, "stop")
        if len(r.output_ids) >= budget:
            return self._finish(r, "length", token, text)
        return StreamDelta(r.index, text, token)

    def _finish(self, r: _Request, reason: str, token: int | None, text: str = "") -> StreamDelta:
        tail, stopped = r.stops.feed(r.detokenizer.flush())
        r.finish_reason = "stop" if stopped else reason
        return StreamDelta(
            r.index, text + tail + ("" if stopped else r.stops.flush()), token, r.finish_reason
        )
