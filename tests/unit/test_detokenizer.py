"""Streaming detokenization never emits a broken UTF-8 character, emits each character as soon as it is
whole, and its concatenated output equals the decode of all tokens."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from megrez_mlc.runtime.tokenizer import REPLACEMENT_CHAR, StreamingDetokenizer, Tokenizer

TEXTS = (
    "你好，世界！😀🎉 无问芯穹发布了端侧大模型。",
    "Emoji 🚀👨‍👩‍👧 mixed with 中文 and English.",
    "人工智能🇨🇳",
)


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
def test_one_token_per_byte(
    tokenizer: Tokenizer, byte_token_ids: Callable[[str], list[int]], text: str
) -> None:
    ids = byte_token_ids(text)
    assert len(ids) == len(text.encode("utf-8"))
    pieces = check_stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in p for p in pieces)
    # each character appears, whole, on the token carrying its last byte
    assert [p for p in pieces if p] == list(text)


def test_random_tokens_including_invalid_utf8_and_special_tokens(tokenizer: Tokenizer) -> None:
    """Model output need not be valid UTF-8: the stream still equals the full decode (U+FFFD included)."""
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids = rng.integers(0, tokenizer.vocab_size + 7, size=int(rng.integers(1, 40))).tolist()
        check_stream(tokenizer, ids)


def test_sequence_ending_mid_character_flushes_a_replacement(
    tokenizer: Tokenizer, byte_token_ids: Callable[[str], list[int]]
) -> None:
    ids = byte_token_ids("好")[:2]
    pieces = stream(tokenizer, ids)
    assert pieces == ["", "", REPLACEMENT_CHAR]


def test_special_tokens_emit_nothing_even_between_the_bytes_of_a_character(
    tokenizer: Tokenizer, byte_token_ids: Callable[[str], list[int]]
) -> None:
    turn_end, role_end = tokenizer.token_to_id("<|turn_end|>"), tokenizer.token_to_id("<|role_end|>")
    first, *rest = byte_token_ids("好")
    ids = [*tokenizer.encode("Hi"), turn_end, first, role_end, *rest, turn_end]
    pieces = check_stream(tokenizer, ids)
    # "Hi" (one or more tokens), then nothing until 好's last byte, nothing for the final special, no flush
    assert "".join(pieces) == "Hi好"
    assert pieces[-4:] == ["", "好", "", ""]


def test_flush_after_whole_characters_is_empty_and_flush_is_idempotent(
    tokenizer: Tokenizer, byte_token_ids: Callable[[str], list[int]]
) -> None:
    detokenizer = StreamingDetokenizer(tokenizer)
    assert [detokenizer.put(i) for i in byte_token_ids("é😀")] == ["", "é", "", "", "", "😀"]
    assert detokenizer.flush() == ""
    detokenizer.put(byte_token_ids("😀")[0])
    assert detokenizer.flush() == REPLACEMENT_CHAR
    assert detokenizer.flush() == ""


def test_spaces_and_newlines_survive_token_by_token(tokenizer: Tokenizer) -> None:
    """The byte-level decoder sees earlier tokens again as context, so leading spaces are not lost."""
    text = 'def main():\n    print("hello")\n\n  你 好  \n'
    ids = tokenizer.encode(text)
    assert "".join(check_stream(tokenizer, ids)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_are_the_texts_bytes(tokenizer: Tokenizer, text: str) -> None:
    """What logprobs report as a token's bytes: concatenated they are the text's UTF-8, also where one token
    holds only part of a character (whose own text is U+FFFD)."""
    ids = tokenizer.encode(text)
    assert any(REPLACEMENT_CHAR in tokenizer.token_text(i) for i in ids)  # the hard case is there
    assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode()
