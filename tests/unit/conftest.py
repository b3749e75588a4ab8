"""Shared fixtures of the unit tier: model-free tests (numpy and the tokenizer, nothing compiled)."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import numpy as np
import pytest

from megrez_mlc.conversation import megrez_template
from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime.engine import Engine
from megrez_mlc.runtime.model_lib import pages_for
from megrez_mlc.runtime.tokenizer import Tokenizer, check_text
from megrez_mlc.tiny import build_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """The tiny byte-level BPE with Megrez's special tokens (ids 300-314), trained once per session."""
    folder = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer().save(str(folder / "tokenizer.json"))
    return Tokenizer(folder)


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(unprintable)}


@pytest.fixture(scope="session")
def byte_token_ids(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """text -> one token per UTF-8 byte (the tokenizer's byte alphabet), so every multi-byte character is
    split across tokens."""
    chars = _gpt2_byte_chars()
    return lambda text: [tokenizer.token_to_id(chars[b]) for b in text.encode("utf-8")]


# --- the real Engine over a fake model: ChatSession and the server's Scheduler with nothing compiled -----

FAKE_VOCAB_SIZE = 256  # one token per UTF-8 byte
FAKE_STOP_ID = 0


def fake_next_token(tokens: list[int]) -> int:
    """The fake model's choice after `tokens`: a lowercase letter that depends on every token and its
    position, so a cache that holds other tokens than the conversation's gives another answer."""
    return ord("a") + sum((i + 1) * t for i, t in enumerate(tokens)) % 26


class ByteTokenizer:
    """The Tokenizer interface over UTF-8 bytes: one token per byte, so any text round-trips."""

    def encode(self, text: str) -> list[int]:
        check_text(text)
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i != FAKE_STOP_ID).decode("utf-8", errors="replace")


class FakeModel:
    """ModelLibrary's sequence and forward-pass interface, in plain Python: the "KV cache" keeps each
    sequence's tokens in pages of PAGE_SIZE tokens (one spare page, as TVM's cache has), and a pass returns
    one-hot logits at `fake_next_token` of the sequence's tokens. `passes` records what each forward pass
    appended: (kind, {seq_id: tokens})."""

    def __init__(
        self,
        *,
        context_window_size: int = 512,
        max_total_seq_len: int | None = None,
        max_batch_size: int = 4,
        prefill_chunk_size: int = 64,
    ) -> None:
        self.context_window_size = context_window_size
        self.max_total_seq_len = max_total_seq_len or context_window_size
        self.max_batch_size = max_batch_size
        self.max_sequences = max_batch_size
        self.prefill_chunk_size = prefill_chunk_size
        self.vocab_size = FAKE_VOCAB_SIZE
        self.threads = 1
        self.tokens: dict[int, list[int]] = {}
        self.passes: list[tuple[str, dict[int, list[int]]]] = []
        self._next_id = 0
        self._failure: tuple[int, BaseException] | None = None

    def fail_after(self, passes: int, error: BaseException) -> None:
        """The forward pass after `passes` more raises `error` and writes nothing (as a real pass cut short
        leaves its sequences)."""
        self._failure = (len(self.passes) + passes, error)

    @property
    def sequence_lengths(self) -> dict[int, int]:
        return {seq_id: len(tokens) for seq_id, tokens in self.tokens.items()}

    @property
    def num_sequences(self) -> int:
        return len(self.tokens)

    def add_sequence(self) -> int:
        if len(self.tokens) >= self.max_batch_size:
            raise MegrezError(f"the KV cache holds at most {self.max_batch_size} sequences at once")
        self._next_id += 1
        self.tokens[self._next_id] = []
        return self._next_id

    def remove_sequence(self, seq_id: int) -> None:
        del self.tokens[seq_id]

    def truncate_sequence(self, seq_id: int, length: int) -> None:
        del self.tokens[seq_id][length:]

    def cached_tokens(self) -> int:
        return sum(map(len, self.tokens.values()))

    def free_pages(self) -> int:
        used = sum(pages_for(len(tokens)) for tokens in self.tokens.values())
        return pages_for(self.max_total_seq_len) + 1 - used

    def pages_to_append(self, seq_ids: list[int], lengths: list[int]) -> int:
        return sum(
            pages_for(len(self.tokens[s]) + n) - pages_for(len(self.tokens[s]))
            for s, n in zip(seq_ids, lengths)
        )

    def prefill(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        return self._forward("prefill", seq_ids, token_lists)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> np.ndarray:
        return self._forward("decode", seq_ids, [[t] for t in token_ids])

    def _forward(self, kind: str, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        if self._failure is not None and self._failure[0] == len(self.passes):
            error, self._failure = self._failure[1], None
            raise error
        if self.pages_to_append(seq_ids, [len(t) for t in token_lists]) > self.free_pages():
            raise MegrezError("the KV cache is full")
        logits = np.zeros((len(seq_ids), FAKE_VOCAB_SIZE), dtype=np.float32)
        for row, seq_id, tokens in zip(logits, seq_ids, token_lists):
            self.tokens[seq_id] += tokens
            row[fake_next_token(self.tokens[seq_id])] = 1.0
        self.passes.append((kind, {s: list(t) for s, t in zip(seq_ids, token_lists)}))
        return logits


class FakeEngine(Engine):
    """The real Engine (sampling, the prompt check, the generation loop, sequence handles) over FakeModel,
    ByteTokenizer and Megrez's chat template: no files, nothing compiled."""

    def __init__(self, **model_args: int) -> None:  # loads nothing, unlike Engine's
        self.model = FakeModel(**model_args)
        self.tokenizer = ByteTokenizer()
        self.conversation = megrez_template(stop_token_ids=[FAKE_STOP_ID])
        # the fields of mlc-chat-config.json that the Engine reads after loading: greedy by default
        self.chat_config = SimpleNamespace(temperature=0.0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture
def fake_engine() -> type[FakeEngine]:
    """Makes FakeEngines: fake_engine(context_window_size=, max_total_seq_len=, max_batch_size=,
    prefill_chunk_size=)."""
    return FakeEngine
