"""Tokenizer access and streaming detokenization that never splits a UTF-8 character.

A byte-level BPE can put the bytes of one Chinese character or emoji into different tokens; decoding a
prefix that ends mid-character yields U+FFFD. The stream holds such bytes back until the character is
whole, so the concatenated stream equals the decode of all tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import MegrezError

REPLACEMENT_CHAR = "\ufffd"


def _byte_alphabet() -> dict[str, int]:
    """The characters a byte-level BPE writes for each byte (GPT-2's table): printable Latin-1 bytes stand
    for themselves, the other 68 bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(0x100 + n): b for n, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_alphabet()


def check_text(text: str, what: str = "the text") -> None:
    """Refuse text holding lone surrogates, which no tokenizer can encode: how Python passes on bytes that
    are not UTF-8 (in a command-line argument or a pipe read with surrogateescape), or JSON's "\\udcff"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        char = ord(text[err.start])
        # U+DC80..U+DCFF stand for the undecodable bytes 0x80..0xFF (PEP 383).
        found = f"byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF else f"lone surrogate U+{char:04X}"
        raise MegrezError(
            f"{what} is not valid UTF-8 ({found} at character {err.start}); give it as UTF-8 text "
            "(check the encoding of your terminal or file)"
        ) from None


class Tokenizer:
    def __init__(self, model_dir: Path) -> None:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise MegrezError(f"{path} not found; run `megrez-mlc gen-config` to copy the tokenizer files")
        self._tok = HFTokenizer.from_file(str(path))
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        self._byte_level = decoder.get("type") == "ByteLevel"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as is: no BOS (Megrez has none); special-token strings become their ids."""
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token's text on its own (U+FFFD for part of a character); special tokens included."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for, also when they are part of a character: a byte-level BPE's
        token string, mapped back through its byte alphabet."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""  # an id the tokenizer does not use (a gap, or a row past its vocabulary)
        if self._byte_level and all(c in _BYTE_OF_CHAR for c in piece):
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        return self.token_text(token_id).encode("utf-8")

    def special_token_ids(self) -> list[int]:
        """The ids of the tokens marked special (control tokens such as the chat markers)."""
        return [i for i, token in self._tok.get_added_tokens_decoder().items() if token.special]

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()


class StreamingDetokenizer:
    """Feed token ids one at a time; each call returns the text that became final."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        # ids[_prefix:_read] is decoded again as context (decoders may look back, e.g. at spaces);
        # ids[:_read] is the part whose text has been emitted.
        self._prefix = 0
        self._read = 0

    def put(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
        full_text = self.tokenizer.decode(self.ids[self._prefix :])
        if full_text.endswith(REPLACEMENT_CHAR) or len(full_text) <= len(prefix_text):
            return ""  # an unfinished character (or nothing visible yet): hold the bytes back
        self._prefix, self._read = self._read, len(self.ids)
        return full_text[len(prefix_text) :]

    def flush(self) -> str:
        """Whatever is still held back (a sequence that ended mid-character shows U+FFFD here)."""
        prefix_text = self.tokenizer.decode(self.ids[self._prefix : self._read])
        full_text = self.tokenizer.decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return full_text[len(prefix_text) :]
