"""`Sequence`: a handle on one sequence of tokens in the paged KV cache, handed out by `Engine.new_sequence`.

Whoever drives the model (the Engine's generation loop, `ChatSession`, the server's `Scheduler`, bench) holds
these rather than raw sequence ids: a handle knows its length, appends and cuts back its own tokens, and
frees its pages when closed (once, however often `close` is called). A forward pass that an exception cuts
short (Ctrl-C) leaves the sequence as it was before the pass.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .model_lib import ModelLibrary


class Sequence:
    """One sequence in a model's KV cache; several are run together with `Engine.prefill`/`Engine.decode`."""

    def __init__(self, model: ModelLibrary, seq_id: int) -> None:
        self.model = model
        self.id = seq_id

    @property
    def length(self) -> int:
        """Tokens the cache holds for this sequence."""
        return self.model.sequence_lengths[self.id]

    @property
    def closed(self) -> bool:
        return self.id not in self.model.sequence_lengths

    def prefill(self, token_ids: list[int]) -> np.ndarray:
        """Append the tokens (in chunks of at most prefill_chunk_size); the logits [vocab] after the last."""
        return self.model.prefill([self.id], [list(token_ids)])[0]

    def decode(self, token_id: int) -> np.ndarray:
        """Append one token; the logits [vocab] after it."""
        return self.model.decode([self.id], [token_id])[0]

    def fork(self, length: int) -> Sequence:
        """A new sequence that starts with this one's first `length` tokens, sharing their pages."""
        return Sequence(self.model, self.model.fork_sequence(self.id, length))

    def truncate(self, length: int) -> None:
        """Keep the first `length` tokens (all of them when the sequence holds fewer)."""
        self.model.truncate_sequence(self.id, length)

    def close(self) -> None:
        """Free the sequence's KV-cache pages."""
        if not self.closed:
            self.model.remove_sequence(self.id)

    def __enter__(self) -> Sequence:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
