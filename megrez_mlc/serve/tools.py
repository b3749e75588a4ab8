"""OpenAI's tools in Megrez's function-calling format (conversation.py): the functions rendered into the
system message, earlier calls and their results rendered back as Megrez's own turns, a forced call
(`tool_choice` "required" or a named function) constrained by a grammar, and the calls the model writes
parsed into `tool_calls`.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from ..conversation import FUNCTION_CALL_MARKERS, render_call, render_functions
from ..runtime.grammar import JSON_WHITESPACE, Grammar
from .protocol import APIError, ChatCompletionRequest, ChatMessage, NamedToolChoice


def template_messages(body: ChatCompletionRequest, default_system: str) -> list[dict[str, Any]]:
    """The request's messages as the chat template takes them ({"role", "content"}), the functions on
    offer after the system message (the model's default one when the request has none)."""
    messages = [_template_message(message, n) for n, message in enumerate(body.messages)]
    functions = offered_functions(body)
    if functions:
        if messages[0]["role"] == "system":
            messages[0]["content"] = render_functions(messages[0]["content"], functions)
        else:
            messages.insert(0, {"role": "system", "content": render_functions(default_system, functions)})
    return messages


def _template_message(message: ChatMessage, n: int) -> dict[str, Any]:
    """One message: "developer" is OpenAI's newer "system"; an assistant's calls follow its text; a user
    message with images or audio keeps its parts (text, image_url, input_audio) for the engine to encode."""
    if message.has_media:
        if message.role != "user":
            raise APIError(
                400, f"messages.{n}: only user messages may hold images or audio", param="messages"
            )
        parts = [part.model_dump(exclude_none=True) for part in message.content]
        return {"role": "user", "content": parts}
    content = message.text
    for k, call in enumerate(message.tool_calls or []):
        param = f"messages.{n}.tool_calls.{k}.function.arguments"
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            message = f"{param} is not JSON: {call.function.arguments!r}"[:300]
            raise APIError(400, message, param=param) from None
        content += render_call(call.function.name, arguments)
    return {"role": "system" if message.role == "developer" else message.role, "content": content}


def offered_functions(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The functions the model is told about, also with tool_choice "none" (which only means no call is
    parsed): a client that switches tool_choice between turns keeps its conversation's cached prefix."""
    return [tool.function.model_dump(exclude_none=True, exclude={"strict"}) for tool in body.tools or []]


def forced_call_grammar(body: ChatCompletionRequest) -> Grammar | None:
    """With tool_choice "required" or a named function: the answer is calls (one, unless parallel calls are
    allowed) whose arguments match the function's parameter schema; None when the model may answer freely."""
    choice, tools = body.tool_choice, body.tools or []
    if isinstance(choice, NamedToolChoice):
        functions = [t.function for t in tools if t.function.name == choice.function.name]
    elif choice == "required":
        functions = [t.function for t in tools]
    else:
        return None
    no_parameters = {"type": "object", "properties": {}, "additionalProperties": False}  # as OpenAI reads it
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f.name},
                "arguments": f.parameters if f.parameters is not None else no_parameters,
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    call["x-guidance"] = {"whitespace_pattern": JSON_WHITESPACE}
    start, end = FUNCTION_CALL_MARKERS
    repeat = "+" if body.parallel_tool_calls else ""
    return Grammar.lark(f"start: call{repeat}\ncall: {start} %json {json.dumps(call)} {end}\n")


def parse_call(text: str, names: list[str]) -> dict[str, Any] | None:
    """An OpenAI tool call for a call's text (between the markers), or None when it is not JSON of the form
    {"name": <a function on offer>, "arguments": {...}}."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not (isinstance(call, dict) and call.get("name") in names and isinstance(call.get("arguments"), dict)):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
    }


def unparsed_call(text: str) -> str:
    """A call that could not be parsed, as the answer's text: what the model wrote, markers included."""
    start, end = FUNCTION_CALL_MARKERS
    return start + text + end
