"""Sampled tokens' log-probabilities as the OpenAI API returns them (`logprobs` in a choice or a chunk).

Chat completions give one object per token, `{"token", "logprob", "bytes", "top_logprobs": [...]}` under
`"content"`; legacy completions give parallel lists: `tokens`, `token_logprobs`, `top_logprobs` (a
{token: logprob} dict per token) and `text_offset` (where each token's text starts in the completion).
"""

from __future__ import annotations

from typing import Any

from ..runtime.sampling import TokenLogprob
from ..runtime.tokenizer import Tokenizer


def _chat_entry(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict[str, Any]:
    return {
        "token": tokenizer.token_text(token_id),
        "logprob": logprob,
        "bytes": list(tokenizer.token_bytes(token_id)),
    }


def chat_logprobs(tokenizer: Tokenizer, entries: list[TokenLogprob]) -> dict[str, Any]:
    content = [
        {
            **_chat_entry(tokenizer, entry.token_id, entry.logprob),
            "top_logprobs": [_chat_entry(tokenizer, i, lp) for i, lp in entry.top],
        }
        for entry in entries
    ]
    return {"content": content, "refusal": None}


def _by_text(tokenizer: Tokenizer, top: tuple[tuple[int, float], ...]) -> dict[str, float]:
    """{token text: logprob}; of tokens with the same text (parts of characters) the likeliest one."""
    by_text: dict[str, float] = {}
    for token_id, logprob in top:
        by_text.setdefault(tokenizer.token_text(token_id), logprob)
    return by_text


def completion_logprobs(
    tokenizer: Tokenizer, entries: list[TokenLogprob], earlier_ids: list[int], top: int
) -> dict[str, Any]:
    """For `entries`, the tokens after `earlier_ids` (those of the same completion already returned)."""
    ids = [*earlier_ids]
    offsets = []
    for entry in entries:
        offsets.append(len(tokenizer.decode(ids)))
        ids.append(entry.token_id)
    return {
        "tokens": [tokenizer.token_text(e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [_by_text(tokenizer, e.top) for e in entries] if top else None,
        "text_offset": offsets,
    }
