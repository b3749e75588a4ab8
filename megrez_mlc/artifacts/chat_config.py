"""mlc-chat-config.json as a typed object: gen-config writes it, compile, the runtime, package and verify read
it. The fields and their names are MLC-LLM's, so MLC's engine and the MLCChat app read the same file.

`resolve_limits` is the one rule for the context window, the prefill chunk and the batch size, applied by
gen-config (from the checkpoint), compile (from this file) and the runtime (from the compiled library).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ModelConfig, read_json_object
from ..errors import MegrezError
from ..omni.config import AudioProcessorConfig, ImageProcessorConfig
from .files import CHAT_CONFIG_FILE

MLC_CHAT_CONFIG_VERSION = "0.1.0"
DEFAULT_MAX_BATCH_SIZE = 32  # sequences one batched call of a compiled library takes, unless --max-batch-size
# How MLC's tokenizer wrapper treats a byte-level BPE (Megrez's and Qwen2's kind) when it streams text.
BYTE_LEVEL_TOKENIZER_INFO = {
    "token_postproc_method": "byte_level",
    "prepend_space_in_encode": False,
    "strip_space_in_decode": False,
}


@dataclass(frozen=True)
class ChatConfig:
    """What a converted model folder says about itself, beyond its weights."""

    quantization: str
    model_config: ModelConfig  # its context_window_size is the model's
    prefill_chunk_size: int
    temperature: float
    top_p: float
    repetition_penalty: float
    tokenizer_files: tuple[str, ...]
    conv_template: dict[str, Any]  # MLC's conversation-template object (conversation.py reads it)
    pad_token_id: int
    bos_token_id: int | None
    eos_token_id: tuple[int, ...]
    image_processor: ImageProcessorConfig | None = None  # Megrez-3B-Omni's slicing and image placeholders
    audio_processor: AudioProcessorConfig | None = None  # and its audio placeholders

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    @property
    def context_window_size(self) -> int:
        return self.model_config.context_window_size

    @property
    def limits(self) -> Limits:
        """The sizes a library compiled from this config is built for (with compile's default batch)."""
        return Limits(self.context_window_size, self.prefill_chunk_size, DEFAULT_MAX_BATCH_SIZE)

    def replace(self, **changes: Any) -> ChatConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        """MLC's schema, the fields this project does not use at their MLC values."""
        model = self.model_config.to_mlc_dict()
        return {
            "version": MLC_CHAT_CONFIG_VERSION,
            "model_type": "llama",
            "quantization": self.quantization,
            "model_config": {**model, "prefill_chunk_size": self.prefill_chunk_size},
            "vocab_size": self.vocab_size,
            "context_window_size": self.context_window_size,
            "sliding_window_size": -1,
            "prefill_chunk_size": self.prefill_chunk_size,
            "attention_sink_size": -1,
            "tensor_parallel_shards": 1,
            "pipeline_parallel_stages": 1,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "tokenizer_files": list(self.tokenizer_files),
            "tokenizer_info": BYTE_LEVEL_TOKENIZER_INFO,
            "conv_template": self.conv_template,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id),
            **({"image_processor": self.image_processor.to_json()} if self.image_processor else {}),
            **({"audio_processor": self.audio_processor.to_json()} if self.audio_processor else {}),
        }

    @classmethod
    def from_json(cls, chat: dict[str, Any], path: Path) -> ChatConfig:
        try:
            return cls(
                quantization=chat["quantization"],
                # the top-level window is the one MLC's engine reads (package rewrites both)
                model_config=ModelConfig.from_mlc_dict(chat["model_config"]).replace(
                    context_window_size=int(chat["context_window_size"])
                ),
                prefill_chunk_size=int(chat["prefill_chunk_size"]),
                temperature=float(chat["temperature"]),
                top_p=float(chat["top_p"]),
                repetition_penalty=float(chat["repetition_penalty"]),
                tokenizer_files=tuple(chat.get("tokenizer_files", ())),
                conv_template=chat["conv_template"],
                pad_token_id=int(chat.get("pad_token_id", 0)),
                bos_token_id=chat.get("bos_token_id"),
                eos_token_id=tuple(chat.get("eos_token_id") or ()),
                image_processor=(
                    ImageProcessorConfig.from_json(chat["image_processor"])
                    if "image_processor" in chat
                    else None
                ),
                audio_processor=(
                    AudioProcessorConfig.from_json(chat["audio_processor"])
                    if "audio_processor" in chat
                    else None
                ),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise MegrezError(
                f"{path} is missing or garbles {err}; run `megrez-mlc gen-config` again"
            ) from None

    def write(self, folder: Path) -> None:
        (folder / CHAT_CONFIG_FILE).write_text(
            json.dumps(self.to_json(), indent=2, ensure_ascii=False), encoding="utf-8"
        )


def read_chat_config(model: Path) -> tuple[Path, ChatConfig]:
    """Accept a converted model folder or its mlc-chat-config.json; returns (folder, config)."""
    path = model / CHAT_CONFIG_FILE if model.is_dir() else model
    if not path.is_file():
        hint = (
            " (this looks like a Hugging Face checkpoint; run convert-weight and gen-config first)"
            if (model / "config.json").is_file()
            else ""
        )
        raise MegrezError(f"{path} not found{hint}; pass a folder made by `megrez-mlc gen-config`")
    return path.parent, ChatConfig.from_json(read_json_object(path, "run gen-config again"), path)


# --- limits -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The sizes a model library is built for: the longest sequence, the most tokens one prefill call takes,
    and the most sequences one batched call takes."""

    context_window_size: int
    prefill_chunk_size: int
    max_batch_size: int


def resolve_limits(
    defaults: Limits,
    *,
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    max_batch_size: int | None = None,
    compiled: str | None = None,
) -> Limits:
    """Requested sizes over `defaults`. A prefill chunk never exceeds the context window it serves: the
    default one is cut to the window, a requested one larger than it is refused. With `compiled` (the model
    library whose limits `defaults` are), a request must lie within them: a compiled library cannot grow."""
    if compiled is not None:
        _check_compiled(compiled, prefill_chunk_size, max_batch_size, defaults)
    for name, value in (
        ("context-window-size", context_window_size),
        ("prefill-chunk-size", prefill_chunk_size),
        ("max-batch-size", max_batch_size),
    ):
        if value is not None and value < 1:
            raise MegrezError(f"--{name} must be at least 1, got {value}")
    context = context_window_size or defaults.context_window_size
    if prefill_chunk_size is not None and prefill_chunk_size > context:
        raise MegrezError(
            f"--prefill-chunk-size {prefill_chunk_size} is larger than the context window "
            f"({context} tokens); use at most {context} or a larger --context-window-size"
        )
    return Limits(
        context_window_size=context,
        prefill_chunk_size=prefill_chunk_size or min(defaults.prefill_chunk_size, context),
        max_batch_size=max_batch_size or defaults.max_batch_size,
    )


def _check_compiled(library: str, prefill_chunk_size: int | None, max_batch_size: int | None, limits: Limits):
    chunk, batch = limits.prefill_chunk_size, limits.max_batch_size
    if prefill_chunk_size is not None and not 1 <= prefill_chunk_size <= chunk:
        raise MegrezError(
            f"a prefill chunk of {prefill_chunk_size} tokens does not fit {library}, compiled for chunks "
            f"of 1 to {chunk}; use at most {chunk} or compile with a larger --prefill-chunk-size"
        )
    if max_batch_size is not None and not 1 <= max_batch_size <= batch:
        raise MegrezError(
            f"{library} was compiled for 1 to {batch} sequences at once, not {max_batch_size}; use at most "
            f"{batch} or compile with a larger --max-batch-size"
        )
