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
    return GrammarVocabulary(tokenizer.to_json(), tokenizer.vocab_size + EXTRA_ROWS, stops)


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
