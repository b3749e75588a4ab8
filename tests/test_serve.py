"""`megrez-mlc serve`: the OpenAI API, driven by the real `openai` client against a server process on a free
loopback port, serving the tiny model. Every request has a timeout and every server is stopped at the end.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import httpx
import jsonschema
import numpy as np
import openai
import pydantic
import pytest

from megrez_mlc.conversation import FUNCTION_CALL_MARKERS, FUNCTIONS_PREAMBLE
from megrez_mlc.runtime import Engine
from megrez_mlc.serve.scheduler import Scheduler
from megrez_mlc.serve.server import MAX_BODY_BYTES, create_app

from .conftest import BuiltModel

TIMEOUT_S = 30.0
STARTUP_TIMEOUT_S = 90.0
MODEL_NAME = "tiny-megrez"
MESSAGES = [{"role": "user", "content": "Hello, how are you today?"}]
# Small functions: the tiny model has 512 positions, and its 300-token BPE spells JSON nearly byte by byte.
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 5}},
    "required": ["city"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER_PARAMETERS}},
    {"type": "function", "function": {"name": "now"}},  # no parameters: called with {}
]
ARGUMENT_SCHEMAS = {"weather": WEATHER_PARAMETERS, "now": {"type": "object", "maxProperties": 0}}
TOOL_MESSAGES = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Weather?"}]


def named(function: str) -> dict:
    return {"type": "function", "function": {"name": function}}


def schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


@dataclass
class Server:
    url: str
    api_key: str | None

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=f"{self.url}/v1",
            api_key=api_key or self.api_key or "unused",
            max_retries=0,
            timeout=TIMEOUT_S,
        )

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self) -> dict:
        response = httpx.get(f"{self.url}/health", headers=self.headers(), timeout=TIMEOUT_S)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs) -> httpx.Response:
        headers = {"Content-Type": "application/json", **self.headers(), **kwargs.pop("headers", {})}
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=TIMEOUT_S, **kwargs)

    def wait_for(self, condition) -> dict:
        """/health once `condition(health)` holds (failing after TIMEOUT_S)."""
        deadline = time.monotonic() + TIMEOUT_S
        while not condition(health := self.health()):
            assert time.monotonic() < deadline, f"timed out waiting; last /health: {health}"
            time.sleep(0.02)
        return health

    def wait_until_idle(self) -> dict:
        """/health once no request runs or waits (the engine frees a sequence in the turn it ends)."""
        return self.wait_for(lambda health: health["running"] == 0 and health["waiting"] == 0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(model: BuiltModel, log_dir: Path, *options: str, api_key: str | None = None) -> Iterator[Server]:
    port = free_port()
    args = ["serve", str(model.model_dir), "--model-lib", str(model.lib), "--port", str(port)]
    args += ["--served-model-name", MODEL_NAME, *options] + (["--api-key", api_key] if api_key else [])
    log_path = log_dir / f"serve-{port}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "megrez_mlc", *args], stdout=log, stderr=log)
    server = Server(f"http://127.0.0.1:{port}", api_key)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"the server exited with {proc.returncode}:\n{log_path.read_text()}")
            try:
                server.health()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the server did not start:\n{log_path.read_text()}") from None
                time.sleep(0.2)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


@pytest.fixture(scope="module")
def model(built) -> BuiltModel:
    return built("q4f32_1")


@pytest.fixture(scope="module")
def server(model: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # 8 sequences at once: 16 concurrent requests also exercise the waiting queue.
    with serving(model, tmp_path_factory.mktemp("serve"), "--max-num-sequence", "8") as s:
        yield s


@pytest.fixture(scope="module")
def engine(model: BuiltModel) -> Engine:
    return Engine(model.model_dir, model.lib, max_batch_size=1)


def greedy_chat(engine: Engine, messages: list[dict], max_tokens: int):
    params = engine.chat_sampling(engine.default_sampling(temperature=0.0, max_tokens=max_tokens))
    return engine.generate(engine.encode_chat(messages), params)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


# --- the endpoints -----------------------------------------------------------------------------------------


def test_models_and_health(server: Server) -> None:
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]
    health = server.health()
    assert health["status"] == "ok"
    assert health["context_window_size"] == health["max_single_sequence_length"] == 512
    assert health["max_num_sequence"] == 8
    assert health["kv_cache"]["max_total_seq_len"] == 512


def test_chat_answers_as_the_engine_does(server: Server, engine: Engine) -> None:
    expected = greedy_chat(engine, MESSAGES, 24)
    client = server.client()
    reply = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=24, temperature=0)
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == len(engine.encode_chat(MESSAGES))
    assert reply.usage.completion_tokens == len(expected.token_ids)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, chunks = stream_text(stream)
    assert text == expected.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == reply.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    # the same conversation again: all but its last prompt token come from the prefix cache
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == reply.usage.prompt_tokens - 1


def test_the_next_turn_reuses_the_conversation_so_far(server: Server, engine: Engine) -> None:
    """A chat client re-sends the history each turn: the second turn's prompt starts with the first's, which
    is not prefilled again (OpenAI's usage.prompt_tokens_details.cached_tokens), and the answer is the
    Engine's without any cache."""
    client = server.client()
    history = [{"role": "user", "content": "Tell me about prefix caches, in detail."}]
    first = client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=16, temperature=0)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"},
    ]
    second = client.chat.completions.create(model=MODEL_NAME, messages=history, max_tokens=16, temperature=0)
    assert second.choices[0].message.content == greedy_chat(engine, history, 16).text
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens
    health = server.wait_until_idle()
    assert health["prefix_cache"]["hits"] >= 1
    assert health["prefix_cache"]["sequences"] <= 8  # --max-num-sequence, the default --prefix-cache


def test_completions_raw_prompt_text_and_token_ids(server: Server, engine: Engine) -> None:
    prompt = "The quick brown fox"
    params = engine.default_sampling(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = engine.generate(prompt, params)
    client = server.client()
    extra = {"ignore_eos": True}
    reply = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0, extra_body=extra
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == "length"
    prompt_ids = engine.tokenizer.encode(prompt)
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt_ids), 20)

    by_ids = client.completions.create(
        model=MODEL_NAME, prompt=prompt_ids, max_tokens=20, temperature=0, extra_body=extra
    )
    assert by_ids.choices[0].text == expected.text

    stream = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=20, temperature=0, stream=True, extra_body=extra
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_string_cuts_the_answer(server: Server, engine: Engine) -> None:
    prompt = "Hello, world!"
    full = engine.generate(
        prompt, engine.default_sampling(temperature=0.0, max_tokens=30, ignore_eos=True)
    ).text
    stop = full[10:13]
    assert stop and full.find(stop) >= 5  # the stop string appears first somewhere in the middle
    reply = server.client().completions.create(
        model=MODEL_NAME,
        prompt=prompt,
        max_tokens=30,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert reply.choices[0].text == full[: full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


def test_seed_makes_sampling_repeatable(server: Server) -> None:
    client = server.client()

    def sample(seed: int) -> str:
        reply = client.completions.create(
            model=MODEL_NAME,
            prompt="Once",
            max_tokens=24,
            temperature=1.0,
            top_p=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return reply.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert len({sample(seed) for seed in range(4)}) > 1  # a different seed samples differently


# --- continuous batching -----------------------------------------------------------------------------------


def test_concurrent_streams_match_each_request_alone(server: Server) -> None:
    client = server.client()
    prompts = [[{"role": "user", "content": f"Question {i}: " + "why " * (i % 5)}] for i in range(16)]

    def ask(messages: list[dict]) -> tuple[str, str]:
        stream = client.chat.completions.create(
            model=MODEL_NAME, messages=messages, max_tokens=48, temperature=0, stream=True
        )
        text, chunks = stream_text(stream)
        return text, chunks[-1].choices[0].finish_reason

    alone = [ask(messages) for messages in prompts]
    together: list[tuple[str, str] | None] = [None] * len(prompts)
    start = threading.Barrier(len(prompts))

    def worker(i: int) -> None:
        start.wait(TIMEOUT_S)
        together[i] = ask(prompts[i])

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S * 2)
    assert together == alone
    assert len({text for text, _ in alone}) > 8  # the prompts really differ
    health = server.wait_until_idle()  # only the prefix cache holds tokens now
    assert health["kv_cache"]["sequences"] == health["prefix_cache"]["sequences"]
    assert health["kv_cache"]["tokens"] == health["prefix_cache"]["tokens"]


def reference_logprobs(engine: Engine, prompt_ids: list[int], answer_ids: list[int]) -> list[np.ndarray]:
    """log_softmax of the model's logits before each answer token, run step by step as the server does."""
    rows = []
    with engine.new_sequence() as sequence:
        logits = sequence.prefill(prompt_ids)
        for token in answer_ids:
            wide = logits.astype(np.float64)
            rows.append(wide - wide.max() - np.log(np.exp(wide - wide.max()).sum()))
            logits = sequence.decode(token)
    return rows


def test_chat_logprobs_are_the_models(server: Server, engine: Engine) -> None:
    """Each answer token's logprob and its 5 likeliest rivals equal log_softmax of the model's logits (the
    Engine's, within float32 noise), the greedy token is the likeliest, and the stream carries the same."""
    client = server.client()
    asked = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 12, "temperature": 0}
    reply = client.chat.completions.create(**asked, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content
    expected = greedy_chat(engine, MESSAGES, 12)
    assert len(content) == len(expected.token_ids) > 0
    # the tokens' bytes are the answer's (whose text leaves special tokens out), also where a token holds
    # part of a character
    shown = [e for e, t in zip(content, expected.token_ids) if engine.tokenizer.decode([t])]
    answer_bytes = b"".join(bytes(entry.bytes) for entry in shown)
    assert answer_bytes.decode(errors="replace") == reply.choices[0].message.content
    rows = reference_logprobs(engine, engine.encode_chat(MESSAGES), expected.token_ids)
    for entry, token, row in zip(content, expected.token_ids, rows):
        assert entry.token == engine.tokenizer.token_text(token)
        assert entry.logprob == pytest.approx(row[token], abs=1e-4)
        likeliest = np.argsort(-row, kind="stable")[:5]
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row[likeliest].tolist(), abs=1e-4)
        assert [t.token for t in entry.top_logprobs] == [
            engine.tokenizer.token_text(int(i)) for i in likeliest
        ]
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
        assert sum(np.exp(t.logprob) for t in entry.top_logprobs) <= 1 + 1e-6

    stream = client.chat.completions.create(**asked, logprobs=True, top_logprobs=5, stream=True)
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert [e.token for e in streamed] == [e.token for e in content]
    # (this time from the prefix cache: the prompt's attention is split at the cached part, rounded apart)
    assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in content], abs=1e-4)
    assert client.chat.completions.create(**asked).choices[0].logprobs is None  # not asked for


def test_completion_logprobs_in_the_legacy_shape(server: Server, engine: Engine) -> None:
    client = server.client()
    prompt = "The quick brown fox"
    reply = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3
    )
    logprobs = reply.choices[0].logprobs
    answer = engine.generate(prompt, engine.default_sampling(temperature=0.0, max_tokens=8))
    rows = reference_logprobs(engine, engine.tokenizer.encode(prompt), answer.token_ids)
    assert logprobs.tokens == [engine.tokenizer.token_text(t) for t in answer.token_ids]
    assert logprobs.token_logprobs == pytest.approx([r[t] for r, t in zip(rows, answer.token_ids)], abs=1e-4)
    for top, row in zip(logprobs.top_logprobs, rows):
        expected: dict[str, float] = {}  # tokens of one text (parts of characters): the likeliest's
        for i in np.argsort(-row, kind="stable")[:3]:
            expected.setdefault(engine.tokenizer.token_text(int(i)), row[i])
        assert list(top) == list(expected)
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-4)
    decode = engine.tokenizer.decode
    assert logprobs.text_offset == [len(decode(answer.token_ids[:i])) for i in range(len(answer.token_ids))]
    assert decode(answer.token_ids) == reply.choices[0].text

    stream = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3, stream=True
    )
    chunks = [c.choices[0].logprobs for c in stream if c.choices[0].logprobs and c.choices[0].logprobs.tokens]
    assert [offset for c in chunks for offset in c.text_offset] == logprobs.text_offset


def metric_samples(server: Server) -> dict[tuple[str, tuple], float]:
    """GET /metrics through prometheus_client's own parser: (sample name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    response = httpx.get(f"{server.url}/metrics", headers=server.headers(), timeout=TIMEOUT_S)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


# --- structured output and tool calls -----------------------------------------------------------------------


class Pet(pydantic.BaseModel):
    """What `client.chat.completions.parse` turns into a strict json_schema response_format."""

    model_config = pydantic.ConfigDict(extra="forbid")
    name: Annotated[str, pydantic.Field(max_length=6)]
    kind: Literal["cat", "dog", "fish"]
    age: Annotated[int, pydantic.Field(ge=0, le=30)]


def test_parse_with_a_pydantic_model_gets_a_valid_instance(server: Server) -> None:
    """The grammar makes even random weights answer with a valid Pet; streamed, the same text."""
    client = server.client()
    reply = client.chat.completions.parse(
        model=MODEL_NAME, messages=MESSAGES, response_format=Pet, temperature=0, max_tokens=200
    )
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet) and reply.choices[0].finish_reason == "stop"
    assert Pet.model_validate_json(reply.choices[0].message.content) == pet
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=MESSAGES,
        temperature=0,
        max_tokens=200,
        stream=True,
        response_format=schema_format(Pet.model_json_schema() | {"additionalProperties": False}),
    )
    text, chunks = stream_text(stream)
    assert text == reply.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_constrained_and_free_requests_share_a_batch(server: Server, engine: Engine) -> None:
    """A chat json_schema request, a completion with MLC's `schema` form and a plain chat, at once: each
    constrained answer validates and equals its answer alone, the plain one equals the Engine's."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    client = server.client()

    def chat_json() -> str:
        reply = client.chat.completions.create(
            model=MODEL_NAME,
            messages=MESSAGES,
            temperature=0,
            max_tokens=100,
            response_format=schema_format(schema),
        )
        return reply.choices[0].message.content

    def completion_json() -> str:
        reply = client.completions.create(
            model=MODEL_NAME,
            prompt="A JSON answer:",
            temperature=0,
            max_tokens=100,
            extra_body={"response_format": {"type": "json_object", "schema": json.dumps(schema)}},
        )
        return reply.choices[0].text

    def plain() -> str:
        messages = [{"role": "user", "content": "Say anything."}]
        return (
            client.chat.completions.create(model=MODEL_NAME, messages=messages, temperature=0, max_tokens=24)
            .choices[0]
            .message.content
        )

    alone = [chat_json(), completion_json()]
    jobs = [chat_json, completion_json, plain]
    results: list = [None] * len(jobs)
    threads = [
        threading.Thread(target=lambda k=k: results.__setitem__(k, jobs[k]())) for k in range(len(jobs))
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert results[:2] == alone
    for answer in alone:
        jsonschema.validate(json.loads(answer), schema)
    assert results[2] == greedy_chat(engine, [{"role": "user", "content": "Say anything."}], 24).text


@pytest.mark.parametrize("choice", ["required", named("weather")])
def test_a_forced_call_has_arguments_valid_for_its_function(server: Server, choice) -> None:
    client = server.client()
    settings = dict(
        model=MODEL_NAME,
        messages=TOOL_MESSAGES,
        tools=TOOLS,
        tool_choice=choice,
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=120,
    )
    reply = client.chat.completions.create(**settings)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.content is None
    [call] = message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    if choice != "required":
        assert call.function.name == "weather"
    jsonschema.validate(json.loads(call.function.arguments), ARGUMENT_SCHEMAS[call.function.name])

    chunks = list(client.chat.completions.create(**settings, stream=True))
    pieces = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert pieces[0][0].id.startswith("call_") and pieces[0][0].function.name == call.function.name
    assert "".join(p[0].function.arguments or "" for p in pieces) == call.function.arguments
    assert {p[0].index for p in pieces} == {0}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_a_tool_result_round_trip_renders_megrez_turns_and_reuses_the_cache(
    server: Server, engine: Engine
) -> None:
    """The call comes back in the history as the assistant's message and the result as a tool message: the
    prompt is exactly Megrez's turns for it (the vendor agent's `observation`), and the next request, which
    repeats that history, starts from the cache with the Engine's greedy answer."""
    client = server.client()
    first = client.chat.completions.create(
        model=MODEL_NAME,
        messages=TOOL_MESSAGES,
        tools=TOOLS,
        tool_choice=named("now"),
        temperature=0,
        max_tokens=60,
    )
    [call] = first.choices[0].message.tool_calls
    history = [
        *TOOL_MESSAGES,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"},
    ]
    start, end = FUNCTION_CALL_MARKERS
    functions = "\n\n".join(json.dumps(t["function"], indent=4, ensure_ascii=False) for t in TOOLS)
    megrez_text = (
        f"<|role_start|>system<|role_end|>Hi\n{FUNCTIONS_PREAMBLE}{functions}<|turn_end|>"
        "<|role_start|>user<|role_end|>Weather?<|turn_end|>"
        f'<|role_start|>assistant<|role_end|>{start}{{"name": "now", "arguments": {{}}}}{end}<|turn_end|>'
        "<|role_start|>observation<|role_end|>12:00<|turn_end|>"
        "<|role_start|>assistant<|role_end|>"
    )
    prompt_ids = engine.tokenizer.encode(megrez_text)
    second = client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16
    )
    assert second.usage.prompt_tokens == len(prompt_ids)
    again = client.chat.completions.create(
        model=MODEL_NAME, messages=history, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=16
    )
    assert again.usage.prompt_tokens_details.cached_tokens == len(prompt_ids) - 1
    params = engine.chat_sampling(engine.default_sampling(temperature=0.0, max_tokens=16))
    expected = engine.generate(prompt_ids, params).text
    assert second.choices[0].message.content == again.choices[0].message.content == expected


def test_metrics_count_what_a_request_did(server: Server) -> None:
    server.wait_until_idle()
    before = metric_samples(server)
    reply = server.client().completions.create(
        model=MODEL_NAME, prompt="Count me", max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
    )
    health = server.wait_until_idle()
    after = metric_samples(server)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(f"megrez_{name}", labels)] - before.get((f"megrez_{name}", labels), 0.0)

    assert grew("generation_tokens_total") == 5
    assert grew("prompt_tokens_total") == reply.usage.prompt_tokens
    assert grew("cached_prompt_tokens_total") == reply.usage.prompt_tokens_details.cached_tokens
    assert grew("requests_total", (("outcome", "length"),)) == 1
    assert grew("time_to_first_token_seconds_count") == 1
    assert grew("time_per_output_token_seconds_count") == 4
    assert (
        after[("megrez_time_to_first_token_seconds_bucket", (("le", "+Inf"),))]
        == after[("megrez_time_to_first_token_seconds_count", ())]
    )
    for outcome in ("stop", "length", "cancelled", "error"):
        assert after[("megrez_requests_total", (("outcome", outcome),))] == health["requests"][outcome]
    assert after[("megrez_running_requests", ())] == 0 and after[("megrez_waiting_requests", ())] == 0
    assert after[("megrez_kv_cache_free_pages", ())] == health["kv_cache"]["free_pages"]
    assert after[("megrez_prefix_cache_sequences", ())] == health["prefix_cache"]["sequences"]
    rate = health["prefix_cache"]["hits"] / health["prefix_cache"]["lookups"]
    assert after[("megrez_prefix_cache_hit_rate", ())] == pytest.approx(rate)


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b'{"model": "tiny-megrez", "messages": [', 400, None, None),
        (b"\xff\xfe not utf-8", 400, None, None),
        (b'["a", "list"]', 400, None, None),
        ({"messages": MESSAGES}, 400, "model", None),
        ({"model": MODEL_NAME, "messages": "hello"}, 400, "messages", None),
        (
            {"model": MODEL_NAME, "messages": [{"role": "user", "content": 5}]},
            400,
            "messages.0.content",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": [{"role": "robot", "content": "x"}]},
            400,
            "messages.0.role",
            None,
        ),
        ({"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": -1}, 400, "max_tokens", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": "12"}, 400, "max_tokens", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "temperature": "hot"}, 400, "temperature", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "top_p": 0}, 400, "top_p", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "stream": "yes"}, 400, "stream", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "n": 2}, 400, "n", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "functions": [{"name": "f"}]}, 400, "functions", None),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "tools": [{"type": "function", "function": {}}]},
            400,
            "tools.0.function.name",
            None,
        ),
        ({"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS[:1] * 2}, 400, "tools", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "tool_choice": "required"}, 400, "tool_choice", None),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "tools": TOOLS, "tool_choice": named("send_mail")},
            400,
            "tool_choice",
            None,
        ),
        (
            {
                "model": MODEL_NAME,
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "tool_calls": [{"function": {"name": "now", "arguments": "{"}}]},
                ],
            },
            400,
            "messages.1.tool_calls.0.function.arguments",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "response_format": {"type": "yaml"}},
            400,
            "response_format.type",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "response_format": {"type": "json_schema"}},
            400,
            "response_format",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "response_format": schema_format({"type": "strin"})},
            400,
            "response_format",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "response_format": schema_format({"not": {}})},
            400,
            "response_format",
            None,
        ),
        (
            {"model": MODEL_NAME, "messages": MESSAGES, "logprobs": True, "top_logprobs": 21},
            400,
            "top_logprobs",
            None,
        ),
        ({"model": MODEL_NAME, "messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs", None),
        ({"model": MODEL_NAME, "messages": MESSAGES, "logprobs": 1}, 400, "logprobs", None),
        ({"model": "gpt-4o", "messages": MESSAGES}, 404, "model", "model_not_found"),
        # JSON's escape of a lone surrogate: a str in Python, but no text a tokenizer can encode
        ({"model": MODEL_NAME, "messages": [{"role": "user", "content": "\udcff"}]}, 400, "messages", None),
    ],
)
def test_bad_chat_requests_get_openai_errors(server: Server, body, status: int, param, code) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = server.post("/v1/chat/completions", content=content)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    assert error["message"]


def test_a_schema_feature_the_engine_lacks_is_named(server: Server) -> None:
    body = {"model": MODEL_NAME, "messages": MESSAGES, "response_format": schema_format({"not": {}})}
    response = server.post("/v1/chat/completions", content=json.dumps(body).encode())
    assert response.status_code == 400
    assert 'Unimplemented keys: ["not"]' in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL_NAME, "prompt": 5}, "prompt"),
        ({"model": MODEL_NAME, "prompt": []}, "prompt"),
        ({"model": MODEL_NAME, "prompt": ["one", "two"]}, "prompt"),
        ({"model": MODEL_NAME, "prompt": [1, 2, 10**9]}, "prompt"),
        ({"model": MODEL_NAME, "prompt": ""}, "prompt"),
        ({"model": MODEL_NAME, "prompt": "x", "echo": True}, "echo"),
        ({"model": MODEL_NAME, "prompt": "x", "logprobs": 21}, "logprobs"),
        (
            {"model": MODEL_NAME, "prompt": "x", "response_format": schema_format({"type": "strin"})},
            "response_format",
        ),
        ({"model": MODEL_NAME, "prompt": "a \ud800 b"}, "prompt"),
    ],
)
def test_bad_completion_requests_get_openai_errors(server: Server, body, param: str) -> None:
    response = server.post("/v1/completions", content=json.dumps(body).encode())
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_prompt_longer_than_the_context_window(server: Server, engine: Engine) -> None:
    messages = [{"role": "user", "content": "word " * 600}]
    prompt_tokens = len(engine.encode_chat(messages))
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=4)
    error = caught.value.body
    assert error["code"] == "context_length_exceeded"
    assert error["message"].startswith(f"the prompt has {prompt_tokens} tokens but the context window is 512")


def test_oversize_body_and_unknown_path(server: Server) -> None:
    big = json.dumps({"model": MODEL_NAME, "prompt": "x" * MAX_BODY_BYTES}).encode()
    response = server.post("/v1/completions", content=big)
    assert response.status_code == 413
    assert str(MAX_BODY_BYTES) in response.json()["error"]["message"]
    response = httpx.get(f"{server.url}/v1/nothing-here", timeout=TIMEOUT_S)
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"


def test_server_keeps_serving_after_bad_input(server: Server) -> None:
    server.post("/v1/chat/completions", content=b"{not json")
    server.post("/v1/completions", json={"model": MODEL_NAME, "prompt": [10**9]})
    reply = server.client().completions.create(model=MODEL_NAME, prompt="Hello", max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens > 0
    health = server.wait_until_idle()
    assert health["kv_cache"]["sequences"] == health["prefix_cache"]["sequences"]


# --- auth ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def key_server(model: BuiltModel, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serving(model, tmp_path_factory.mktemp("serve-key"), api_key="sesame") as s:
        yield s


def test_api_key_is_required(key_server: Server) -> None:
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = httpx.get(f"{key_server.url}/v1/models", headers=headers, timeout=TIMEOUT_S)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        key_server.client(api_key="wrong").completions.create(model=MODEL_NAME, prompt="x", max_tokens=2)
    reply = key_server.client().completions.create(model=MODEL_NAME, prompt="x", max_tokens=2, temperature=0)
    assert reply.usage.completion_tokens <= 2


def test_no_api_key_needed_by_default(server: Server) -> None:
    response = httpx.get(f"{server.url}/v1/models", timeout=TIMEOUT_S)
    assert response.status_code == 200


# --- cancellation and a full queue, with the engine loop held at will ------------------------------------


@dataclass
class GatedServer(Server):
    """An in-process server whose engine loop waits at every decode step until `gate` is open."""

    scheduler: Scheduler = None  # type: ignore[assignment]
    gate: threading.Event = None  # type: ignore[assignment]
    cancelled: threading.Event = None  # type: ignore[assignment]


@pytest.fixture
def gated_server(model: BuiltModel) -> Iterator[GatedServer]:
    import uvicorn

    gate, cancelled = threading.Event(), threading.Event()

    def load() -> Engine:
        engine = Engine(model.model_dir, model.lib, max_batch_size=1)
        decode = engine.decode

        def gated_decode(*args):
            assert gate.wait(TIMEOUT_S), "the test never opened the gate"
            return decode(*args)

        engine.decode = gated_decode
        return engine

    # One sequence at a time and one waiting.
    scheduler = Scheduler(load, max_num_sequence=1, max_queue=1).start()
    cancel = scheduler.cancel

    def noted_cancel(ticket) -> None:
        cancel(ticket)
        cancelled.set()

    scheduler.cancel = noted_cancel
    port = free_port()
    config = uvicorn.Config(
        create_app(scheduler, MODEL_NAME), host="127.0.0.1", port=port, log_level="warning"
    )
    http_server = uvicorn.Server(config)
    thread = threading.Thread(target=http_server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not http_server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "the in-process server did not start"
            time.sleep(0.05)
        yield GatedServer(f"http://127.0.0.1:{port}", None, scheduler, gate, cancelled)
    finally:
        gate.set()
        http_server.should_exit = True
        thread.join(TIMEOUT_S)
        scheduler.stop()


LONG_COMPLETION = {
    "model": MODEL_NAME,
    "prompt": "a",
    "max_tokens": 500,
    "temperature": 0,
    "stream": True,
    "ignore_eos": True,
}


def test_killed_client_frees_its_sequence(gated_server: GatedServer) -> None:
    client_code = f"""
import openai, time
client = openai.OpenAI(base_url="{gated_server.url}/v1", api_key="unused", max_retries=0, timeout={TIMEOUT_S})
stream = client.completions.create(model="{MODEL_NAME}", prompt="a", max_tokens=500, temperature=0,
                                   stream=True, extra_body={{"ignore_eos": True}})
print("streaming", flush=True)  # the response has begun
for chunk in stream:
    time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", client_code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "streaming\n"
        gated_server.wait_for(lambda health: health["kv_cache"]["sequences"] == 1)  # held before decoding
    finally:
        proc.kill()
        proc.wait(TIMEOUT_S)
    assert gated_server.cancelled.wait(TIMEOUT_S)  # the server saw the client go
    gated_server.gate.set()
    health = gated_server.wait_until_idle()
    assert health["kv_cache"]["sequences"] == 0
    assert health["requests"]["cancelled"] == 1
    assert health["requests"]["length"] == 0  # it did not run to its 500 tokens


def test_a_non_streaming_client_that_leaves_cancels_its_request(gated_server: GatedServer) -> None:
    client_code = f"""
import openai
client = openai.OpenAI(base_url="{gated_server.url}/v1", api_key="unused", max_retries=0, timeout={TIMEOUT_S})
client.completions.create(model="{MODEL_NAME}", prompt="a", max_tokens=500, extra_body={{"ignore_eos": True}})
"""
    proc = subprocess.Popen([sys.executable, "-c", client_code])
    try:
        gated_server.wait_for(lambda health: health["kv_cache"]["sequences"] == 1)  # held before decoding
    finally:
        proc.kill()
        proc.wait(TIMEOUT_S)
    assert gated_server.cancelled.wait(TIMEOUT_S)
    gated_server.gate.set()
    health = gated_server.wait_until_idle()
    assert health["kv_cache"]["sequences"] == 0
    assert health["requests"]["cancelled"] == 1


def test_full_queue_answers_429_with_retry_after(gated_server: GatedServer) -> None:
    url = f"{gated_server.url}/v1/completions"
    with (
        httpx.Client(timeout=TIMEOUT_S) as http,
        http.stream("POST", url, json=LONG_COMPLETION) as running,
    ):
        assert running.status_code == 200
        gated_server.wait_for(lambda health: health["kv_cache"]["sequences"] == 1)  # held before decoding
        with http.stream("POST", url, json=LONG_COMPLETION) as waiting:
            assert waiting.status_code == 200
            assert gated_server.health()["waiting"] == 1
            refused = http.post(url, json=LONG_COMPLETION)
            assert refused.status_code == 429, refused.text
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.json()["error"]["type"] == "rate_limit_exceeded"
            gated_server.gate.set()
    health = gated_server.wait_until_idle()
    assert health["kv_cache"]["sequences"] == 0
