"""`Engine`: load a converted model and its library, then generate text from prompts.

The hot loop reads top to bottom: prefill every prompt (chunked), then decode all unfinished sequences
together, one token each step, until each hits a stop token, a stop string or its token budget.

The Engine owns the KV cache: everything that drives the model (its own generation, `ChatSession`, the
server's `Scheduler`, bench) holds `Sequence` handles from `new_sequence`, runs them with `prefill` and
`decode`, and asks the Engine for free pages; every prompt passes the one check in `new_request`.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.chat_config import read_chat_config
from ..conversation import FUNCTION_CALL_MARKERS, Conversation
from ..errors import MegrezError
from .grammar import Grammar, GrammarMatcher, GrammarVocabulary
from .media import (
    LOCAL_ACCESS,
    AudioEncoder,
    EncodedAudio,
    EncodedImage,
    ImageEncoder,
    MediaAccess,
    MediaError,
    image_url_of,
    load_audio,
    load_image,
)
from .model_lib import PAGE_SIZE, ModelLibrary, pages_for
from .request import CallMarkers, GenerationStats, Request, StreamDelta
from .sampling import SamplingParams
from .sequence import Sequence
from .tokenizer import Tokenizer, check_text


class PromptTooLong(MegrezError):
    """The prompt leaves no room for an answer in one sequence (the context window, or a smaller KV cache)."""


# Where an image or clip goes in a rendered message before tokenization (U+FFFC, the object replacement
# character: removed from the text of messages that carry media, so only media make it).
MEDIA_MARKER = "\ufffc"
Content = str | list[dict[str, Any]]  # a message's content: text, or OpenAI's content parts


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
        max_sequences: int | None = None,
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
            max_sequences=max_sequences,
        )
        self.conversation = Conversation.from_json(self.chat_config.conv_template)
        self.image_encoder = self._image_encoder()
        self.audio_encoder = self._audio_encoder()
        self._grammar_vocabulary: GrammarVocabulary | None = None  # built on first use, under the lock
        self._grammar_lock = threading.Lock()

    # --- settings ------------------------------------------------------------------------------------------

    def default_sampling(self, **overrides: Any) -> SamplingParams:
        """The model's recommended settings (mlc-chat-config.json) and its chat stop tokens, overridden."""
        c = self.chat_config
        settings: dict[str, Any] = {
            "temperature": c.temperature,
            "top_p": c.top_p,
            "repetition_penalty": c.repetition_penalty,
            "stop_token_ids": list(self.conversation.stop_token_ids),
        }
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**settings)

    def _image_encoder(self) -> ImageEncoder | None:
        processor, vision = self.chat_config.image_processor, self.chat_config.model_config.vision
        if processor is None or vision is None or not self.model.has_image_embed:
            return None
        return ImageEncoder(self.model, vision, processor, self.tokenizer.encode(processor.row_separator))

    def _audio_encoder(self) -> AudioEncoder | None:
        processor = self.chat_config.audio_processor
        if processor is None or not self.model.has_audio_embed:
            return None
        return AudioEncoder(self.model, processor)

    def encode_chat(self, messages: list[dict[str, Any]], media: MediaAccess = LOCAL_ACCESS) -> list[int]:
        """The prompt for OpenAI-style messages: the chat template, ending with the generation prompt. A
        message's content is text or a list of parts (`{"type": "text", "text"}`, `{"type": "image_url",
        "image_url": {"url"}}` with a data: URI, a file:// URL or a path, as `media` allows, and
        `{"type": "input_audio", "input_audio": {"data": base64, "format"}}`)."""
        if not messages:
            raise MegrezError("the conversation is empty; give at least one message")
        rendered, encoded = [], []
        for message in messages:  # first, so an error counts characters of the message, not of the template
            clips = sum(isinstance(item, EncodedAudio) for item in encoded)
            text, message_media = self.content_text(message["role"], message["content"], media, clips)
            rendered.append({"role": message["role"], "content": text})
            encoded += message_media
        return self._tokenize_with_media(self.conversation.render(rendered), encoded)

    def encode_message(
        self, role: str, content: Content, media: MediaAccess = LOCAL_ACCESS, clips_before: int = 0
    ) -> list[int]:
        """One rendered message's tokens (role header, content with its media, end of message); its clips
        are numbered after the conversation's `clips_before`."""
        text, encoded = self.content_text(role, content, media, clips_before)
        return self._tokenize_with_media(self.conversation.render_message(role, text), encoded)

    def content_text(
        self, role: str, content: Content, media: MediaAccess, clips_before: int = 0
    ) -> tuple[str, list[EncodedImage | EncodedAudio]]:
        """A message's text with a MEDIA_MARKER for each image and clip, and those, encoded. As
        Megrez-3B-Omni was trained, an image is followed by a newline, a clip is "Audio N: " (N counts
        the conversation's clips) and a newline."""
        if isinstance(content, str):
            check_text(content, f"the {role} message")
            return content.replace(MEDIA_MARKER, ""), []
        if not isinstance(content, list):
            raise MegrezError(f"the {role} message's content must be a string or a list of content parts")
        texts, encoded = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                check_text(part["text"], f"the {role} message")
                texts.append(part["text"].replace(MEDIA_MARKER, ""))
            elif kind == "image_url":
                encoded.append(self.encode_image(load_image(image_url_of(part), media)))
                texts.append(MEDIA_MARKER + "\n")
            elif kind == "input_audio":
                clip = self.encode_audio(load_audio(part))
                processor = self.audio_encoder.processor
                clips_before += 1
                encoded.append(clip)
                texts.append(processor.label.format(index=clips_before) + MEDIA_MARKER + processor.separator)
            else:
                raise MegrezError(
                    f"the {role} message has a content part of type {kind!r}; use "
                    '"text", "image_url" or "input_audio" parts'
                )
        return "".join(texts), encoded

    def encode_image(self, image: Any) -> EncodedImage:
        """A Pillow image as its placeholder tokens (the embeddings' media ids included)."""
        if self.image_encoder is None:
            raise MediaError(
                "this model does not read images; use a Megrez-3B-Omni model converted and compiled by "
                "this version of megrez-mlc"
            )
        return self.image_encoder.encode(image)

    def encode_audio(self, samples: np.ndarray) -> EncodedAudio:
        """16 kHz mono samples as their placeholder tokens (the embeddings' media ids included)."""
        if self.audio_encoder is None:
            raise MediaError(
                "this model does not hear audio; use a Megrez-3B-Omni model converted and compiled by "
                "this version of megrez-mlc"
            )
        return self.audio_encoder.encode(samples)

    def _tokenize_with_media(self, text: str, encoded: list[EncodedImage | EncodedAudio]) -> list[int]:
        if not encoded:
            return self.tokenizer.encode(text)
        pieces = text.split(MEDIA_MARKER)
        ids = self.tokenizer.encode(pieces[0])
        for item, piece in zip(encoded, pieces[1:]):
            ids += item.prompt_ids + self.tokenizer.encode(piece)
        if len(ids) >= self.max_single_sequence_length:
            media_tokens = sum(len(item.prompt_ids) for item in encoded)
            clips = sum(isinstance(item, EncodedAudio) for item in encoded)
            raise PromptTooLong(
                f"too much media: the prompt's {len(encoded) - clips} image(s) and {clips} clip(s) take "
                f"{media_tokens} of its {len(ids)} tokens, and the model holds "
                f"{self.max_single_sequence_length}; send fewer or smaller images, or shorter clips"
            )
        return ids

    def chat_sampling(self, params: SamplingParams) -> SamplingParams:
        """`params` plus the chat format's stop strings, for answers to prompts from encode_chat."""
        return dataclasses.replace(params, stop=[*self.conversation.stop_str, *params.stop])

    @property
    def context_window_size(self) -> int:
        """The model's context window, as compiled."""
        return self.model.context_window_size

    @property
    def max_total_seq_len(self) -> int:
        """Tokens the KV cache holds, all sequences together."""
        return self.model.max_total_seq_len

    @property
    def max_single_sequence_length(self) -> int:
        """The longest prompt + answer of one sequence (MLC's name for it): the context window, or the KV
        cache when that is smaller."""
        return min(self.context_window_size, self.max_total_seq_len)

    @property
    def max_sequences(self) -> int:
        """Sequences the KV cache holds at once."""
        return self.model.max_sequences

    @property
    def prefill_chunk_size(self) -> int:
        return self.model.prefill_chunk_size

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @property
    def threads(self) -> int:
        return self.model.threads

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
        for delta in self._run_on_new_sequences(requests):
            texts[delta.index] += delta.text
            if delta.finish_reason is not None:
                r = requests[delta.index]
                results[delta.index] = GenerationResult(
                    texts[delta.index], r.output_ids, len(r.prompt_ids), delta.finish_reason, r.stats
                )
        return results  # type: ignore[return-value]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Text deltas of one completion as they are decoded; the last one carries finish_reason. The prompt
        is checked now; the generation runs as the iterator is consumed."""
        return self._run_on_new_sequences(self._make_requests([prompt], params))

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The whole answer to a conversation of OpenAI-style messages (see `stream_chat`)."""
        return "".join(self.stream_chat(messages, **sampling))

    def stream_chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """The answer to a conversation of OpenAI-style messages ({"role", "content"}; a first system message
        replaces the default one), as text deltas while it is decoded (never a broken character). Unset
        sampling settings take the model's. Each call starts from an empty KV cache; a `ChatSession` keeps
        it between turns. The messages are checked now, before the first delta is asked for."""
        params = self.chat_sampling(self.default_sampling(**sampling))
        return _texts(self.stream(self.encode_chat(messages), params))

    def _make_requests(self, prompts: list[str | list[int]], params: SamplingParams | None) -> list[Request]:
        params = params or self.default_sampling()
        return [self.new_request(prompt, params, index) for index, prompt in enumerate(prompts)]

    def new_request(self, prompt: str | list[int], params: SamplingParams, index: int = 0) -> Request:
        """A request for `run_requests`, after the one check every prompt passes (the Engine's, a chat
        session's and the server's alike): not empty, token ids of this model's vocabulary, and room for at
        least one new token in one sequence. Text is tokenized as is."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise MegrezError("the prompt is empty; give at least one token")
        if max(ids) >= self.vocab_size or any(t < 0 and not self.model.media.knows(t) for t in ids):
            raise MegrezError(
                f"the prompt has token ids outside [0, {self.vocab_size}), this model's vocabulary"
            )
        limit = self.max_single_sequence_length
        if len(ids) >= limit:
            if limit == self.context_window_size:
                bound = f"the context window is {limit}"
                remedy = "compile with a larger --context-window-size"
            else:
                bound = f"the KV cache holds {limit} tokens"
                remedy = "raise --max-total-seq-len"
            raise PromptTooLong(
                f"the prompt has {len(ids)} tokens but {bound}, which leaves no room for an answer; "
                f"shorten it or {remedy}"
            )
        return Request.create(
            ids,
            params,
            self.tokenizer,
            limit,
            index=index,
            seed=None if params.seed is None else params.seed + index,
            matcher=self.grammar_matcher(params.grammar) if params.grammar else None,
            call_markers=self.call_markers() if params.tool_calls else None,
        )

    def grammar_matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A parse state for `grammar` over this model's vocabulary (a GrammarError if it cannot be used).
        Safe from any thread; the first call builds the grammar engine's view of the tokenizer."""
        with self._grammar_lock:
            if self._grammar_vocabulary is None:
                self._grammar_vocabulary = GrammarVocabulary(
                    self.tokenizer, self.vocab_size, list(self.conversation.stop_token_ids)
                )
        return self._grammar_vocabulary.matcher(grammar)

    def call_markers(self) -> CallMarkers:
        """The tokens around a function call in answers (an error if this model's tokenizer lacks them)."""
        start, end = (self.tokenizer.token_to_id(marker) for marker in FUNCTION_CALL_MARKERS)
        if start is None or end is None:
            raise MegrezError(
                f"this model's tokenizer has no {' and '.join(FUNCTION_CALL_MARKERS)} tokens, so it cannot "
                "call functions; leave out tools"
            )
        return CallMarkers(start, end, FUNCTION_CALL_MARKERS[0])

    def run_requests(self, requests: list[Request], sequences: list[Sequence]) -> Iterator[StreamDelta]:
        """Generate requests[i] in sequences[i]: prefill each prompt after the tokens its sequence already
        holds (a chat's earlier turns: a prefix of the prompt, shorter than it), then decode them together
        until each finishes. One delta per request and step; the sequences stay open."""
        held = [seq.length for seq in sequences]
        start = time.perf_counter()
        logits = self.prefill(sequences, [r.prompt_ids[n:] for r, n in zip(requests, held)])
        elapsed = time.perf_counter() - start
        for r, n in zip(requests, held):
            r.stats.prefill_tokens, r.stats.prefill_seconds = len(r.prompt_ids) - n, elapsed
        active = list(zip(requests, sequences))
        while active:
            for (r, _), row in zip(active, logits):
                yield r.step(row)
            active = [(r, seq) for r, seq in active if r.finish_reason is None]
            if active:
                start = time.perf_counter()
                logits = self.decode([seq for _, seq in active], [r.output_ids[-1] for r, _ in active])
                elapsed = time.perf_counter() - start
                for r, _ in active:
                    r.stats.decode_tokens += 1
                    r.stats.decode_seconds += elapsed

    def _run_on_new_sequences(self, requests: list[Request]) -> Iterator[StreamDelta]:
        """run_requests in fresh sequences, freed when the generation ends or is abandoned."""
        with ExitStack() as sequences:
            yield from self.run_requests(
                requests, [sequences.enter_context(self.new_sequence()) for _ in requests]
            )

    # --- the KV cache: sequences and their pages -----------------------------------------------------------

    def new_sequence(self) -> Sequence:
        """An empty sequence in the KV cache (at most max_sequences at once, max_batch_size unless given);
        `close` it, or use it as a context manager, to free its pages."""
        return Sequence(self.model, self.model.add_sequence())

    def prefill(self, sequences: list[Sequence], token_lists: list[list[int]]) -> np.ndarray:
        """Append token_lists[i] to sequences[i], in rounds of at most prefill_chunk_size tokens in all;
        returns the logits [len(sequences), vocab] after each one's last token."""
        return self.model.prefill([seq.id for seq in sequences], token_lists)

    def decode(self, sequences: list[Sequence], token_ids: list[int]) -> np.ndarray:
        """Append token_ids[i] to sequences[i], in one step; returns the logits [len(sequences), vocab]."""
        return self.model.decode([seq.id for seq in sequences], token_ids)

    def free_pages(self) -> int:
        """KV-cache pages not holding any sequence's tokens."""
        return self.model.free_pages()

    def pages_to_append(self, sequences: list[Sequence], lengths: list[int]) -> int:
        """Free pages that appending lengths[i] tokens to sequences[i] takes: a page holds the tokens of one
        sequence only, so the cache can fill up before it holds max_total_seq_len tokens."""
        return self.model.pages_to_append([seq.id for seq in sequences], lengths)

    def pages_for(self, num_tokens: int, shared: int = 0) -> int:
        """Pages a new sequence of `num_tokens` tokens takes, when its first `shared` come from a fork (whose
        full pages it shares; a partly filled one is copied)."""
        return pages_for(num_tokens) - shared // PAGE_SIZE

    def kv_status(self) -> dict[str, int]:
        """The KV cache now: its sequences, the tokens they hold, free pages, and its size in tokens."""
        return {
            "sequences": self.model.num_sequences,
            "tokens": self.model.cached_tokens(),
            "free_pages": self.model.free_pages(),
            "max_total_seq_len": self.model.max_total_seq_len,
        }


def _texts(deltas: Iterator[StreamDelta]) -> Iterator[str]:
    """The non-empty texts of a stream's deltas; closing this closes (and so frees) the stream."""
    with closing(deltas):
        for delta in deltas:
            if delta.text:
                yield delta.text
