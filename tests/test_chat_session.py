"""ChatSession: multi-turn KV-cache reuse, interruption, context overflow; Engine.chat and stream_chat."""

from __future__ import annotations

import json
import logging

import pytest

from megrez_mlc.errors import MegrezError
from megrez_mlc.runtime import ChatSession, Engine, SamplingParams

GREEDY = {"temperature": 0.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def engine(built) -> Engine:
    model = built("q4f32_1")
    window = json.loads((model.model_dir / "mlc-chat-config.json").read_text())["context_window_size"]
    # a small prefill chunk, so long turns take several prefill rounds; room in the KV cache for a session
    # and a fresh run beside it, each up to the whole context window
    return Engine(
        model.model_dir, model.lib, max_batch_size=2, prefill_chunk_size=32, max_total_seq_len=2 * window
    )


@pytest.fixture
def session(engine: Engine):
    with ChatSession(engine, **GREEDY) as chat:
        yield chat
    assert engine.kv_status()["sequences"] == 0


def answer_ids(session: ChatSession, index: int = -1) -> list[int]:
    message = session.history[index]
    assert message.role == "assistant"
    head, tail = len(session.generation_prompt_ids), len(session.answer_end_ids)
    return message.token_ids[head : len(message.token_ids) - tail]


def prompt_before_last_answer(session: ChatSession) -> list[int]:
    """The conversation's tokens up to the last answer, plus the generation prompt."""
    ids = session.token_ids()
    return ids[: len(ids) - len(session.history[-1].token_ids)] + session.generation_prompt_ids


def fresh_greedy(engine: Engine, prompt: list[int], session: ChatSession) -> list[int]:
    """The same answer computed from scratch: a new KV sequence, the whole token history prefilled."""
    params = SamplingParams(**{**vars(session.params), "stop": list(session.conversation.stop_str)})
    return engine.generate(prompt, params).token_ids


def test_second_turn_prefills_only_new_tokens_and_equals_a_fresh_run(
    session: ChatSession, engine: Engine
) -> None:
    first = session.ask("你好，Megrez！")
    first_prompt = engine.encode_chat([{"role": "user", "content": "你好，Megrez！"}])
    assert session.stats.prefill_tokens == len(first_prompt)
    assert answer_ids(session) == fresh_greedy(engine, first_prompt, session)
    in_cache = session.context_used

    second = session.ask("Tell me more 😀")
    new_tokens = engine.tokenizer.encode(
        "<|turn_end|><|role_start|>user<|role_end|>Tell me more 😀<|turn_end|>"
        "<|role_start|>assistant<|role_end|>"
    )
    # new tokens only: the end of answer 1 and turn 2; plus answer 1's last token when its answer ran out of
    # max_tokens (that token was sampled but never fed back)
    pending = len(first_prompt) + len(answer_ids(session, 1)) - in_cache
    assert pending == (1 if len(answer_ids(session, 1)) == GREEDY["max_tokens"] else 0)
    assert session.stats.prefill_tokens == len(new_tokens) + pending
    assert answer_ids(session) == fresh_greedy(engine, prompt_before_last_answer(session), session)
    assert [m["content"] for m in session.messages[1:]] == [
        "你好，Megrez！",
        first,
        "Tell me more 😀",
        second,
    ]


def test_token_history_renders_as_the_chat_template(session: ChatSession, tiny_hf) -> None:
    from transformers import AutoTokenizer

    for text in ("hello", "你好", "🎉 emoji"):
        session.ask(text)
    hf = AutoTokenizer.from_pretrained(tiny_hf)
    # the answers as their exact token ids say (special tokens the model wrote included)
    messages = session.messages
    for i, message in enumerate(session.history, start=1):
        if message.role == "assistant":
            messages[i]["content"] = hf.decode(answer_ids(session, i - 1), skip_special_tokens=False)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    assert hf.decode(session.token_ids(), skip_special_tokens=False) == expected


def test_answer_kept_as_generated_ids_not_retokenized(session: ChatSession) -> None:
    session.ask("hello")
    ids = answer_ids(session)
    assert session.history[-1].content == session.engine.tokenizer.decode(ids)
    kept = session.history[-1].token_ids
    assert kept == session.generation_prompt_ids + ids + session.answer_end_ids


def test_interrupted_answer_stays_and_the_cache_matches_the_history(
    session: ChatSession, engine: Engine
) -> None:
    session.set_sampling(max_tokens=200, ignore_eos=True)
    seen = []
    with pytest.raises(KeyboardInterrupt):
        for delta in session.send("Write a long story"):
            seen.append(delta)
            if len(seen) == 6:
                raise KeyboardInterrupt  # as Ctrl-C would, while the answer is being printed
    assert session.finish_reason == "interrupted"
    partial = answer_ids(session)
    assert 6 <= len(partial) < 200
    assert session.history[-1].content == engine.tokenizer.decode(partial)
    assert session.history[-1].content.startswith("".join(seen))
    assert engine.kv_status()["tokens"] == session.context_used  # as the KV cache itself counts them
    history = session.token_ids()
    in_cache = session.context_used
    assert session.cached_token_ids == history[:in_cache]
    # all but the answer's end, and perhaps its last sampled token, whose decode pass never ran
    assert len(history) - in_cache - len(session.answer_end_ids) in (0, 1)

    session.set_sampling(max_tokens=24, ignore_eos=False)
    session.ask("and then?")
    assert session.stats.prefill_tokens == len(prompt_before_last_answer(session)) - in_cache
    assert answer_ids(session) == fresh_greedy(engine, prompt_before_last_answer(session), session)


def test_interrupt_inside_a_forward_pass_is_repaired(
    session: ChatSession, engine: Engine, monkeypatch
) -> None:
    """Ctrl-C can land after begin_forward grew the cache and before the pass wrote it: those positions are
    given back, and the next turn still equals a fresh run."""
    session.ask("hello")
    session.set_sampling(max_tokens=100, ignore_eos=True)
    decode = engine.model.functions["decode"]
    calls = []

    def interrupted_decode(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return decode(*args)

    monkeypatch.setitem(engine.model.functions, "decode", interrupted_decode)
    with pytest.raises(KeyboardInterrupt):
        session.ask("count to ten")
    monkeypatch.setitem(engine.model.functions, "decode", decode)
    in_cache = len(prompt_before_last_answer(session)) + 3  # the prompt, and the 3 tokens fed back
    assert engine.kv_status()["tokens"] == session.context_used == in_cache  # as the KV cache counts them
    assert len(answer_ids(session)) == 4  # the token whose decode pass was cut short is kept in the history
    session.set_sampling(max_tokens=24, ignore_eos=False)
    session.ask("go on")
    assert answer_ids(session) == fresh_greedy(engine, prompt_before_last_answer(session), session)


def test_context_overflow_drops_oldest_turns_and_keeps_the_system_prompt(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    window = engine.context_window_size
    with ChatSession(engine, system="You are terse.", temperature=0.0, max_tokens=window // 4) as session:
        system_ids = engine.tokenizer.encode(session.conversation.render_system("You are terse."))
        turns = 0
        with caplog.at_level(logging.WARNING, logger="megrez_mlc"):
            while not caplog.records:
                session.ask(f"turn {turns}: the quick brown fox jumps over the lazy dog, 你好世界")
                turns += 1
                assert turns < 20
        (record,) = caplog.records
        assert "outgrew the 512-token context window: dropped the oldest" in record.getMessage()
        assert session.token_ids()[: len(system_ids)] == system_ids
        assert session.history[0].role == "user" and not session.history[0].content.startswith("turn 0:")
        assert len(session.token_ids()) <= window
        assert answer_ids(session) == fresh_greedy(engine, prompt_before_last_answer(session), session)
        # the system prompt stayed in the cache: the turn after the drop did not prefill it again
        assert session.stats.prefill_tokens <= len(prompt_before_last_answer(session)) - len(system_ids)


def test_message_longer_than_the_context_window_is_refused(session: ChatSession) -> None:
    with pytest.raises(MegrezError, match="the message is too long"):
        session.send("fox " * 600)
    assert session.history == []


def test_reset_and_new_system_prompt_reuse_what_still_matches(session: ChatSession, engine: Engine) -> None:
    session.ask("hello")
    session.reset()
    session.ask("hello")
    prompt = engine.encode_chat([{"role": "user", "content": "hello"}])
    assert len(session.history) == 2
    assert session.stats.prefill_tokens == 1  # the whole prompt was still cached; its last token is re-run
    cached = session.cached_token_ids
    session.system = "你是一个助手。"  # shares `<|role_start|>system<|role_end|>你是` with the default
    session.ask("again")
    new_prompt = prompt_before_last_answer(session)
    shared = next(i for i, (a, b) in enumerate(zip([*cached, -1], new_prompt)) if a != b)
    assert 3 <= shared < len(prompt) // 2
    assert session.stats.prefill_tokens == len(new_prompt) - shared  # all after the shared part
    assert answer_ids(session) == fresh_greedy(engine, prompt_before_last_answer(session), session)


def test_set_sampling_validates(session: ChatSession) -> None:
    assert session.set_sampling(temperature=0.5, top_p=0.9).temperature == 0.5
    with pytest.raises(MegrezError, match="top_p must be in"):
        session.set_sampling(top_p=2.0)
    with pytest.raises(MegrezError, match="sampling settings are"):
        session.set_sampling(warmth=1)


def test_engine_chat_streams_the_same_answer_as_a_session(engine: Engine) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！有什么可以帮你？"},
        {"role": "user", "content": "Tell me a joke 😀"},
    ]
    deltas = list(engine.stream_chat(messages, **GREEDY))
    assert len(deltas) > 1 and all(isinstance(d, str) and d for d in deltas)
    whole = engine.chat(messages, **GREEDY)
    assert "".join(deltas) == whole
    prompt = engine.tokenizer.encode(engine.conversation.render(messages))
    params = engine.default_sampling(**GREEDY)
    assert whole == engine.generate(prompt, params).text
    assert engine.kv_status()["sequences"] == 0


def test_load_keeps_generated_answer_ids(session: ChatSession) -> None:
    session.ask("hello")
    in_cache = session.context_used
    session.load([*session.messages, {"role": "user", "content": "more"}])
    "".join(session.respond())
    assert session.stats.prefill_tokens == len(prompt_before_last_answer(session)) - in_cache
    with pytest.raises(MegrezError, match="empty"):
        session.load([])
