"""The OpenAI API's request bodies (the fields this server honours) and its error objects.

Bodies are validated strictly: a field of the wrong type ("max_tokens": "5"), a value out of range or a
feature this server does not have (n > 1, echo, logit_bias...) is a 400 with the field named, never
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
    "functions": (None, []),  # the API's old names for tools and tool_choice
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
    response_format: ResponseFormat | None = None

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


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: text, JSON mode, or JSON valid against `json_schema.schema`; MLC-LLM's
    form puts the schema (an object or its text) in `schema` directly."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None
    schema_: dict[str, Any] | str | None = Field(None, alias="schema")

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.wanted_schema() is None:
            raise APIError(
                400, 'a "json_schema" response_format needs json_schema.schema', param="response_format"
            )
        return self

    def wanted_schema(self) -> dict[str, Any] | str | None:
        """The schema the answer must match; None for any JSON object (or plain text)."""
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return self.schema_


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; every image is sliced the same way


class ImagePart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["image_url"]
    image_url: ImageURL


class InputAudio(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    data: str  # base64 of the audio file's bytes
    format: str  # "wav", "mp3", ...: a hint; the decoder reads what the bytes are


class AudioPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["input_audio"]
    input_audio: InputAudio


class CalledFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str  # JSON text, as OpenAI returns it


class ToolCall(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | ImagePart | AudioPart] | None = (
        None  # None only in an assistant message with tool calls
    )
    tool_calls: list[ToolCall] | None = None  # an assistant's calls; a tool message answers one of them

    @model_validator(mode="after")
    def _content_given(self) -> ChatMessage:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise APIError(400, f"a {self.role} message needs content", param="messages")
        return self

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content if isinstance(p, TextPart))
        return self.content or ""

    @property
    def has_media(self) -> bool:
        """Whether the content holds images or audio."""
        media = (ImagePart, AudioPart)
        return isinstance(self.content, list) and any(isinstance(p, media) for p in self.content)


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: Annotated[str, Field(pattern=FUNCTION_NAME)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(RequestBody):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, 'top_logprobs needs "logprobs": true', param="top_logprobs")
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) < len(names):
            raise APIError(400, "tools: two functions have the same name", param="tools")
        choice = self.tool_choice
        if choice not in (None, "none", "auto") and not names:
            raise APIError(400, "tool_choice needs tools to choose from", param="tool_choice")
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise APIError(
                400,
                f"tool_choice names the function {choice.function.name!r}, which is not in tools "
                f"({', '.join(names)})",
                param="tool_choice",
            )
        forced = choice not in (None, "none", "auto")
        if forced and self.response_format is not None and self.response_format.type != "text":
            raise APIError(
                400,
                "response_format cannot be combined with a tool_choice that forces a call",
                param="response_format",
            )
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
