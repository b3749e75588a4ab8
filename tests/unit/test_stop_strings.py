"""Stop strings: text is released as soon as it can no longer begin a stop string, held back while it
might, and cut exactly before the first stop, however the text is split into deltas (and tokens)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from megrez_mlc.runtime.request import Request, StopStringMatcher
from megrez_mlc.runtime.sampling import SamplingParams
from megrez_mlc.runtime.tokenizer import Tokenizer


def feed_all(stops: list[str], deltas: list[str]) -> list[tuple[str, bool]]:
    """What the matcher returns for each delta, up to and including the one that stops."""
    matcher = StopStringMatcher(stops)
    results = []
    for delta in deltas:
        results.append(matcher.feed(delta))
        if results[-1][1]:
            break
    return results


def test_stop_inside_one_delta_releases_the_text_before_it() -> None:
    assert feed_all(["STOP"], ["abcSTOPdef"]) == [("abc", True)]


def test_stop_split_across_two_deltas() -> None:
    assert feed_all(["STOP"], ["Hello ST", "OP and more"]) == [("Hello ", False), ("", True)]


def test_stop_split_across_three_deltas() -> None:
    assert feed_all(["<END>"], ["one <E", "N", "D> two"]) == [("one ", False), ("", False), ("", True)]


def test_stop_split_into_single_characters() -> None:
    text = "some text<|end|>trailing"
    results = feed_all(["<|end|>"], list(text))
    assert "".join(out for out, _ in results) == "some text"
    assert len(results) == text.index("<|end|>") + len("<|end|>")  # stops on the stop's last character
    assert [stopped for _, stopped in results] == [False] * (len(results) - 1) + [True]
    # each character is released as soon as it cannot begin "<|end|>"; "<", "<|" ... wait for more
    assert [out for out, _ in results[:10]] == [*"some text", ""]


def test_held_back_text_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    assert feed_all(["STOP"], ["x ST", "AR", "!"]) == [("x ", False), ("STAR", False), ("!", False)]
    assert feed_all(["STOP"], ["STO", "STOP"]) == [("", False), ("STO", True)]


def test_a_stop_at_the_very_start() -> None:
    assert feed_all(["STOP"], ["STOP now"]) == [("", True)]
    assert feed_all(["STOP"], ["ST", "OP"]) == [("", False), ("", True)]


def test_the_shorter_of_overlapping_stops_cuts_first() -> None:
    """A stop that begins another ("ab" in "abc") cuts as soon as it appears, whatever would follow."""
    for stops in (["ab", "abc"], ["abc", "ab"]):
        assert feed_all(stops, ["xa", "b", "c"]) == [("x", False), ("", True)]
        assert feed_all(stops, ["xabc"]) == [("x", True)]
    # held back for the longer candidate, released when neither matches
    assert feed_all(["abc", "bd"], ["xab", "e"]) == [("x", False), ("abe", False)]


def test_several_stops_cut_at_the_earliest_in_the_text() -> None:
    assert feed_all(["world", "lo"], list("hello world")) == [
        *[(c, False) for c in "he"],
        ("", False),
        ("l", False),
        ("", True),
    ]
    assert feed_all(["world", "lo"], ["hello world"]) == [("hel", True)]
    assert feed_all(["!", "?"], ["Really? Yes!"]) == [("Really", True)]


@pytest.mark.parametrize(
    ("stops", "deltas", "released"),
    [
        (["。"], ["你好", "。世界"], ["你好", ""]),
        (["世界"], ["你好，世", "界！"], ["你好，", ""]),
        (["🎉"], ["party 😀", "🎉 time"], ["party 😀", ""]),
        (["👨‍👩‍👧"], ["family ", "👨‍", "👩‍", "👧!"], ["family ", "", "", ""]),
    ],
)
def test_multibyte_stops(stops: list[str], deltas: list[str], released: list[str]) -> None:
    results = feed_all(stops, deltas)
    assert [out for out, _ in results] == released
    assert results[-1][1]


def test_flush_releases_what_is_held_back_at_the_end_of_the_stream() -> None:
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("the end ST") == ("the end ", False)
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_empty_deltas_and_empty_stop_strings_change_nothing() -> None:
    assert feed_all(["", "STOP"], ["", "abc", "", "S", ""]) == [
        ("", False),
        ("abc", False),
        ("", False),
        ("", False),
        ("", False),
    ]
    assert feed_all([""], ["abc"]) == [("abc", False)]


# --- through a Request: sampled tokens -> detokenizer -> stop strings ------------------------------------


def generate(tokenizer: Tokenizer, tokens: list[int], params: SamplingParams) -> tuple[list, Request]:
    """Drive a greedy Request with logits that make `tokens` its choices, until it finishes."""
    request = Request.create([0], params, tokenizer, 1000)  # room for far more tokens than any test makes
    deltas = []
    for token in tokens:
        logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
        logits[token] = 1.0
        deltas.append(request.step(logits))
        if deltas[-1].finish_reason:
            break
    return deltas, request


def test_a_stop_split_across_byte_tokens(
    tokenizer: Tokenizer, byte_token_ids: Callable[[str], list[int]]
) -> None:
    tokens = byte_token_ids("Hello 世界! more")
    deltas, request = generate(tokenizer, tokens, SamplingParams(temperature=0, stop=["世界"]))
    last = len("Hello 世界".encode())  # the stop completes on 界's third byte
    assert request.output_ids == tokens[:last]
    assert "".join(d.text for d in deltas) == "Hello "
    assert (deltas[-1].token_id, deltas[-1].finish_reason) == (tokens[last - 1], "stop")


def test_a_stop_inside_bpe_tokens(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("你好，世界！今天天气很好。")
    deltas, request = generate(tokenizer, tokens, SamplingParams(temperature=0, stop=["天气"]))
    assert "".join(d.text for d in deltas) == "你好，世界！今天"
    assert request.finish_reason == "stop"
    assert tokenizer.decode(request.output_ids).startswith("你好，世界！今天天气")


def test_held_back_text_is_released_when_the_budget_ends(tokenizer: Tokenizer) -> None:
    tokens = tokenizer.encode("see you <EN")
    params = SamplingParams(temperature=0, stop=["<END>"], max_tokens=len(tokens))
    deltas, request = generate(tokenizer, tokens, params)
    assert "".join(d.text for d in deltas) == "see you <EN"
    assert deltas[-1].finish_reason == request.finish_reason == "length"
    assert deltas[-1].text == "<EN"  # held from "<" on, since it could begin "<END>"
    assert request.output_ids == tokens


def test_a_stop_token_ends_without_being_emitted(tokenizer: Tokenizer) -> None:
    turn_end = tokenizer.token_to_id("<|turn_end|>")
    tokens = [*tokenizer.encode("Hi there"), turn_end, *tokenizer.encode("more")]
    params = SamplingParams(temperature=0, stop_token_ids=[turn_end])
    deltas, request = generate(tokenizer, tokens, params)
    assert "".join(d.text for d in deltas) == "Hi there"
    assert request.output_ids == tokens[: tokens.index(turn_end)]
    assert (deltas[-1].token_id, deltas[-1].finish_reason) == (None, "stop")
