"""`ChatSession`: one conversation whose tokens stay in the KV cache from turn to turn.

A turn prefills only what is new since the cache was last written: the end of the previous answer, the
user's message and the generation prompt. Answers keep the token ids they were generated as (tokenizing
their text again can give other ids, and the model would then read something else than it wrote). The
cache always holds a prefix of the conversation's tokens: whatever changes the conversation (Ctrl-C in
the middle of an answer, a new system prompt, dropped turns, `load`) cuts it back to the longest prefix
that is still right, and the next turn prefills from there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import MegrezError
from .engine import Content, Engine, GenerationStats
from .media import count_clips
from .sampling import SamplingParams
from .sequence import Sequence

log = logging.getLogger("megrez_mlc")


@dataclass
class ChatMessage:
    role: str
    content: Content  # text, or OpenAI-style content parts (text, images and audio)
    token_ids: list[int]  # the whole rendered message (role header, content, end of message)


class ChatSession:
    """A conversation with a Megrez engine that keeps its KV cache across turns.

    `send(text)` adds a user message and returns the answer's text deltas as a generator; the answer joins
    the history when the generator ends, is closed, or is interrupted (then with the tokens sampled so far).
    """

    def __init__(self, engine: Engine, system: str | None = None, **sampling: Any) -> None:
        self.engine = engine
        self.conversation = engine.conversation
        self.params: SamplingParams = engine.default_sampling(**sampling)
        self.system: str = self.conversation.system_message if system is None else system
        self.history: list[ChatMessage] = []
        self.stats = GenerationStats()  # of the last answer
        self.finish_reason: str | None = None  # of the last answer: "stop", "length" or "interrupted"
        self._sequence: Sequence | None = None  # the KV-cache sequence, made for the first answer
        self._cached: list[int] = []  # the tokens in that sequence: always a prefix of the conversation's
        encode = engine.tokenizer.encode
        # An answer's token_ids are generation_prompt_ids + the generated ids + answer_end_ids; Megrez renders
        # an assistant message with that same header, so a finished answer reads exactly as the template
        # renders it.
        head, tail = self.conversation.message_parts("assistant")
        if head != self.conversation.generation_prompt():
            raise MegrezError(
                f"conversation template {self.conversation.name!r} starts an assistant message differently "
                "from its generation prompt, so a chat session cannot keep answers as generated"
            )
        self.generation_prompt_ids = encode(head)
        self.answer_end_ids = encode(tail)

    # --- the conversation -------------------------------------------------------------------------------

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation as OpenAI-style messages, system message first."""
        return [{"role": "system", "content": self.system}] + [
            {"role": m.role, "content": m.content} for m in self.history
        ]

    def token_ids(self) -> list[int]:
        """The conversation's tokens as the model reads them (without a generation prompt)."""
        ids = self._encode("system", self.system)
        for message in self.history:
            ids += message.token_ids
        return ids

    @property
    def context_used(self) -> int:
        """Tokens of the conversation in the KV cache."""
        return len(self._cached)

    @property
    def cached_token_ids(self) -> list[int]:
        """The tokens in the KV cache: the first `context_used` of the conversation's (and of the prompt for
        the next answer), which the next answer does not prefill again."""
        return list(self._cached)

    def add_message(self, role: str, content: Content) -> None:
        self.history.append(ChatMessage(role, content, self._encode(role, content)))

    def load(self, messages: list[dict[str, str]]) -> None:
        """Replace the conversation (OpenAI-style messages). Assistant messages this session generated keep
        their token ids, so a conversation that only grew reuses the whole cache."""
        if not messages:
            raise MegrezError("the conversation is empty; give at least one message")
        try:
            pairs = [(m["role"], m["content"]) for m in messages]
        except (KeyError, TypeError):
            raise MegrezError('each message must be a dict with "role" and "content"') from None
        generated = {
            (m.role, m.content): m.token_ids
            for m in self.history
            if m.role == "assistant" and isinstance(m.content, str)
        }
        system = self.conversation.system_message
        if pairs[0][0] == "system":
            (_, system), *pairs = pairs
        self.system = system
        self.history = [
            ChatMessage(
                role,
                content,
                (generated.get((role, content)) if isinstance(content, str) else None)
                or self._encode(role, content),
            )
            for role, content in pairs
        ]

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation (keeping the system prompt unless a new one is given)."""
        self.history = []
        if system is not None:
            self.system = system

    def set_sampling(self, **settings: Any) -> SamplingParams:
        """Change sampling settings for the following answers (temperature=0.5, top_p=0.9, ...)."""
        try:
            self.params = dataclasses.replace(self.params, **settings)
        except TypeError as err:
            fields = ", ".join(f.name for f in dataclasses.fields(SamplingParams))
            raise MegrezError(f"{err}; sampling settings are: {fields}") from None
        return self.params

    # --- answering --------------------------------------------------------------------------------------

    def send(self, content: Content) -> Iterator[str]:
        """Add a user message (now) and stream the answer to it (as the generator is consumed). The content
        is text, or OpenAI-style parts with images (`{"type": "image_url", "image_url": {"url": PATH}}`)."""
        user_ids = self._encode("user", content)  # once: a new image is sliced and encoded here
        needed = len(self._encode("system", self.system) + user_ids)
        window = self.engine.max_single_sequence_length
        if needed + len(self.generation_prompt_ids) >= window:
            raise MegrezError(
                f"the message is too long: with the system prompt it takes {needed} tokens of the "
                f"{window}-token context window; shorten it"
            )
        self.history.append(ChatMessage("user", content, user_ids))
        return self.respond()

    def respond(self) -> Iterator[str]:
        """Stream an answer to the conversation as it stands; text deltas, never a broken character."""
        prompt = self._prompt_fitting_context()
        request = self.engine.new_request(prompt, self.engine.chat_sampling(self.params))
        if self._sequence is None:
            self._sequence = self.engine.new_sequence()
        sequence = self._sequence
        self._reuse_cache(sequence, prompt)
        deltas = self.engine.run_requests([request], [sequence])
        streamed = []
        try:
            for delta in deltas:
                streamed.append(delta.text)
                if delta.text:
                    yield delta.text
        finally:
            deltas.close()
            # Whatever stopped the answer, the sequence holds exactly the passes that completed (one that
            # Ctrl-C cut short undoes itself): the prompt and the answer's tokens that were fed back.
            self._cached = (request.prompt_ids + request.output_ids)[: sequence.length]
            self.finish_reason = request.finish_reason or "interrupted"
            # A stop string cuts the text inside a token, so a finished answer's text is what was streamed;
            # an interrupted one keeps every token sampled so far.
            text = (
                "".join(streamed)
                if request.finish_reason
                else self.engine.tokenizer.decode(request.output_ids)
            )
            ids = self.generation_prompt_ids + request.output_ids + self.answer_end_ids
            self.history.append(ChatMessage("assistant", text, ids))
            self.stats = request.stats

    def ask(self, content: Content) -> str:
        """`send` and wait: the whole answer."""
        return "".join(self.send(content))

    def close(self) -> None:
        """Free the session's KV-cache sequence (the conversation itself stays readable)."""
        if self._sequence is not None:
            self._sequence.close()
            self._sequence, self._cached = None, []

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals --------------------------------------------------------------------------------------

    def _encode(self, role: str, content: Content) -> list[int]:
        clips_before = sum(count_clips(message.content) for message in self.history)
        return self.engine.encode_message(role, content, clips_before=clips_before)

    def _prompt(self) -> list[int]:
        return self.token_ids() + self.generation_prompt_ids

    def _prompt_fitting_context(self) -> list[int]:
        """The prompt, after dropping the oldest turns (never the system prompt or the last turn) until it
        leaves room for an answer of max_tokens (at most half the context window)."""
        window = self.engine.max_single_sequence_length
        room = min(self.params.max_tokens, window // 2)
        prompt, dropped = self._prompt(), 0
        while len(prompt) + room > window and self._drop_oldest_turn():
            prompt, dropped = self._prompt(), dropped + 1
        if dropped:
            log.warning(
                "the conversation outgrew the %d-token context window: dropped the oldest %d turn%s",
                window,
                dropped,
                "" if dropped == 1 else "s",
            )
        return prompt

    def _drop_oldest_turn(self) -> bool:
        """Remove everything before the second user message; False when there is no earlier turn to drop."""
        users = [i for i, m in enumerate(self.history) if m.role == "user"]
        if len(users) < 2:
            return False
        del self.history[: users[1]]
        return True

    def _reuse_cache(self, sequence: Sequence, prompt: list[int]) -> None:
        """Cut the session's sequence back to its longest prefix shared with `prompt`."""
        keep = 0
        for cached, wanted in zip(self._cached, prompt):
            if cached != wanted:
                break
            keep += 1
        keep = min(keep, len(prompt) - 1)  # the last prompt token is always run, for its logits
        sequence.truncate(keep)
        self._cached = prompt[:keep]
