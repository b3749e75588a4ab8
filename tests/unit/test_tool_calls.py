"""Megrez's function calls: rendered into the prompt exactly as its own chat template renders the vendor
agent's messages, cut out of the answer token by token, parsed into OpenAI's tool calls (or left as text
when they do not parse), and forced by a grammar to match the function's parameters."""

from __future__ import annotations

import json

import jinja2
import jsonschema
import numpy as np
import pytest

from megrez_mlc.conversation import (
    FUNCTION_CALL_MARKERS,
    FUNCTIONS_PREAMBLE,
    MEGREZ_DEFAULT_SYSTEM,
    MEGREZ_JINJA_TEMPLATE,
    MEGREZ_STOP_TOKENS,
    megrez_template,
)
from megrez_mlc.runtime.grammar import GrammarVocabulary
from megrez_mlc.runtime.request import CallMarkers, Request
from megrez_mlc.runtime.sampling import SamplingParams
from megrez_mlc.runtime.tokenizer import Tokenizer
from megrez_mlc.serve.protocol import ChatCompletionRequest
from megrez_mlc.serve.tools import forced_call_grammar, parse_call, template_messages, unparsed_call

WEATHER = {
    "name": "get_weather",
    "description": "今天的天气 (the weather today)",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
NOW = {"name": "now"}  # no parameters: the call's arguments are {}


def body(messages: list[dict], **fields) -> ChatCompletionRequest:
    tools = [{"type": "function", "function": f} for f in (WEATHER, NOW)]
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": messages, "tools": tools, **fields}
    )


def jinja_render(messages: list[dict]) -> str:
    """Megrez's own chat template (its tokenizer_config.json) over the vendor agent's message list."""
    return jinja2.Template(MEGREZ_JINJA_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def test_a_tool_round_trip_renders_as_megrez_own_turns() -> None:
    """OpenAI's messages (tools, an assistant's tool_calls, a tool result) become the vendor agent's: the
    functions after the system message as indented JSON, the call between its markers, the result as an
    `observation` turn."""
    arguments = {"city": "北京", "unit": "c"}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Beijing?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps(arguments)},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "晴, 25°C"},
    ]
    ours = megrez_template().render(template_messages(body(messages), MEGREZ_DEFAULT_SYSTEM))
    functions = "\n\n".join(json.dumps(f, ensure_ascii=False, indent=4) for f in (WEATHER, NOW))
    start, end = FUNCTION_CALL_MARKERS
    call = json.dumps({"name": "get_weather", "arguments": arguments}, ensure_ascii=False)
    vendor = [
        {"role": "system", "content": "Be brief.\n" + FUNCTIONS_PREAMBLE + functions},
        {"role": "user", "content": "Weather in Beijing?"},
        {"role": "assistant", "content": f"Let me look.{start}{call}{end}"},
        {"role": "observation", "content": "晴, 25°C"},
    ]
    assert ours == jinja_render(vendor)
    assert "<|role_start|>observation<|role_end|>晴, 25°C<|turn_end|>" in ours


def test_without_a_system_message_the_functions_follow_megrez_default_one() -> None:
    ours = megrez_template().render(
        template_messages(body([{"role": "user", "content": "hi"}]), MEGREZ_DEFAULT_SYSTEM)
    )
    assert ours.startswith(f"<|role_start|>system<|role_end|>{MEGREZ_DEFAULT_SYSTEM}\n{FUNCTIONS_PREAMBLE}{{")


def test_tool_choice_none_keeps_the_prompt_of_the_other_choices() -> None:
    """So that a conversation switching tool_choice between turns keeps its cached prefix."""
    messages = [{"role": "user", "content": "hi"}]
    rendered = [template_messages(body(messages, tool_choice=c), "S") for c in ("none", "auto", "required")]
    assert rendered[0] == rendered[1] == rendered[2] != template_messages(body(messages, tools=None), "S")


# --- the answer's calls, token by token ---------------------------------------------------------------


@pytest.fixture(scope="module")
def markers(tokenizer: Tokenizer) -> CallMarkers:
    start, end = (tokenizer.token_to_id(marker) for marker in FUNCTION_CALL_MARKERS)
    return CallMarkers(start, end, FUNCTION_CALL_MARKERS[0])


def scripted(tokenizer: Tokenizer, markers: CallMarkers, pieces: list[str], **params) -> list:
    """Drive a greedy request through one-hot logits spelling `pieces` (text, or a special token), and
    return its deltas."""
    stops = [tokenizer.token_to_id(token) for token in MEGREZ_STOP_TOKENS[:2]]
    settings = SamplingParams(
        **{"max_tokens": 200, **params}, temperature=0.0, stop_token_ids=stops, tool_calls=True
    )
    request = Request.create([1], settings, tokenizer, 512, call_markers=markers)
    tokens = [t for piece in pieces for t in tokenizer.encode(piece)]
    deltas = []
    for token in tokens:
        logits = np.zeros(tokenizer.vocab_size, dtype=np.float32)
        logits[token] = 10.0
        deltas.append(request.step(logits))
        if deltas[-1].finish_reason:
            break
    return deltas


def test_calls_come_apart_from_the_text(tokenizer, markers) -> None:
    start, end = FUNCTION_CALL_MARKERS
    first, second = (
        '{"name": "now", "arguments": {}}',
        '{"name": "get_weather", "arguments": {"city": "巴黎"}}',
    )
    deltas = scripted(
        tokenizer, markers, ["Sure <", start, first, end, " and ", start, second, end, "<|turn_end|>"]
    )
    assert "".join(d.text for d in deltas) == "Sure < and "
    assert [d.tool_call for d in deltas if d.tool_call] == [first, second]
    assert deltas[-1].finish_reason == "stop"


def test_without_parallel_calls_the_answer_ends_with_the_first_call(tokenizer, markers) -> None:
    start, end = FUNCTION_CALL_MARKERS
    call = '{"name": "now", "arguments": {}}'
    deltas = scripted(tokenizer, markers, [start, call, end, "more"], parallel_tool_calls=False)
    assert (deltas[-1].tool_call, deltas[-1].finish_reason) == (call, "stop")
    assert "".join(d.text for d in deltas) == ""


def test_a_call_cut_off_by_the_token_budget_is_text(tokenizer, markers) -> None:
    start, _ = FUNCTION_CALL_MARKERS
    unfinished = '{"name": "now", "argu'
    deltas = scripted(
        tokenizer,
        markers,
        ["ok", start, unfinished],
        max_tokens=len(tokenizer.encode("ok" + start + unfinished)),
    )
    assert "".join(d.text for d in deltas) == "ok" + start + unfinished
    assert deltas[-1].finish_reason == "length" and not any(d.tool_call for d in deltas)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "arguments": {"city": "x"',  # not JSON
        '{"name": "send_mail", "arguments": {}}',  # not a function on offer
        '{"name": "now", "arguments": "{}"}',  # arguments not an object
        '["now", {}]',
    ],
)
def test_a_call_that_does_not_parse_is_returned_as_the_model_wrote_it(text: str) -> None:
    assert parse_call(text, ["get_weather", "now"]) is None
    start, end = FUNCTION_CALL_MARKERS
    assert unparsed_call(text) == start + text + end


def test_a_call_parses_into_openai_form() -> None:
    call = parse_call('{"name": "get_weather", "arguments": {"city": "巴黎", "unit": "c"}}', ["get_weather"])
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "巴黎", "unit": "c"}'}


# --- forced calls ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_forced_call_is_valid_for_its_function_whatever_the_logits(
    tokenizer, markers, choice, seed
) -> None:
    request_body = body([{"role": "user", "content": "hi"}], tool_choice=choice, parallel_tool_calls=False)
    stops = [tokenizer.token_to_id(token) for token in MEGREZ_STOP_TOKENS[:2]]
    vocabulary = GrammarVocabulary(tokenizer, tokenizer.vocab_size, stops)
    grammar = forced_call_grammar(request_body)
    params = SamplingParams(
        max_tokens=300,
        temperature=0.0,
        stop_token_ids=stops,
        grammar=grammar,
        tool_calls=True,
        parallel_tool_calls=False,
    )
    request = Request.create(
        [1], params, tokenizer, 512, matcher=vocabulary.matcher(grammar), call_markers=markers
    )
    rng = np.random.default_rng(seed)
    deltas = []
    while request.finish_reason is None:
        deltas.append(request.step(rng.standard_normal(tokenizer.vocab_size).astype(np.float32)))
    calls = [d.tool_call for d in deltas if d.tool_call]
    assert len(calls) == 1 and deltas[-1].finish_reason == "stop" and "".join(d.text for d in deltas) == ""
    call = parse_call(calls[0], ["get_weather", "now"])
    assert call is not None
    name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
    if isinstance(choice, dict):
        assert name == "get_weather"
    schema = WEATHER["parameters"] if name == "get_weather" else {"type": "object", "maxProperties": 0}
    jsonschema.validate(arguments, schema)
