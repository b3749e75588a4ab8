"""The chat format: one conversation-template object in MLC's `conv_template` shape.

Megrez's own Jinja template (tokenizer_config.json) renders every message as
`<|role_start|>{role}<|role_end|>{content}<|turn_end|>`, prepends a default system message when the
first message is not a system message, and ends a prompt with `<|role_start|>assistant<|role_end|>`.
The `megrez` template below encodes exactly that in MLC's fields, so MLC's engine renders it the same.

Function calls are Megrez's own, as its published web-search agent drives them: the functions' JSON
definitions follow the system message; the model writes `<|function_start|>{"name": ..., "arguments":
{...}}<|function_end|>` (each marker one special token) in its answer; a function's result comes back as a
turn of the role `observation`, which OpenAI's messages call `tool`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .errors import MegrezError

MEGREZ_DEFAULT_SYSTEM = "你是Megrez-3B-Instruct，将针对用户的问题给出详细的、积极的回答。"
# Stop strings, in the order their token ids are looked up in the tokenizer. `<|turn_end>` is a
# malformed variant one Hugging Face revision of the tokenizer used as eos.
MEGREZ_STOP_TOKENS = ("<|turn_end|>", "<|eos|>", "<|turn_end>")
FUNCTION_CALL_MARKERS = ("<|function_start|>", "<|function_end|>")
FUNCTIONS_PREAMBLE = "You have access to the following functions. Use them if required -\n"


def render_functions(system_message: str, functions: list[dict[str, Any]]) -> str:
    """A system message followed by the functions the model may call (OpenAI's `function` objects)."""
    definitions = "\n\n".join(json.dumps(f, indent=4, ensure_ascii=False) for f in functions)
    return f"{system_message}\n{FUNCTIONS_PREAMBLE}{definitions}"


def render_call(name: str, arguments: Any) -> str:
    """One function call as the model writes it, markers included."""
    start, end = FUNCTION_CALL_MARKERS
    return start + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + end


def _role(name: str) -> str:
    return f"<|role_start|>{name}<|role_end|>"


@dataclass
class Conversation:
    """A chat format plus the messages of one conversation (MLC's conv_template schema)."""

    name: str
    system_template: str
    system_message: str
    roles: dict[str, str]
    role_templates: dict[str, str]
    seps: list[str]
    role_content_sep: str = ""
    role_empty_sep: str = ""
    stop_str: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    system_prefix_token_ids: list[int] | None = None
    add_role_after_system_message: bool = True
    function_string: str = ""
    use_function_calling: bool = False
    messages: list[list[str | None]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Conversation:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # --- rendering -----------------------------------------------------------------------------------------

    def render_system(self, system_message: str | None = None) -> str:
        message = self.system_message if system_message is None else system_message
        return self.system_template.replace("{system_message}", message)

    def message_parts(self, role: str) -> tuple[str, str]:
        """The text before and after a message's content: render_message is before + content + after.

        A chat session tokenizes these apart from the content, so an answer keeps the token ids it was
        generated as."""
        if role not in self.roles:
            raise MegrezError(f"unknown chat role {role!r}; use one of: system, {', '.join(self.roles)}")
        placeholder = f"{{{role}_message}}"
        before, _, after = self.role_templates.get(role, placeholder).partition(placeholder)
        return self.roles[role] + self.role_content_sep + before, after + self.seps[0]

    def render_message(self, role: str, content: str) -> str:
        if role == "system":
            return self.render_system(content)
        before, after = self.message_parts(role)
        return before + content + after

    def generation_prompt(self, role: str = "assistant") -> str:
        return self.roles[role] + self.role_empty_sep

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """OpenAI-style messages to the prompt text, as the model's chat template renders them."""
        parts = []
        # As in Megrez's Jinja template: the default system message goes before a first message that is
        # not a system message (and an empty conversation renders without one).
        if messages and messages[0]["role"] != "system":
            parts.append(self.render_system())
        parts += [self.render_message(m["role"], m["content"]) for m in messages]
        if add_generation_prompt:
            parts.append(self.generation_prompt())
        return "".join(parts)


def megrez_template(stop_token_ids: list[int] | None = None) -> Conversation:
    return Conversation(
        name="megrez",
        system_template=_role("system") + "{system_message}" + "<|turn_end|>",
        system_message=MEGREZ_DEFAULT_SYSTEM,
        roles={"user": _role("user"), "assistant": _role("assistant"), "tool": _role("observation")},
        role_templates={
            "user": "{user_message}",
            "assistant": "{assistant_message}",
            "tool": "{tool_message}",
        },
        seps=["<|turn_end|>"],
        stop_str=list(MEGREZ_STOP_TOKENS),
        stop_token_ids=list(stop_token_ids or []),
    )


TEMPLATES = {"megrez": megrez_template}


def get_template(name: str, stop_token_ids: list[int] | None = None) -> Conversation:
    try:
        return TEMPLATES[name](stop_token_ids)
    except KeyError:
        raise MegrezError(
            f"unknown conversation template {name!r}; choose one of: {', '.join(TEMPLATES)}"
        ) from None


# The Jinja chat template in Megrez-3B-Instruct's tokenizer_config.json, verbatim; the demo
# checkpoint carries it, and the tests check `Conversation.render` against transformers running it.
MEGREZ_JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|role_start|>system<|role_end|>" + MEGREZ_DEFAULT_SYSTEM + "<|turn_end|>' }}"
    "{% endif %}"
    "{{ '<|role_start|>' + message['role'] + '<|role_end|>' + message['content'] + '<|turn_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|role_start|>assistant<|role_end|>' }}{% endif %}"
)
