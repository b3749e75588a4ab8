"""ChatSession's KV-cache reuse over the fake engine (tests/unit/conftest.py): what each turn prefills, how an
interrupted answer and dropped turns leave the cache, and Engine.chat / stream_chat."""

from __future__ import annotations

import logging

import pytest

from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime import ChatSession

GREEDY = {"temperature": 0.0, "max_tokens": 8}


@pytest.fixture
def engine(fake_engine):
    # room for a session and a fresh run beside it, each up to the whole context window
    return fake_engine(max_batch_size=2, context_window_size=512, max_total_seq_len=1024)


@pytest.fixture
def session(engine):
    with ChatSession(engine, **GREEDY) as chat:
        yield chat
    assert engine.kv_status()["sequences"] == 0


def answer_ids(session: ChatSession, index: int = -1) -> list[int]:
    ids = session.history[index].token_ids
    return ids[len(session.generation_prompt_ids) : len(ids) - len(session.answer_end_ids)]


def prompt_before_last_answer(session: ChatSession) -> list[int]:
    ids = session.token_ids()
    return ids[: len(ids) - len(session.history[-1].token_ids)] + session.generation_prompt_ids


def fresh(engine, session: ChatSession) -> list[int]:
    """The last answer computed from scratch: a new sequence, the whole conversation before it prefilled."""
    return engine.generate(prompt_before_last_answer(session), engine.chat_sampling(session.params)).token_ids


def last_prefill(engine) -> list[int]:
    """The tokens the last prefill call wrote (into the one sequence it ran)."""
    written = next(written for kind, written in reversed(engine.model.passes) if kind == "prefill")
    (tokens,) = written.values()
    return tokens


def test_second_turn_prefills_only_the_new_tokens(session: ChatSession, engine) -> None:
    session.ask("hello")
    first_prompt = engine.encode_chat([{"role": "user", "content": "hello"}])
    assert last_prefill(engine) == first_prompt
    assert session.stats.prefill_tokens == len(first_prompt)
    first = answer_ids(session)
    assert len(first) == 8 and session.finish_reason == "length"

    session.ask("more")
    # the answer's last token (sampled, never fed back), its end of message, the user turn, the new prompt
    encode = engine.tokenizer.encode
    new = first[-1:] + session.answer_end_ids + encode(session.conversation.render_message("user", "more"))
    assert last_prefill(engine) == new + session.generation_prompt_ids
    assert session.stats.prefill_tokens == len(new) + len(session.generation_prompt_ids)
    assert answer_ids(session) == fresh(engine, session)
    assert session.cached_token_ids == session.token_ids()[: session.context_used]


def test_a_closed_answer_stays_and_the_next_turn_prefills_from_where_the_cache_ends(
    session: ChatSession, engine
) -> None:
    deltas = session.send("tell a story")
    seen = [next(deltas) for _ in range(3)]
    deltas.close()  # as the REPL does on Ctrl-C while printing
    assert session.finish_reason == "interrupted"
    partial = answer_ids(session)
    assert len(partial) == 3 and session.history[-1].content == "".join(seen)
    # the third token was sampled but its decode pass never ran
    in_cache = session.context_used
    assert in_cache == len(prompt_before_last_answer(session)) + 2 == engine.kv_status()["tokens"]
    assert session.cached_token_ids == session.token_ids()[:in_cache]

    session.ask("and then?")
    assert last_prefill(engine) == prompt_before_last_answer(session)[in_cache:]
    assert last_prefill(engine)[:1] == partial[-1:]
    assert answer_ids(session) == fresh(engine, session)


def test_an_interrupt_inside_a_forward_pass_keeps_the_cache_at_the_completed_passes(
    session: ChatSession, engine
) -> None:
    session.ask("hello")
    engine.model.fail_after(3, KeyboardInterrupt())  # the prefill, two decode steps, then Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        session.ask("count to ten")
    assert session.finish_reason == "interrupted"
    assert len(answer_ids(session)) == 3  # the token whose pass was cut short stays in the history
    in_cache = session.context_used
    assert in_cache == len(prompt_before_last_answer(session)) + 2 == engine.kv_status()["tokens"]

    session.ask("go on")
    assert last_prefill(engine) == prompt_before_last_answer(session)[in_cache:]
    assert answer_ids(session) == fresh(engine, session)


def test_dropped_turns_keep_the_system_prompt_in_the_cache(
    fake_engine, caplog: pytest.LogCaptureFixture
) -> None:
    engine = fake_engine(max_batch_size=2, context_window_size=256, max_total_seq_len=512)
    with ChatSession(engine, system="Be terse.", temperature=0.0, max_tokens=32) as session:
        system_ids = engine.tokenizer.encode(session.conversation.render_system("Be terse."))
        turns = 0
        with caplog.at_level(logging.WARNING, logger="megrez_mlc"):
            while not caplog.records:
                cached = session.cached_token_ids
                session.ask(f"turn {turns}: the quick brown fox jumps over the lazy dog")
                turns += 1
                assert turns < 20
        (record,) = caplog.records
        assert "outgrew the 256-token context window: dropped the oldest" in record.getMessage()
        assert session.token_ids()[: len(system_ids)] == system_ids
        assert not session.history[0].content.startswith("turn 0:")
        prompt = prompt_before_last_answer(session)
        assert len(prompt) + 32 <= 256
        # the turn after the drop kept the cache up to the first token where the conversations part
        shared = next(i for i, (a, b) in enumerate(zip([*cached, -1], prompt)) if a != b)
        assert shared >= len(system_ids)
        assert last_prefill(engine) == prompt[shared:]
        assert answer_ids(session) == fresh(engine, session)


def test_reset_load_and_a_new_system_prompt_reuse_what_still_matches(session: ChatSession, engine) -> None:
    session.ask("hello")
    session.reset()
    session.ask("hello")
    assert session.stats.prefill_tokens == 1  # the whole prompt was cached; its last token runs again

    in_cache = session.context_used
    session.load([*session.messages, {"role": "user", "content": "more"}])
    "".join(session.respond())
    assert session.stats.prefill_tokens == len(prompt_before_last_answer(session)) - in_cache

    default = session.system
    session.system = default[:5] + "!"  # the template's head and the first characters stay, then it differs
    cached = session.cached_token_ids
    session.ask("again")
    prompt = prompt_before_last_answer(session)
    shared = next(i for i, (a, b) in enumerate(zip([*cached, -1], prompt)) if a != b)
    encode = engine.tokenizer.encode
    assert shared == len(encode(session.conversation.render_system(session.system))) - len(
        encode("!<|turn_end|>")
    )
    assert last_prefill(engine) == prompt[shared:]
    assert answer_ids(session) == fresh(engine, session)


def test_a_message_longer_than_the_context_window_is_refused(session: ChatSession) -> None:
    with pytest.raises(MegrezError, match="the message is too long"):
        session.send("fox " * 200)
    assert session.history == []


def test_engine_chat_and_stream_chat_answer_as_generate_does(engine) -> None:
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
        {"role": "user", "content": "a joke, please"},
    ]
    deltas = list(engine.stream_chat(messages, **GREEDY))
    assert len(deltas) == 8 and all(isinstance(d, str) and d for d in deltas)
    whole = engine.chat(messages, **GREEDY)
    assert whole == "".join(deltas)
    expected = engine.generate(
        engine.encode_chat(messages), engine.chat_sampling(engine.default_sampling(**GREEDY))
    )
    assert whole == expected.text
    with pytest.raises(MegrezError, match="empty"):
        engine.stream_chat([])  # refused at the call, before any iteration
    assert engine.kv_status()["sequences"] == 0


def test_an_abandoned_stream_frees_its_sequence(engine) -> None:
    stream = engine.stream_chat([{"role": "user", "content": "hi"}], **GREEDY)
    next(stream)
    assert engine.kv_status()["sequences"] == 1
    stream.close()
    assert engine.kv_status()["sequences"] == 0
