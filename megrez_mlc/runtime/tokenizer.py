"""Tokenizer access and streaming detokenization that never splits a UTF-8 character.

A byte-level BPE can put the bytes of one Chinese character or emoji into different tokens; decoding a
prefix that ends mid-character yields U+FFFD. The stream holds such bytes back until the character is
whole, so the concatenated stream equals the decode of all tokens.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from ..errors import MegrezError

REPLACEMENT_CHAR = "\ufffd"


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

    def encode(self, text: str) -> list[int]:
        """Token ids of `text` as is: no BOS (Megrez has none); special-token strings become their ids."""
        check_text(text)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

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
