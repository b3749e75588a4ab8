"""Finished requests' KV-cache sequences, kept so that a request starting with the same tokens skips them.

Chat clients send the whole conversation every turn, so each prompt starts with the previous turn's prompt
and answer. When a request finishes, its sequence (the tokens it holds and their KV pages) stays here
instead of being freed; a new request starts from the sequence sharing the longest prefix with its prompt
and prefills only the rest. A cached sequence whose every token starts the prompt (the conversation's
previous turn) is taken over whole; one that shares only part is forked at that point (TVM's paged KV
cache shares the common full pages, copying a partly filled last one), and stays for other requests.

The cache holds at most `capacity` sequences, least recently used evicted first; the scheduler also evicts
before it makes a request wait for pages or preempts one, so cached pages only ever use room nobody needs.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import numpy as np

from ..runtime.sequence import Sequence


def common_prefix_length(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    differs = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differs[0]) if differs.size else n


@dataclass(eq=False)
class CachedSequence:
    tokens: list[int]  # what the sequence holds, in order
    sequence: Sequence


@dataclass
class PrefixMatch:
    """Where a new request's sequence comes from: `length` tokens of `source` (a cached or running
    sequence), taken over whole when `adopt` (it is cached, and all of it starts the prompt)."""

    source: Sequence | None = None
    length: int = 0
    adopt: bool = False


class PrefixCache:
    """Cached sequences by last use (see the module docstring); `capacity` 0 turns prefix reuse off, from
    the running sequences too."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: collections.OrderedDict[int, CachedSequence] = collections.OrderedDict()  # LRU first
        self.lookups = 0
        self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    def counts(self) -> dict[str, int]:
        """Sequences and tokens held; requests looked up, and those that reused a prefix."""
        tokens = sum(len(entry.tokens) for entry in self._entries.values())
        return {"sequences": len(self), "tokens": tokens, "lookups": self.lookups, "hits": self.hits}

    def match(self, prompt_ids: list[int], running: list[CachedSequence]) -> PrefixMatch:
        """The longest reusable prefix of the prompt among the cached and the running sequences. At least
        the prompt's last token is left to prefill: its logits give the first new token."""
        best = PrefixMatch()
        if self.capacity == 0:
            return best
        limit = len(prompt_ids) - 1
        for entry, cached in [(e, True) for e in self._entries.values()] + [(e, False) for e in running]:
            shared = common_prefix_length(prompt_ids, entry.tokens)
            length = min(shared, limit)
            if length > best.length:
                adopt = cached and length == len(entry.tokens)
                best = PrefixMatch(entry.sequence, length, adopt)
        return best

    def record(self, match: PrefixMatch) -> None:
        """Count a request's lookup, and whether it found a prefix, for the hit rate."""
        if self.capacity:
            self.lookups += 1
            self.hits += bool(match.length)

    def take(self, match: PrefixMatch) -> Sequence:
        """The new request's sequence for a match: the source itself (out of the cache) or a fork of it."""
        assert match.source is not None
        if match.adopt:
            del self._entries[match.source.id]
            return match.source
        if match.source.id in self._entries:
            self._entries.move_to_end(match.source.id)
        return match.source.fork(match.length)

    def add(self, tokens: list[int], sequence: Sequence) -> None:
        """Keep a finished request's sequence (freed at once when the cache is off)."""
        if self.capacity == 0 or not tokens:
            sequence.close()
            return
        self._entries[sequence.id] = CachedSequence(tokens, sequence)
        while len(self._entries) > self.capacity:
            self.evict_oldest()

    def evict_oldest(self, keep: Sequence | None = None) -> bool:
        """Free the least recently used sequence other than `keep`; False when there is none."""
        for entry in self._entries.values():
            if entry.sequence is not keep:
                return self.evict(entry.sequence)
        return False

    def evict(self, sequence: Sequence | None) -> bool:
        """Free a cached sequence; False when it is not in the cache (a running one, or None)."""
        entry = self._entries.pop(sequence.id, None) if sequence is not None else None
        if entry is None:
            return False
        entry.sequence.close()
        return True

    def clear(self) -> None:
        while self.evict_oldest():
            pass
