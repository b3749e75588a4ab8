"""Constrained decoding over the tiny tokenizer, with random logits standing in for a model: whatever the
logits, the masked choice spells JSON valid against the schema, the answer ends when the grammar does, and
a schema the engine cannot use is refused naming the feature."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest

from megrez_mlc.conversation import MEGREZ_STOP_TOKENS
from megrez_mlc.runtime.grammar import Grammar, GrammarError, GrammarVocabulary
from megrez_mlc.runtime.request import Request
from megrez_mlc.runtime.sampling import SamplingParams
from megrez_mlc.runtime.tokenizer import Tokenizer
from megrez_mlc.tiny import MEGREZ_SPECIAL_TOKENS, build_tokenizer

EXTRA_ROWS = 7  # logits wider than the tokenizer, as in the tiny model: ids no token has are never allowed

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 6},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "pet": {"enum": ["cat", "dog", None]},
        },
        "required": ["name", "age", "pet"],
        "additionalProperties": False,
    },
    {
        "type": "array",
        "items": {"type": "boolean"},
        "minItems": 2,
        "maxItems": 3,
    },
    {
        "type": "object",
        "properties": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number", "minimum": -1, "maximum": 1}, "ok": {"const": True}},
                "required": ["x", "ok"],
                "additionalProperties": False,
            },
            "tag": {"type": "string", "pattern": "^[a-c]{2,3}$"},
        },
        "required": ["point", "tag"],
        "additionalProperties": False,
    },
]


@pytest.fixture(scope="module")
def vocabulary(tokenizer: Tokenizer) -> GrammarVocabulary:
    stops = [tokenizer.token_to_id(token) for token in MEGREZ_STOP_TOKENS[:2]]
    return GrammarVocabulary(tokenizer, tokenizer.vocab_size + EXTRA_ROWS, stops)


def constrained(tokenizer: Tokenizer, vocabulary: GrammarVocabulary, grammar: Grammar, seed: int) -> Request:
    """A greedy request over random logits that must match `grammar`."""
    stops = [tokenizer.token_to_id(token) for token in MEGREZ_STOP_TOKENS[:2]]
    params = SamplingParams(max_tokens=300, temperature=0.0, stop_token_ids=stops, grammar=grammar)
    return Request.create([1], params, tokenizer, 512, seed=seed, matcher=vocabulary.matcher(grammar))


def run_random(request: Request, seed: int) -> tuple[str, str | None]:
    rng = np.random.default_rng(seed)
    text = ""
    while request.finish_reason is None:
        delta = request.step(rng.standard_normal(request.matcher._vocab_size).astype(np.float32))
        text += delta.text
    return text, request.finish_reason


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("schema_index", range(len(SCHEMAS)))
def test_random_logits_spell_json_valid_for_the_schema(tokenizer, vocabulary, schema_index, seed) -> None:
    schema = SCHEMAS[schema_index]
    request = constrained(tokenizer, vocabulary, Grammar.json_schema(schema), seed)
    text, reason = run_random(request, seed)
    assert reason == "stop", text
    jsonschema.validate(json.loads(text), schema)


def test_the_mask_allows_exactly_the_tokens_that_can_continue(tokenizer, vocabulary) -> None:
    """At the start of a {"a": true} object only tokens spelling a prefix of it (after optional
    whitespace) pass; the extra logit rows never do."""
    schema = {
        "type": "object",
        "properties": {"a": {"const": True}},
        "required": ["a"],
        "additionalProperties": False,
    }
    matcher = vocabulary.matcher(Grammar.json_schema(schema))
    masked = matcher.mask(np.zeros(vocabulary.vocab_size, dtype=np.float32))
    allowed = np.flatnonzero(masked == 0).tolist()
    assert allowed and np.isneginf(masked[tokenizer.vocab_size :]).all()
    for token_id in range(tokenizer.vocab_size):
        text = tokenizer.token_text(token_id)
        fits = bool(text) and '{"a":true}'.startswith(text.lstrip(" \n")) and text.lstrip(" \n") != ""
        assert (token_id in allowed) == (fits and text.startswith(("{", " ", "\n"))), repr(text)


def test_a_json_object_grammar_ends_the_answer_at_its_closing_brace(tokenizer, vocabulary) -> None:
    request = constrained(tokenizer, vocabulary, Grammar.json_object(), seed=0)
    brace = [tokenizer.token_to_id(t) for t in ("{", "}")]
    deltas = [request.step(one_hot(vocabulary.vocab_size, token)) for token in brace]
    assert "".join(d.text for d in deltas) == "{}"
    assert [d.finish_reason for d in deltas] == [None, "stop"] and request.output_ids == brace


def test_special_tokens_after_gaps_in_the_ids_keep_their_ids(tmp_path) -> None:
    """Special tokens at Megrez's ids relative to the first one (120000-05, 120014-16, 120020-25) with the
    ids between them free: a call's markers and a stop token are masked under the ids the tokenizer gives
    them, and the free ids are never allowed."""
    data = json.loads(build_tokenizer().to_str())
    first = len(data["model"]["vocab"])
    offsets = [0, 1, 2, 3, 4, 5, 14, 15, 16, 20, 21, 22, 23, 24, 25]  # Megrez's, from its first special id
    special = {token: first + offset for token, offset in zip(MEGREZ_SPECIAL_TOKENS, offsets, strict=True)}
    data["model"]["vocab"] |= special
    for added in data["added_tokens"]:
        added["id"] = special[added["content"]]
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    gapped = Tokenizer(tmp_path)
    markers = ("<|function_start|>", "<|function_end|>", "<|turn_end|>")
    start, end, turn_end = (gapped.token_to_id(marker) for marker in markers)
    assert (start, end, turn_end) == (first + 23, first + 24, first + 5)
    vocabulary = GrammarVocabulary(gapped, first + 26 + EXTRA_ROWS, [turn_end])
    matcher = vocabulary.matcher(Grammar.lark('start: <|function_start|> "{}" <|function_end|>'))
    zeros = np.zeros(vocabulary.vocab_size, dtype=np.float32)
    answer = [start, gapped.token_to_id("{"), gapped.token_to_id("}"), end]
    for token in answer:
        assert np.flatnonzero(np.isfinite(matcher.mask(zeros))).tolist() == [token]
        matcher.accept(token)
    assert np.flatnonzero(np.isfinite(matcher.mask(zeros))).tolist() == [turn_end]
    free = [first + offset for offset in range(26) if offset not in offsets]
    assert np.isneginf(vocabulary.matcher(Grammar.json_object()).mask(zeros)[free]).all()


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"not": {"type": "string"}}, '["not"]'),
        ({"type": "array", "uniqueItems": True}, '["uniqueItems"]'),
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "string", "format": "shoe-size"}, "Unknown format: shoe-size"),
        ({"$ref": "https://example.com/person.json"}, "https://example.com/person.json"),
    ],
)
def test_a_schema_the_engine_cannot_use_is_refused_naming_why(vocabulary, schema, named) -> None:
    with pytest.raises(GrammarError, match=f"^[^\n]*{named.replace('[', '.').replace(']', '.')}"):
        vocabulary.matcher(Grammar.json_schema(schema))


@pytest.mark.parametrize("given", ['{"type": ', "[1, 2]", "true"])
def test_a_schema_must_be_a_json_object(given: str) -> None:
    with pytest.raises(GrammarError, match="JSON"):
        Grammar.json_schema(given)


def one_hot(size: int, token_id: int) -> np.ndarray:
    logits = np.zeros(size, dtype=np.float32)
    logits[token_id] = 10.0
    return logits
