"""Streaming detokenization never emits a broken UTF-8 character, emits each character as soon as it is
whole, and its concatenated output equals the decode of all tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from megrez_mlc.runtime.tokenizer import REPLACEMENT_CHAR, StreamingDetokenizer, Tokenizer

TEXTS = (
    "你好，世界！😀🎉 无问芯穹发布了端侧大模型。",
    "Emoji 🚀👨‍👩‍👧 mixed with 中文 and English.",
    "人工智能🇨🇳",
)


@pytest.fixture(scope="module")
def tokenizer(tiny_hf: Path) -> Tokenizer:
    return Tokenizer(tiny_hf)


def gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet byte-level BPE vocabularies are written in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    unprintable = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(unprintable)}


def byte_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (the tokenizer's byte alphabet), so every multi-byte character is split."""
    chars = gpt2_byte_chars()
    return [tokenizer.token_to_id(chars[b]) for b in text.encode("utf-8")]


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    """What the detokenizer emits after each token, then the flush."""
    detokenizer = StreamingDetokenizer(tokenizer)
    return [detokenizer.put(i) for i in ids] + [detokenizer.flush()]


def check_stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    pieces = stream(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids)
    emitted = ""
    for k, piece in enumerate(pieces[:-1], start=1):
        emitted += piece
        # Exactly the whole characters so far: the decode of the first k tokens minus an unfinished tail.
        assert emitted == tokenizer.decode(ids[:k]).rstrip(REPLACEMENT_CHAR), (k, ids[:k])
    return pieces


@pytest.mark.parametrize("text", TEXTS)
def test_bpe_tokens_that_split_characters(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    split = [i for i in ids if REPLACEMENT_CHAR in tokenizer.decode([i])]
    assert len(split) >= 5  # the case under test: tokens holding part of a character
    pieces = check_stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    assert "".join(pieces) == text
    assert "" in pieces  # bytes were held back at least once


@pytest.mark.parametrize("text", TEXTS)
def test_one_token_per_byte(tokenizer: Tokenizer, text: str) -> None:
    ids = byte_token_ids(tokenizer, text)
    assert len(ids) == len(text.encode("utf-8"))
    pieces = check_stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    # each character appears, whole, on the token carrying its last byte
    assert [p for p in pieces if p] == [ch for ch in text if ch]


def test_random_tokens_including_invalid_utf8_and_special_tokens(tokenizer: Tokenizer) -> None:
    """Model output need not be valid UTF-8: the stream still equals the full decode (U+FFFD included)."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids = rng.integers(0, tokenizer.vocab_size + 7, size=int(rng.integers(1, 40))).tolist()
        check_stream(tokenizer, ids)


def test_sequence_ending_mid_character_flushes_a_replacement(tokenizer: Tokenizer) -> None:
    ids = byte_token_ids(tokenizer, "好")[:2]
    pieces = stream(tokenizer, ids)
    assert pieces == ["", "", REPLACEMENT_CHAR]
