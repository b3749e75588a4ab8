"""`gen-config`: write mlc-chat-config.json (MLC's schema) and copy the tokenizer files."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any

from ..artifacts.chat_config import DEFAULT_MAX_BATCH_SIZE, ChatConfig, Limits, resolve_limits
from ..artifacts.files import CHAT_CONFIG_FILE, INDEX_FILE, TOKENIZER_FILES
from ..artifacts.schemes import QuantScheme, get_scheme
from ..artifacts.tensor_cache import read_index, stored_quantization
from ..config import load_hf_model_config, load_preset, read_hf_config, read_json_object
from ..conversation import MEGREZ_STOP_TOKENS, get_template
from ..errors import MegrezError
from ..omni.config import ImageProcessorConfig, audio_processor_config, image_processor_config
from ..staging import staged_model_dir

log = logging.getLogger("megrez_mlc")

DEFAULT_PRESET = "megrez-3b-instruct"
SAMPLING_FIELDS = ("temperature", "top_p", "repetition_penalty")


def special_token_ids(tokenizer_json: dict[str, Any]) -> dict[str, int]:
    """Content -> id of every added token of a HF tokenizer.json (plus vocab entries for BPE models)."""
    ids = {tok["content"]: tok["id"] for tok in tokenizer_json.get("added_tokens", [])}
    vocab = tokenizer_json.get("model", {}).get("vocab", {})
    if isinstance(vocab, dict):
        for token in MEGREZ_STOP_TOKENS:
            if token in vocab:
                ids.setdefault(token, vocab[token])
    return ids


def gen_config(
    hf_dir: Path,
    out_dir: Path,
    quantization: str,
    *,
    conv_template: str = "megrez",
    context_window_size: int | None = None,
    prefill_chunk_size: int | None = None,
    preset: str | None = None,
    force: bool = False,
) -> ChatConfig:
    scheme = get_scheme(quantization)
    config, preset_dict = load_hf_model_config(hf_dir, preset)
    tokenizer_path = hf_dir / "tokenizer.json"
    if not tokenizer_path.is_file():
        raise MegrezError(
            f"{tokenizer_path} not found; megrez-mlc needs the checkpoint's fast tokenizer file"
        )
    specials = special_token_ids(read_json_object(tokenizer_path))
    hf = read_hf_config(hf_dir)
    generation_config_path = hf_dir / "generation_config.json"
    generation = read_json_object(generation_config_path) if generation_config_path.is_file() else {}
    stop_ids = _stop_token_ids(specials, hf, generation, config.vocab_size)
    if not stop_ids:
        log.warning(
            "the tokenizer has none of %s and the checkpoint names no eos_token_id; generation stops only at "
            "max tokens",
            ", ".join(MEGREZ_STOP_TOKENS),
        )

    image_processor = _image_processor(hf_dir, config, specials)
    chat_defaults = (preset_dict or load_preset(DEFAULT_PRESET))["chat"]
    limits = resolve_limits(
        Limits(config.context_window_size, chat_defaults["prefill_chunk_size"], DEFAULT_MAX_BATCH_SIZE),
        context_window_size=context_window_size,
        prefill_chunk_size=prefill_chunk_size,
    )
    sampling = {k: chat_defaults[k] for k in SAMPLING_FIELDS}
    sampling |= {
        k: _number(generation, k, generation_config_path) for k in SAMPLING_FIELDS if k in generation
    }
    chat_config = ChatConfig(
        quantization=scheme.name,
        model_config=config.replace(context_window_size=limits.context_window_size),
        prefill_chunk_size=limits.prefill_chunk_size,
        **sampling,
        tokenizer_files=tuple(f for f in TOKENIZER_FILES if (hf_dir / f).is_file()),
        conv_template=get_template(conv_template, stop_ids).to_json(),
        pad_token_id=specials.get("<|pad|>", 0),
        bos_token_id=hf.get("bos_token_id", specials.get("<|eos|>", 0)),
        eos_token_id=tuple(stop_ids),
        image_processor=image_processor,
        audio_processor=audio_processor_config(config.audio, specials) if config.audio else None,
    )
    check_output_quantization(out_dir, scheme, force)
    with staged_model_dir(out_dir, force, superseded=previous_config_files(out_dir)) as staging:
        for name in chat_config.tokenizer_files:
            shutil.copyfile(hf_dir / name, staging / name)
        chat_config.write(staging)
    return chat_config


def _image_processor(hf_dir: Path, config, specials: dict[str, int]) -> ImageProcessorConfig | None:
    """An Omni checkpoint's image settings: its preprocessor_config.json (when it has one) over MiniCPM-V's
    slicing defaults, and the placeholder tokens' ids."""
    if config.vision is None:
        return None
    path = hf_dir / "preprocessor_config.json"
    preprocessor = read_json_object(path) if path.is_file() else {}
    return image_processor_config(preprocessor, config.vision, specials)


def _token_ids(value: Any, where: str, vocab_size: int) -> list[int]:
    """An `eos_token_id` (an id, a list of ids, or null) as a list, each id checked against the vocabulary."""
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size:
            raise MegrezError(
                f"{where} names eos_token_id {token!r}, not a token id below the vocabulary size {vocab_size}"
                "; fix it"
            )
    return ids


def _stop_token_ids(
    specials: dict[str, int], hf: dict[str, Any], generation: dict[str, Any], vocab_size: int
) -> list[int]:
    """Megrez's stop tokens the tokenizer has, then config.json's and generation_config.json's eos ids (as
    transformers' generate() stops on those), each once."""
    ids = [specials[tok] for tok in MEGREZ_STOP_TOKENS if tok in specials]
    ids += _token_ids(hf.get("eos_token_id"), "config.json", vocab_size)
    ids += _token_ids(generation.get("eos_token_id"), "generation_config.json", vocab_size)
    return list(dict.fromkeys(ids))


def _number(values: dict[str, Any], key: str, path: Path) -> float:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MegrezError(f"{path} gives {key} = {value!r}, not a number; fix or delete that field")
    return value


def _previous_chat_config(out_dir: Path) -> dict[str, Any] | None:
    try:
        chat = json.loads((out_dir / CHAT_CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return chat if isinstance(chat, dict) else None


def previous_config_files(out_dir: Path) -> list[str]:
    """The files an earlier gen-config wrote into out_dir, as its mlc-chat-config.json lists them."""
    chat = _previous_chat_config(out_dir)
    if chat is None:
        return []
    return [CHAT_CONFIG_FILE, *(f for f in chat.get("tokenizer_files", []) if isinstance(f, str))]


def check_output_quantization(out_dir: Path, scheme: QuantScheme, force: bool) -> None:
    """A previous output in out_dir may only be replaced by the same quantization (unless force): otherwise
    the folder would mix weights and an mlc-chat-config.json of two formats, a model that looks whole but
    is wrong."""
    if force or not out_dir.is_dir():
        return
    found = {}
    if (out_dir / INDEX_FILE).is_file():
        try:
            found[INDEX_FILE] = stored_quantization(read_index(out_dir))
        except MegrezError:  # unreadable: not known to be a previous output of this conversion
            found[INDEX_FILE] = None
    if (out_dir / CHAT_CONFIG_FILE).is_file():
        chat = _previous_chat_config(out_dir)
        found[CHAT_CONFIG_FILE] = chat.get("quantization") if chat else None
    for file, quantization in found.items():
        if quantization != scheme.name:
            held = f"a {quantization}" if quantization else "an unrecognised"
            raise MegrezError(
                f"output {out_dir} holds {held} model ({file}); writing {scheme.name} there would mix two "
                "formats: choose another -o folder or pass --force"
            )
