"""Images and audio in prompts: where they come from, their encoding, and the ids that stand for their
embeddings.

An encoded image is `query_num` embeddings per slice, an encoded clip about 25 per second of audio. In a
prompt, each embedding row takes the place of one filler token of the placeholder, as a *media id*: a
negative integer that no vocabulary has. The model library looks media ids up here when it embeds a prompt
and writes the rows in. Because the ids are part of the token list, everything that compares token lists
(a chat session's cache reuse across turns, the server's prefix cache, a preempted request's re-prefill)
tells two images (or clips) apart and sees one sent twice as the same tokens: each gets its ids from the
digest of its pixels (or samples).
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MegrezError
from ..omni.audio import MAX_AUDIO_BYTES, clip_features, decode_audio, read_audio_bytes, split_clip
from ..omni.config import AudioProcessorConfig, ImageProcessorConfig, VisionConfig
from ..omni.images import (
    decode_image,
    embedding_spans,
    max_slice_patches,
    placeholder_ids,
    read_image_file,
    slice_image,
    slice_inputs,
)

MEDIA_CACHE_ITEMS = 64  # encoded images and clips kept for reuse; older ones are encoded again if sent again


class MediaError(MegrezError):
    """An image or clip the request gives cannot be used (the server answers 400)."""


class MediaStore:
    """Embedding rows by media id, grouped by the digest of an image or clip, the least recently used one
    dropped first."""

    def __init__(self, capacity: int = MEDIA_CACHE_ITEMS) -> None:
        self.capacity = capacity
        self._images: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._rows: dict[int, np.ndarray] = {}
        self._next_id = -1
        self._lock = threading.Lock()  # the server's request threads add while its scheduler reads

    def ids(self, digest: str) -> list[int] | None:
        """The media ids of an image already encoded, None if it is not here."""
        with self._lock:
            ids = self._images.get(digest)
            if ids is not None:
                self._images.move_to_end(digest)
            return ids

    def add(self, digest: str, rows: np.ndarray) -> list[int]:
        with self._lock:
            ids = list(range(self._next_id, self._next_id - len(rows), -1))
            self._next_id -= len(rows)
            self._images[digest] = ids
            self._rows.update(zip(ids, rows))
            while len(self._images) > self.capacity:
                _, dropped = self._images.popitem(last=False)
                for media_id in dropped:
                    del self._rows[media_id]
            return ids

    def knows(self, media_id: int) -> bool:
        return media_id in self._rows

    def rows(self, media_ids: np.ndarray) -> np.ndarray:
        try:
            with self._lock:
                return np.stack([self._rows[int(i)] for i in media_ids])
        except KeyError:
            raise MegrezError(
                "the prompt refers to an image or clip whose embeddings are no longer kept; send it again"
            ) from None


def is_media_id(token: int) -> bool:
    return token < 0


# --- where images come from --------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaAccess:
    """Which image sources a caller may use: data: URIs always; local files when `local_files`, and then
    only under `allowed_dir` when one is given. Nothing is ever fetched from the network."""

    local_files: bool = True
    allowed_dir: Path | None = None


LOCAL_ACCESS = MediaAccess()  # the Python API and the CLI: the user's own files


def _data_uri_bytes(url: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise MediaError("an image data: URI must be base64 (data:image/png;base64,...)")
    mime = header[len("data:") : -len(";base64")]
    if mime and not mime.startswith("image/"):
        raise MediaError(f"the data: URI holds {mime}, not an image")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the image data: URI is not valid base64") from None


def _local_path(url: str, access: MediaAccess) -> Path:
    path = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url)
    if not access.local_files:
        raise MediaError(
            "local image files are not allowed here; send the image as a data: URI, or start the server "
            "with --allowed-media-dir DIR"
        )
    if access.allowed_dir is not None:
        resolved, allowed = path.resolve(), access.allowed_dir.resolve()
        if not resolved.is_relative_to(allowed):
            raise MediaError(f"image {path} is outside the allowed media folder {allowed}")
    if not path.is_file():
        raise MediaError(f"image {path} not found")
    return path


def load_image(url: str, access: MediaAccess = LOCAL_ACCESS):
    """An image_url's image as a Pillow RGB image: a data: URI, a file:// URL or a path."""
    if not isinstance(url, str) or not url:
        raise MediaError('an image_url part needs a "url" string')
    scheme = url.split(":", 1)[0].lower() if ":" in url[:10] else ""
    if scheme in ("http", "https", "ftp"):
        raise MediaError("images are never fetched from the network; send it as a data: URI")
    try:
        if scheme == "data":
            return decode_image(_data_uri_bytes(url))
        return read_image_file(_local_path(url, access))
    except MediaError:
        raise
    except MegrezError as err:
        raise MediaError(str(err)) from None


def image_url_of(part: dict[str, Any]) -> str:
    """The URL of an OpenAI `image_url` content part ({"image_url": {"url": ...}} or {"image_url": "..."})."""
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str):
        raise MediaError('an image_url part needs {"image_url": {"url": "data:image/...;base64,..."}}')
    return url


def load_audio(part: dict[str, Any]) -> np.ndarray:
    """An OpenAI `input_audio` part's clip ({"input_audio": {"data": base64, "format": "wav"}}) as 16 kHz
    mono samples. The format is a hint only: the decoder reads what the bytes are."""
    value = part.get("input_audio")
    if not isinstance(value, dict) or not isinstance(value.get("data"), str):
        raise MediaError('an input_audio part needs {"input_audio": {"data": "<base64>", "format": "wav"}}')
    if not isinstance(value.get("format", ""), str):
        raise MediaError('an input_audio part\'s "format" must be a string such as "wav" or "mp3"')
    if len(value["data"]) > MAX_AUDIO_BYTES * 4 // 3 + 4:
        raise MediaError(f"the audio is larger than the {MAX_AUDIO_BYTES // 2**20} MiB limit")
    try:
        return decode_audio(base64.b64decode(value["data"], validate=True))
    except (binascii.Error, ValueError):
        raise MediaError("the input_audio data is not valid base64") from None
    except MegrezError as err:
        raise MediaError(str(err)) from None


def audio_file_part(path: str | Path) -> dict[str, Any]:
    """An `input_audio` content part holding a local audio file."""
    path = Path(path)
    data = read_audio_bytes(path)
    clip = {"data": base64.b64encode(data).decode(), "format": path.suffix[1:]}
    return {"type": "input_audio", "input_audio": clip}


def count_clips(content: str | list[dict[str, Any]]) -> int:
    """How many audio clips a message's content carries."""
    if isinstance(content, str):
        return 0
    return sum(isinstance(part, dict) and part.get("type") == "input_audio" for part in content)


def content_with_media(
    text: str, images: list[str | Path] = (), audios: list[str | Path] = ()
) -> str | list[dict[str, Any]]:
    """A user message's content: the images (paths), the audio files, then the text, as OpenAI-style parts;
    plain text when there are neither."""
    if not images and not audios:
        return text
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": str(p)}} for p in images]
    parts += [audio_file_part(p) for p in audios]
    return [*parts, {"type": "text", "text": text}] if text else parts


# --- encoding -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EncodedImage:
    prompt_ids: list[int]  # the placeholder, its filler tokens replaced by the image's media ids
    slices: int
    seconds: float  # spent in image_embed (0 when the image was already encoded)


class ImageEncoder:
    """Slices an image, runs each slice through the library's image_embed, keeps the rows in the store."""

    def __init__(
        self, model, vision: VisionConfig, processor: ImageProcessorConfig, newline_ids: list[int]
    ) -> None:
        self.model = model  # a ModelLibrary with image_embed
        self.vision = vision
        self.processor = processor
        self.newline_ids = newline_ids

    def encode(self, image) -> EncodedImage:
        sliced = slice_image(image, self.processor)
        ids = placeholder_ids(sliced.grid, self.processor, self.newline_ids)
        spans = embedding_spans(ids, self.processor)
        digest = hashlib.sha256(np.asarray(image).tobytes() + repr(image.size).encode()).hexdigest()
        media_ids = self.model.media.ids(digest)
        seconds = 0.0
        if media_ids is None:
            start = time.perf_counter()
            rows = [self.encode_slice(pixels) for pixels in sliced.all_slices]
            seconds = time.perf_counter() - start
            media_ids = self.model.media.add(digest, np.concatenate(rows))
        it = iter(media_ids)
        for begin, end in spans:
            ids[begin:end] = [next(it) for _ in range(end - begin)]
        return EncodedImage(ids, len(sliced.all_slices), seconds)

    def encode_slice(self, pixels: np.ndarray) -> np.ndarray:
        inputs = slice_inputs(pixels, self.vision, self.model.hidden_size)
        limit = max_slice_patches(self.processor)
        if len(inputs.position_ids) > limit:
            raise MediaError(
                f"the image is too elongated: a slice of {inputs.rows}x{inputs.cols} patches is more than "
                f"the {limit} the library was compiled for; crop it closer to a square"
            )
        return self.model.image_embed(inputs)


@dataclass(frozen=True)
class EncodedAudio:
    prompt_ids: list[int]  # each chunk's placeholder, its filler tokens replaced by the clip's media ids
    chunks: int
    duration: float  # seconds of audio
    seconds: float  # spent in audio_embed (0 when the clip was already encoded)


class AudioEncoder:
    """Cuts a clip into 30-second chunks, runs each through the library's audio_embed, keeps the rows in the
    store."""

    def __init__(self, model, processor: AudioProcessorConfig) -> None:
        self.model = model  # a ModelLibrary with audio_embed
        self.processor = processor

    def encode(self, samples: np.ndarray) -> EncodedAudio:
        features = [clip_features(chunk, self.processor.n_mels) for chunk in split_clip(samples)]
        digest = "audio " + hashlib.sha256(np.ascontiguousarray(samples, np.float32).tobytes()).hexdigest()
        media_ids = self.model.media.ids(digest)
        seconds = 0.0
        if media_ids is None:
            start = time.perf_counter()
            rows = [self.model.audio_embed(f.mel) for f in features]
            seconds = time.perf_counter() - start
            media_ids = self.model.media.add(digest, np.concatenate(rows))
        ids, it = [], iter(media_ids)
        begin, end = (
            self.processor.token_ids[self.processor.audio_start],
            self.processor.token_ids[self.processor.audio_end],
        )
        for f in features:
            ids += [begin, *(next(it) for _ in range(f.tokens)), end]
        return EncodedAudio(ids, len(features), sum(f.seconds for f in features), seconds)
