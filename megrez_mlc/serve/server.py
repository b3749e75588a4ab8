"""`megrez-mlc serve`: the OpenAI API over HTTP (FastAPI + uvicorn), answered by the continuous-batching
`Scheduler`.

    GET  /v1/models              the one model served
    POST /v1/chat/completions    messages, rendered with the model's chat template
    POST /v1/completions         a raw prompt (text or token ids), no template
    GET  /health                 requests running and waiting, the KV cache's sequences and pages
    GET  /metrics                counters, latency histograms and the same state, for Prometheus

Both completion endpoints stream Server-Sent Events (`data: {chunk}` ... `data: [DONE]`) with
"stream": true. A streaming client that disconnects cancels its request. Errors are OpenAI's error
objects: 400 bad input, 401 a wrong or missing API key, 404 an unknown model or path, 413 a body too
large, 429 the queue is full (with Retry-After), 500 the engine failed.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import MegrezError
from ..runtime.engine import PromptTooLong
from ..runtime.grammar import Grammar, GrammarError
from ..runtime.media import MediaAccess
from ..runtime.request import StreamDelta
from ..runtime.sampling import SamplingParams, TokenLogprob
from .logprobs import chat_logprobs, completion_logprobs
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    RequestBody,
    ResponseFormat,
    validation_error,
)
from .scheduler import QueueFull, Scheduler, Ticket
from .tools import forced_call_grammar, parse_call, template_messages, unparsed_call
from .transcriptions import read_transcription_form

log = logging.getLogger("megrez_mlc")

# Request bodies larger than this are refused (413): a prompt that fills Megrez's 32k-token context window
# is a few hundred kB of JSON, even with every character \u-escaped; images come base64-encoded, and one of
# the largest accepted (omni/images.py MAX_IMAGE_BYTES) takes 4/3 of its size.
MAX_BODY_BYTES = 48 * 2**20
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


def create_app(
    scheduler: Scheduler,
    model_name: str,
    *,
    api_key: str | None = None,
    allowed_media_dir: Path | None = None,
) -> FastAPI:
    """The HTTP API over a started scheduler. Images come as data: URIs, or as local files when
    `allowed_media_dir` is given (only files under it); nothing is fetched from the network."""
    media = MediaAccess(local_files=allowed_media_dir is not None, allowed_dir=allowed_media_dir)
    app = FastAPI(title="megrez-mlc", docs_url=None, redoc_url=None, openapi_url=None)
    engine = scheduler.engine
    created = int(time.time())

    if api_key is not None:
        app.add_middleware(RequireAPIKey, api_key=api_key)

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return _error_response(
            APIError(err.status_code, f"{request.method} {request.url.path}: {err.detail}", code=code)
        )

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("error answering %s %s", request.method, request.url.path)
        return _error_response(APIError(500, f"internal error: {err}", type="server_error"))

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": created, "owned_by": "megrez-mlc"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, **scheduler.status()}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(scheduler.metrics_text(), media_type=PROMETHEUS_TEXT)

    def check_model(name: str) -> None:
        if name != model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {model_name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(body: RequestBody, grammar: Grammar | None = None, **tools: bool) -> SamplingParams:
        """The request's settings over the model's defaults (mlc-chat-config.json)."""
        logprobs, top_logprobs = body.logprob_settings
        try:
            return engine.default_sampling(
                grammar=grammar,
                **tools,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
                max_tokens=body.token_limit or engine.max_single_sequence_length,
                temperature=body.temperature,
                top_p=body.top_p,
                top_k=body.top_k,
                repetition_penalty=body.repetition_penalty,
                seed=body.seed,
                stop=body.stop_strings(),
                ignore_eos=body.ignore_eos,
            )
        except MegrezError as err:
            raise APIError(400, str(err)) from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _parse(request, ChatCompletionRequest)
        check_model(body.model)
        messages = template_messages(body, engine.conversation.system_message)
        prompt_ids = await _tokenize(lambda m: engine.encode_chat(m, media), messages, "messages")
        forced_call = forced_call_grammar(body)
        grammar = forced_call or response_grammar(body.response_format)
        calls = bool(body.tools) and body.tool_choice != "none"
        params = sampling(body, grammar, tool_calls=calls, parallel_tool_calls=body.parallel_tool_calls)
        answer = _Answer(scheduler, "chat.completion", "chatcmpl", model_name)
        answer.function_names = [tool.function.name for tool in body.tools or []] if calls else []
        grammar_param = "tools" if forced_call else "response_format"
        return await _answer(request, body, answer, prompt_ids, engine.chat_sampling(params), grammar_param)

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Any:
        form = await read_transcription_form(request)
        check_model(form.model)
        prompt_ids = await _tokenize(lambda m: engine.encode_chat(m, media), [form.message()], "file")
        params = engine.default_sampling(
            temperature=form.temperature,
            repetition_penalty=1.0,  # a transcript repeats what was said
            max_tokens=engine.max_single_sequence_length,
        )
        answer = _Answer(scheduler, "chat.completion", "chatcmpl", model_name)
        await answer.submit(prompt_ids, engine.chat_sampling(params), "file")
        whole = await answer.whole(request)
        text = whole["choices"][0]["message"]["content"]
        if form.response_format == "text":
            return PlainTextResponse(text)
        usage = whole["usage"]
        tokens = {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"]}
        return {"text": text, "usage": {"type": "tokens", **tokens, "total_tokens": usage["total_tokens"]}}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await _parse(request, CompletionRequest)
        check_model(body.model)
        prompt = body.prompt
        if isinstance(prompt, str):
            prompt = await _tokenize(engine.tokenizer.encode, prompt, "prompt")
        params = sampling(body, response_grammar(body.response_format))
        answer = _Answer(scheduler, "text_completion", "cmpl", model_name)
        return await _answer(request, body, answer, prompt, params, "response_format")

    async def _answer(
        request: Request,
        body: RequestBody,
        answer: _Answer,
        prompt_ids: list[int],
        params: SamplingParams,
        grammar_param: str,
    ) -> Any:
        await answer.submit(prompt_ids, params, grammar_param)
        if body.stream:
            return StreamingResponse(answer.events(body.include_usage), media_type="text/event-stream")
        return await answer.whole(request)

    return app


def response_grammar(response_format: ResponseFormat | None) -> Grammar | None:
    """The grammar a `response_format` asks for: None for text, any JSON object, or a JSON schema."""
    if response_format is None or response_format.type == "text":
        return None
    schema = response_format.wanted_schema()
    try:
        return Grammar.json_object() if schema is None else Grammar.json_schema(schema)
    except GrammarError as err:
        raise APIError(400, f"response_format: {err}", param="response_format") from None


class _Answer:
    """One request's deltas, carried from the engine thread onto the event loop, as OpenAI's objects."""

    def __init__(self, scheduler: Scheduler, kind: str, prefix: str, model_name: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.deltas: asyncio.Queue[StreamDelta] = asyncio.Queue()
        self.scheduler = scheduler
        self.sent_ids: list[int] = []  # tokens whose logprobs have gone out (a completion's text offsets)
        self.function_names: list[str] = []  # the functions the answer may call
        self.calls = 0  # tool calls parsed so far
        self.kind, self.id, self.model_name = kind, f"{prefix}-{uuid.uuid4().hex}", model_name
        self.created = int(time.time())

    async def submit(self, prompt_ids: list[int], params: SamplingParams, grammar_param: str) -> None:
        """Queue the request (on a worker thread: compiling a grammar can take a while); errors are 4xx."""
        self.params = params
        try:
            submit = self.scheduler.submit
            self.ticket: Ticket = await asyncio.to_thread(submit, prompt_ids, params, self._put)
        except QueueFull as err:
            raise APIError(
                429, str(err), type="rate_limit_exceeded", headers={"Retry-After": str(err.retry_after)}
            ) from None
        except GrammarError as err:
            raise APIError(
                400, f"{grammar_param}: the grammar engine cannot use this schema: {err}", param=grammar_param
            ) from None
        except MegrezError as err:
            code = "context_length_exceeded" if isinstance(err, PromptTooLong) else None
            param = "messages" if self.kind == "chat.completion" else "prompt"
            raise APIError(400, str(err), param=param, code=code) from None

    def _put(self, delta: StreamDelta) -> None:  # on the engine thread
        self.loop.call_soon_threadsafe(self.deltas.put_nowait, delta)

    @property
    def usage(self) -> dict[str, Any]:
        request = self.ticket.request
        prompt, completion = len(request.prompt_ids), len(request.output_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": self.ticket.cached_tokens},
        }

    def _failure(self) -> APIError:
        return APIError(500, self.ticket.error or "the request was cancelled", type="server_error")

    async def whole(self, request: Request) -> dict[str, Any]:
        """The complete answer (cancelled if the client goes away while waiting)."""
        text, logprobs, calls = [], [], []
        try:
            while True:
                try:
                    delta = await asyncio.wait_for(self.deltas.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        self.scheduler.cancel(self.ticket)
                        raise APIError(499, "the client closed the connection") from None
                    continue
                content, parsed = self._split(delta)
                text.append(content)
                calls += parsed
                logprobs += [delta.logprob] if delta.logprob else []
                if delta.finish_reason is not None:
                    break
        except asyncio.CancelledError:
            self.scheduler.cancel(self.ticket)
            raise
        if delta.finish_reason not in ("stop", "length"):
            raise self._failure()
        choice = self._choice("".join(text), self._finish_reason(delta), self._logprobs(logprobs), calls)
        return {**self._head(), "choices": [choice], "usage": self.usage}

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        """Server-Sent Events: a chunk per text delta, the finish reason, usage if asked, then [DONE]."""
        finished, logprobs = False, []  # logprobs: of tokens whose text is held back (a stop string's start?)
        try:
            if self.kind == "chat.completion":
                yield _sse(self._chunk({"role": "assistant", "content": ""}, None))
            while not finished:
                delta = await self.deltas.get()
                finished = delta.finish_reason is not None
                if finished and delta.finish_reason not in ("stop", "length"):
                    yield _sse(self._failure().body)
                    return
                logprobs += [delta.logprob] if delta.logprob else []
                text, calls = self._split(delta)
                for call in calls:  # as OpenAI streams a call: its id and name, then its arguments
                    head = {**call, "function": {"name": call["function"]["name"], "arguments": ""}}
                    yield _sse(self._chunk({"tool_calls": [head]}, None))
                    rest = {"index": call["index"], "function": {"arguments": call["function"]["arguments"]}}
                    yield _sse(self._chunk({"tool_calls": [rest]}, None))
                if text or finished:
                    content = {"content": text} if text else {}
                    yield _sse(self._chunk(content, self._finish_reason(delta), self._logprobs(logprobs)))
                    logprobs = []
            if include_usage:
                yield _sse({**self._head(chunk=True), "choices": [], "usage": self.usage})
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (or the server is stopping): free the sequence now
                self.scheduler.cancel(self.ticket)

    def _split(self, delta: StreamDelta) -> tuple[str, list[dict[str, Any]]]:
        """A delta's text and the tool calls it ends (with their index in the answer); a call that does not
        parse is text."""
        if delta.tool_call is None:
            return delta.text, []
        call = parse_call(delta.tool_call, self.function_names)
        if call is None:
            return delta.text + unparsed_call(delta.tool_call), []
        self.calls += 1
        return delta.text, [{"index": self.calls - 1, **call}]

    def _finish_reason(self, delta: StreamDelta) -> str | None:
        """OpenAI's: an answer that stopped after calling functions finished with "tool_calls"."""
        return "tool_calls" if delta.finish_reason == "stop" and self.calls else delta.finish_reason

    def _head(self, chunk: bool = False) -> dict[str, Any]:
        kind = self.kind + (".chunk" if chunk and self.kind == "chat.completion" else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name}

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        """The choice's `logprobs` for these tokens (the next ones of the answer), None unless asked for."""
        if not self.params.logprobs:
            return None
        tokenizer = self.scheduler.engine.tokenizer
        if self.kind == "chat.completion":
            return chat_logprobs(tokenizer, entries)
        shaped = completion_logprobs(tokenizer, entries, self.sent_ids, self.params.top_logprobs)
        self.sent_ids += [entry.token_id for entry in entries]
        return shaped

    def _choice(
        self, text: str, finish_reason: str | None, logprobs: Any, calls: list[dict[str, Any]]
    ) -> dict[str, Any]:
        if self.kind == "chat.completion":
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:  # OpenAI leaves out the content of an answer that only calls
                message |= {"content": text if text.strip() else None, "tool_calls": calls}
                for call in calls:
                    del call["index"]
            return {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    def _chunk(
        self, delta: dict[str, Any], finish_reason: str | None, logprobs: Any = None
    ) -> dict[str, Any]:
        if self.kind == "chat.completion":
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {
                "index": 0,
                "text": delta.get("content", ""),
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        return {**self._head(chunk=True), "choices": [choice]}


class RequireAPIKey:
    """ASGI middleware: every HTTP request must carry `Authorization: Bearer <api_key>`. (Plain ASGI rather
    than FastAPI's http middleware, which wraps streamed responses and hides a client's disconnect.)"""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = (
                    "missing or wrong API key: send the header `Authorization: Bearer <key>` with the "
                    "server's --api-key"
                )
                response = _error_response(APIError(401, message, code="invalid_api_key"))
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _tokenize(encode: Callable[[Any], list[int]], text: Any, param: str) -> list[int]:
    """Token ids, on a worker thread (a long prompt takes a while); text the tokenizer refuses (a lone
    surrogate from JSON's "\\udcff") is the client's mistake, a 400."""
    try:
        return await asyncio.to_thread(encode, text)
    except MegrezError as err:
        raise APIError(400, str(err), param=param) from None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body, status_code=err.status, headers=err.headers)


async def _parse(request: Request, model: type[RequestBody]) -> Any:
    """The JSON body (at most MAX_BODY_BYTES) validated as `model`; an APIError says what is wrong."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is {declared} bytes; the limit is {MAX_BODY_BYTES}")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
    try:
        data = json.loads(raw)
    except ValueError as err:  # also bytes that are not UTF-8
        raise APIError(400, f"the body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def served_model_name(model: str) -> str:
    """What clients put in "model": the folder's name, or the repository of HF://org/name."""
    return model.rstrip("/").split("/")[-1] or model


def run_server(
    model: str,
    *,
    model_lib: Path | None = None,
    device: str = "cpu",
    quantization: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_num_sequence: int = 8,
    max_total_seq_len: int | None = None,
    prefill_chunk_size: int | None = None,
    max_queue: int = 64,
    prefix_cache: int | None = None,
    api_key: str | None = None,
    served_name: str | None = None,
    threads: int | None = None,
    allowed_media_dir: Path | None = None,
) -> None:
    """Prepare MODEL (as `chat` does), load it on the engine loop's thread and serve until Ctrl-C.
    `prefix_cache`: finished sequences kept for reuse (default: max_num_sequence; 0: none)."""
    import uvicorn

    from ..model_source import prepare_model
    from ..runtime.engine import Engine

    # Bound before the (slow) model load, so that a busy port or a wrong --host is one error line at once;
    # connections are refused, not left hanging, until uvicorn listens on it.
    listener = bind_listener(host, port)
    cached = max_num_sequence if prefix_cache is None else prefix_cache
    try:
        prepared = prepare_model(model, model_lib=model_lib, device=device, quantization=quantization)

        def load() -> Engine:
            return Engine(
                prepared.model_dir,
                prepared.model_lib,
                device,
                max_batch_size=max_num_sequence,
                max_total_seq_len=max_total_seq_len,
                prefill_chunk_size=prefill_chunk_size,
                threads=threads,
                max_sequences=max_num_sequence + cached,
            )

        scheduler = Scheduler(
            load, max_num_sequence=max_num_sequence, max_queue=max_queue, prefix_cache=cached
        ).start()
        name = served_name or served_model_name(model)
        try:
            app = create_app(scheduler, name, api_key=api_key, allowed_media_dir=allowed_media_dir)
            status = scheduler.status()
            log.info(
                "serving %s on http://%s:%d/v1 "
                "(%d sequences at once, %d-token KV cache, %d cached sequences, context %d tokens%s)",
                name,
                f"[{host}]" if ":" in host else host,
                port,
                max_num_sequence,
                status["kv_cache"]["max_total_seq_len"],
                cached,
                status["max_single_sequence_length"],
                ", API key required" if api_key else "",
            )
            config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
            uvicorn.Server(config).run(sockets=[listener])
        finally:
            scheduler.stop()
    finally:
        listener.close()


def bind_listener(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (not yet listening), or a MegrezError saying why it cannot be."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as err:
        raise MegrezError(
            f"cannot serve on --host {host}: {getattr(err, 'strerror', None) or err}; give an address or "
            "name of this machine (127.0.0.1 for this machine only, 0.0.0.0 for the network)"
        ) from None
    listener = socket.socket(family, kind, proto)
    # As uvicorn does: a restarted server may reuse the port while old connections linger in TIME_WAIT.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as err:
        listener.close()
        if err.errno == errno.EADDRINUSE:
            raise MegrezError(
                f"port {port} on {host} is already in use (another server?); stop it or choose another --port"
            ) from None
        hint = "ports below 1024 need root; " if err.errno == errno.EACCES and port < 1024 else ""
        raise MegrezError(
            f"cannot serve on {host}:{port}: {err.strerror}; {hint}choose another --host or --port"
        ) from None
    return listener
