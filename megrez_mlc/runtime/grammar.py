"""Constrained decoding: a grammar (a JSON schema, any JSON, or a Lark grammar) decides which tokens may
come next, and every other token's logit is set to -inf before sampling.

The grammar engine is llguidance (Rust, no dependencies): a `GrammarVocabulary` holds its view of the
tokenizer (built once per model, on the first constrained request), a `GrammarMatcher` one
request's parse state, which advances with each sampled token. A request ends when its grammar does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from llguidance import LLMatcher, LLTokenizer, TokenizerWrapper

from ..errors import MegrezError
from .tokenizer import Tokenizer

# Whitespace a JSON answer may put between tokens: none, one space, or a newline and an indent (as pretty
# printers write), bounded so that a weak model cannot fill its whole budget with blanks.
JSON_WHITESPACE = r"(?:\n[ ]{0,20}|[ ])?"


class GrammarError(MegrezError):
    """A schema or grammar the engine cannot use (invalid, or a feature it does not implement)."""


@dataclass(frozen=True)
class Grammar:
    """What an answer must match, in llguidance's grammar format (build one with the class methods)."""

    source: str

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> Grammar:
        """JSON valid against a JSON schema (a dict, or its text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as err:
                raise GrammarError(f"the JSON schema is not valid JSON: {err}") from None
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be a JSON object, got {schema!r}"[:200])
        return cls(_json_grammar(schema))

    @classmethod
    def json_object(cls) -> Grammar:
        """Any JSON object (OpenAI's JSON mode)."""
        return cls(_json_grammar({"type": "object"}))

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """A Lark grammar in llguidance's dialect: `%json {schema}` embeds a schema, `<|name|>` a special
        token."""
        return cls(LLMatcher.grammar_from_lark(text))


def _json_grammar(schema: dict[str, Any]) -> str:
    return LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_pattern": JSON_WHITESPACE})


class GrammarVocabulary:
    """The grammar engine's view of one model's tokenizer: each id's bytes as the runtime's tokenizer has
    them, the logits' width, the stop tokens a finished grammar allows."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_token_ids: list[int]) -> None:
        # Handed over id by id rather than as tokenizer.json: llguidance counts a file's tokens and reads
        # ids only up to that count, so a special token after a gap in the ids (Megrez's named ones sit at
        # 120000-05, 120014-16 and 120020-25) would be unknown to it.
        self.vocab_size = vocab_size
        self._tokenizer = LLTokenizer(
            TokenizerWrapper(_TokenTable(tokenizer, vocab_size, stop_token_ids[0])),
            n_vocab=vocab_size,
            eos_token=stop_token_ids,
        )

    def matcher(self, grammar: Grammar) -> GrammarMatcher:
        """A fresh parse state for `grammar`; a GrammarError says what in it the engine cannot use."""
        matcher = LLMatcher(self._tokenizer, grammar.source, log_level=0)
        if matcher.is_error():
            raise GrammarError(" ".join(matcher.get_error().split()))
        return GrammarMatcher(matcher, self.vocab_size)


class _TokenTable:
    """What llguidance reads from a tokenizer: every id's bytes (empty where no token is), which ids are
    special tokens (matched only by name in a grammar, never as text), and a way to encode text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_id: int) -> None:
        self.tokens = [tokenizer.token_bytes(i) for i in range(vocab_size)]
        self.special_token_ids = sorted(i for i in tokenizer.special_token_ids() if i < vocab_size)
        self.eos_token_id = eos_token_id
        self.bos_token_id = None  # Megrez has none
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)


class GrammarMatcher:
    """One answer's position in its grammar."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self._vocab_size = vocab_size

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar does not allow next set to -inf (a copy)."""
        bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
        allowed = np.unpackbits(bits, bitorder="little")[: self._vocab_size].view(bool)
        return np.where(allowed, logits, np.float32(-np.inf))

    def accept(self, token_id: int) -> None:
        """Advance past a token the mask allowed."""
        if not self._matcher.consume_token(token_id):
            raise MegrezError(f"the grammar refused token {token_id}: {self._matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing more (the answer ends here)."""
        return self._matcher.is_stopped()
