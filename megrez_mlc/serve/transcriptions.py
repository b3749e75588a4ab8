"""`POST /v1/audio/transcriptions`: OpenAI's speech-to-text request (a multipart form with the audio file),
answered by the model itself with Megrez-3B-Omni's transcription prompt."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from ..omni.audio import MAX_AUDIO_BYTES
from .protocol import APIError

ASR_PROMPT = "将语音转化为文字。"  # "turn the speech into text", the vendor's transcription instruction
RESPONSE_FORMATS = ("json", "text")
MAX_FORM_FIELDS = 16


@dataclass(frozen=True)
class TranscriptionForm:
    model: str
    audio: bytes
    filename: str
    response_format: str
    temperature: float

    def message(self) -> dict[str, Any]:
        """The user message that asks the model for the transcript: the clip, then the instruction."""
        clip = {"data": base64.b64encode(self.audio).decode(), "format": self.filename.rpartition(".")[2]}
        parts = [{"type": "input_audio", "input_audio": clip}, {"type": "text", "text": ASR_PROMPT}]
        return {"role": "user", "content": parts}


def _field(form: Any, name: str, default: str | None = None) -> str:
    value = form.get(name, default)
    if not isinstance(value, str):
        raise APIError(400, f"the form needs a text field {name!r}", param=name)
    return value


async def read_transcription_form(request: Request) -> TranscriptionForm:
    """The request's form fields, checked: `file` (the audio), `model`, and optional `response_format`
    (json or text) and `temperature`. `language` and `prompt` are accepted and not used: the model hears
    the language itself, and its transcription prompt is fixed."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "send the audio as multipart/form-data with a `file` field (and `model`)")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_AUDIO_BYTES + 2**20:
        raise APIError(413, f"the upload is {declared} bytes; the audio limit is {MAX_AUDIO_BYTES} bytes")
    try:
        form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    except Exception as err:  # starlette's MultiPartException and python-multipart's parse errors
        raise APIError(400, f"the multipart form could not be read: {err}") from None
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "the form needs a `file` field holding the audio file", param="file")
    audio = await upload.read(MAX_AUDIO_BYTES + 1)
    if len(audio) > MAX_AUDIO_BYTES:
        raise APIError(413, f"the audio file is over the {MAX_AUDIO_BYTES // 2**20} MiB limit", param="file")
    response_format = _field(form, "response_format", "json")
    if response_format not in RESPONSE_FORMATS:
        raise APIError(
            400,
            f"response_format {response_format!r} is not supported; use one of {', '.join(RESPONSE_FORMATS)}",
            param="response_format",
        )
    try:
        temperature = float(_field(form, "temperature", "0"))
    except ValueError:
        temperature = math.nan
    if not 0 <= temperature <= 2:
        raise APIError(400, "temperature must be a number from 0 to 2", param="temperature")
    return TranscriptionForm(
        _field(form, "model"), audio, upload.filename or "audio", response_format, temperature
    )
