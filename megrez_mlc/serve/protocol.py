"""The OpenAI API's request bodies (the fields this server honours) and its error objects.

Bodies are validated strictly: a field of the wrong type ("max_tokens": "5"), a value out of range or a
feature this server does not have (n > 1, tools, echo...) is a 400 with the field named, never
silently ignored. Fields that do not change the answer (user, metadata...) and unknown fields are ignored,
as OpenAI's clients send some. Extensions beyond OpenAI's fields, as vLLM and MLC-LLM accept them:
top_k, repetition_penalty, ignore_eos.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..runtime.sampling import MAX_TOP_LOGPROBS

TopLogprobs = Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS)]


class APIError(Exception):
    """An error answered as OpenAI does: HTTP status + {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type, "param": param, "code": code}}
        self.headers = headers


UNION_TAG = re.compile(r"str|int|float|bool|[\w-]+\[.*\]")


def validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as one 400 naming the field."""
    first = err.errors()[0]
    # Drop the tags pydantic adds for the member of a union it tried ("str", "list[TextPart]").
    param = ".".join(str(p) for p in first["loc"] if not UNION_TAG.fullmatch(str(p))) or None
    message = first["msg"]
    if "input" in first and first["type"] != "missing":
        message += f", got {first['input']!r}"[:200]
    return APIError(400, f"{param}: {message}" if param else message, param=param)


# Fields that would change the answer in ways this server cannot honour, with the value that is harmless.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "logit_bias": (None, {}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}


class RequestBody(BaseModel):
    # strict: "5" is not an int and 1 is not a bool; extra fields are ignored (clients send some).
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, harmless in UNSUPPORTED.items():
                if name in data and data[name] not in harmless:
                    raise APIError(400, f"{name} is not supported by this server", param=name)
            if data.get("n", 1) != 1:
                raise APIError(400, "n must be 1: this server returns one choice per request", param="n")
        return data

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart]

    def as_template_message(self) -> dict[str, str]:
        """{"role", "content"} for the conversation template; "developer" is OpenAI's newer "system"."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(RequestBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, 'top_logprobs needs "logprobs": true', param="top_logprobs")
        return self

    @property
    def logprob_settings(self) -> tuple[bool, int]:
        """Whether to return logprobs, and how many likeliest tokens with each."""
        return self.logprobs, self.top_logprobs or 0

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(RequestBody):
    prompt: Any  # a text or a list of token ids (checked below, for one clear message)
    logprobs: TopLogprobs | None = None  # the legacy API's: how many likeliest tokens with each token

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        prompt = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # OpenAI's batch form holding one prompt
        token_ids = isinstance(prompt, list) and all(type(t) is int and t >= 0 for t in prompt)
        if not (isinstance(prompt, str) or (token_ids and prompt)):
            raise APIError(
                400,
                "prompt must be a string or a non-empty list of token ids (one prompt per request)",
                param="prompt",
            )
        self.prompt = prompt
        return self

    @property
    def token_limit(self) -> int | None:
        return self.max_tokens

    @property
    def logprob_settings(self) -> tuple[bool, int]:
        """Whether to return logprobs, and how many likeliest tokens with each (legacy `logprobs`: N)."""
        return self.logprobs is not None, self.logprobs or 0


RequestBody.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
