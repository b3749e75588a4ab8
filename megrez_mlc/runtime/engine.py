"""`Engine`: load a converted model and its library, then generate text from prompts.

The hot loop reads top to bottom: prefill every prompt (chunked), then decode all unfinished sequences
together, one token each step, until each hits a stop token, a stop string or its token budget.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..conversation import Conversation
from ..errors import MegrezError
from ..quantize.gen_config import read_chat_config
from .model_lib import ModelLibrary
from .request import GenerationStats, Request, StreamDelta
from .sampling import SamplingParams
from .tokenizer import Tokenizer, check_text


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
        for message in messages:  # first, so an error counts characters of the message, not of the template
            check_text(message["content"], f"the {message['role']} message")
        return self.tokenizer.encode(self.conversation.render(messages))

    def chat_sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` plus the chat format's stop strings, for answers to prompts from encode_chat."""
        return dataclasses.replace(params, stop=[*self.conversation.stop_str, *params.stop])

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
        for delta in self.run_requests(requests):
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
                r = requests[delta.index]
                results[delta.index] = GenerationResult(
                    texts[delta.index], r.output_ids, len(r.prompt_ids), delta.finish_reason, r.stats
                )
        return results  # type: ignore[return-value]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Text deltas of one completion as they are decoded; the last one carries finish_reason."""
        yield from self.run_requests(self._make_requests([prompt], params))

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

    def _make_requests(self, prompts: list[str | list[int]], params: SamplingParams | None) -> list[Request]:
        params = params or self.default_sampling()
        return [self.new_request(prompt, params, index) for index, prompt in enumerate(prompts)]

    def new_request(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        index: int = 0,
        seq_id: int = -1,
        cached: int = 0,
    ) -> Request:
        """A request for `run_requests`; `seq_id`/`cached`: continue a KV sequence that already holds the
        first `cached` prompt tokens (ChatSession), else a new sequence is made and dropped after."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise MegrezError("the prompt is empty; give at least one token")
        if len(ids) >= self.context_window_size:
            raise MegrezError(
                f"the prompt has {len(ids)} tokens but the context window is {self.context_window_size}; "
                "shorten it or compile with a larger --context-window-size"
            )
        return Request.create(
            ids,
            params,
            self.tokenizer,
            self.context_window_size,
            index=index,
            seed=None if params.seed is None else params.seed + index,
            seq_id=seq_id,
            cached=cached,
        )

    def run_requests(self, requests: list[Request]) -> Iterator[StreamDelta]:
        """Prefill the requests together, then decode them together until each finishes."""
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
                    yield r.step(row)
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
