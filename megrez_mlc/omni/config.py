"""What an Omni checkpoint says about its vision and audio encoders, read from its config.json (and
preprocessor_config.json), kept in mlc-chat-config.json.

Per encoder two objects: `VisionConfig` / `AudioConfig` are the math of the encoders (they go into
`model_config`, so compile reads them), `ImageProcessorConfig` / `AudioProcessorConfig` are how images and
clips become placeholder tokens (top-level `image_processor` / `audio_processor` objects, read at run time).
Megrez-3B-Omni's config.json keeps the LLM's fields at its top level, like a LlamaConfig, beside
`vision_config` (SigLIP-SO400M's), `query_num` and `audio_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import MegrezError

OMNI_MODEL_TYPE = "megrezo"
OMNI_ARCHITECTURE = "MegrezO"
RESAMPLER_HEAD_WIDTH = 128  # the resampler has hidden_size / 128 heads
# SigLIP-SO400M's shape, for fields a vision_config leaves out (transformers' Idefics2/SigLIP defaults
# describe the base model, not this one).
SIGLIP_SO400M = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 980,
    "patch_size": 14,
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu_pytorch_tanh",
}


class _SavedFields:
    """A frozen dataclass kept as a JSON object of its fields in mlc-chat-config.json, at `saved_as`."""

    saved_as: ClassVar[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]):
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as err:
            raise MegrezError(
                f"mlc-chat-config.json's {cls.saved_as} lacks or garbles {err}; run gen-config again"
            ) from None


def is_omni(hf: dict[str, Any]) -> bool:
    """Whether a config.json describes Megrez-3B-Omni (the LLM plus vision and audio encoders)."""
    return hf.get("model_type") == OMNI_MODEL_TYPE or OMNI_ARCHITECTURE in (hf.get("architectures") or [])


def _positive_int(values: dict[str, Any], key: str, where: str) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MegrezError(f"{where}'s {key} must be a positive int, got {value!r}; fix {where}")
    return value


@dataclass(frozen=True)
class VisionConfig(_SavedFields):
    """The vision tower (Idefics2/SigLIP: patch embedding, position embedding over a square grid of
    `image_size / patch_size` buckets per side, pre-norm encoder layers with tanh-GELU MLPs, a final
    LayerNorm) and the resampler (`query_num` learned queries of the LLM width attending to the patches)."""

    saved_as = "model_config.vision_config"

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    query_num: int
    resampler_heads: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise MegrezError(
                f"vision_config: hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}; fix config.json"
            )
        if self.image_size < self.patch_size:
            raise MegrezError(
                f"vision_config: image_size {self.image_size} is below patch_size; fix config.json"
            )

    @property
    def patches_per_side(self) -> int:
        """Rows (and columns) of the learned position-embedding grid."""
        return self.image_size // self.patch_size

    @property
    def patch_features(self) -> int:
        """Values of one flattened patch: 3 channels x patch x patch."""
        return 3 * self.patch_size * self.patch_size

    @classmethod
    def from_hf(cls, hf: dict[str, Any], llm_hidden_size: int) -> VisionConfig:
        vision = {**SIGLIP_SO400M, **(hf.get("vision_config") or {})}
        where = "config.json's vision_config"
        if vision.get("hidden_act") != "gelu_pytorch_tanh":
            raise MegrezError(
                f"{where}: hidden_act {vision.get('hidden_act')!r} is not supported (tanh GELU)"
            )
        eps = vision.get("layer_norm_eps")
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not (math.isfinite(eps) and eps > 0):
            raise MegrezError(f"{where}: layer_norm_eps must be a positive number, got {eps!r}")
        if hf.get("drop_vision_last_layer"):
            raise MegrezError("config.json sets drop_vision_last_layer, which Megrez-3B-Omni does not use")
        heads = llm_hidden_size // RESAMPLER_HEAD_WIDTH
        if heads < 1 or llm_hidden_size % heads or llm_hidden_size % 4:
            raise MegrezError(
                f"the resampler needs hidden_size / {RESAMPLER_HEAD_WIDTH} heads of equal width and a "
                f"width divisible by 4 (its 2-D sin-cos positions), which hidden_size {llm_hidden_size} "
                "does not give"
            )
        if vision.get("hidden_size") == llm_hidden_size:
            raise MegrezError("a vision tower as wide as the LLM (no resampler kv_proj) is not supported")
        return cls(
            hidden_size=_positive_int(vision, "hidden_size", where),
            intermediate_size=_positive_int(vision, "intermediate_size", where),
            num_hidden_layers=_positive_int(vision, "num_hidden_layers", where),
            num_attention_heads=_positive_int(vision, "num_attention_heads", where),
            image_size=_positive_int(vision, "image_size", where),
            patch_size=_positive_int(hf if "patch_size" in hf else vision, "patch_size", "config.json"),
            layer_norm_eps=float(eps),
            query_num=_positive_int({"query_num": hf.get("query_num", 64)}, "query_num", "config.json"),
            resampler_heads=heads,
        )


@dataclass(frozen=True)
class ImageProcessorConfig(_SavedFields):
    """How an image becomes slices and prompt tokens (MiniCPM-V's slicing, as Megrez-3B-Omni uses it).

    An image is resized to about `scale_resolution`² pixels (the source slice) and, when larger than that,
    also cut into a grid of at most `max_slice_nums` slices of about that size. Each slice becomes
    `query_num` embeddings, written over the `unk` tokens of its placeholder: `image_start unk×query_num
    image_end` for the source, then the grid's slices as `slice_start unk×query_num slice_end`, a row's
    slices side by side, rows joined by `row_separator`. `token_ids` are the tokenizer's ids of the five
    tokens. Kept as data so a different layout needs no new release."""

    saved_as = "image_processor"

    scale_resolution: int
    max_slice_nums: int
    patch_size: int
    query_num: int
    image_start: str
    image_end: str
    slice_start: str
    slice_end: str
    unk: str
    row_separator: str
    token_ids: dict[str, int]


# Megrez-3B-Omni's layout (the README says what it was reconstructed from): the LLM's own image tokens
# around each slice, `<|unk|>` as the filler the embeddings overwrite.
DEFAULT_LAYOUT = {
    "image_start": "<|image_start|>",
    "image_end": "<|image_end|>",
    "slice_start": "<|image_start|>",
    "slice_end": "<|image_end|>",
    "unk": "<|unk|>",
    "row_separator": "\n",
}
DEFAULT_SLICING = {"scale_resolution": 448, "max_slice_nums": 9}


def placeholder_token_ids(tokens: list[str], token_ids: dict[str, int], media: str) -> dict[str, int]:
    """The tokenizer's ids of the placeholder tokens of an image or audio layout."""
    missing = [token for token in tokens if token not in token_ids]
    if missing:
        raise MegrezError(
            f"the tokenizer has no {missing[0]} token, which the {media} placeholders use; is this "
            "Megrez-3B-Omni's tokenizer.json?"
        )
    return {token: token_ids[token] for token in tokens}


def image_processor_config(
    preprocessor: dict[str, Any], vision: VisionConfig, token_ids: dict[str, int]
) -> ImageProcessorConfig:
    """The processor settings of a checkpoint: its preprocessor_config.json's slicing over MiniCPM-V's
    defaults, the vision config's patch size and query count, and the placeholder tokens' ids."""
    where = "preprocessor_config.json"
    slicing = {key: _positive_int({**DEFAULT_SLICING, **preprocessor}, key, where) for key in DEFAULT_SLICING}
    layout = {key: preprocessor.get(key, value) for key, value in DEFAULT_LAYOUT.items()}
    tokens = [layout[key] for key in ("image_start", "image_end", "slice_start", "slice_end", "unk")]
    ids = placeholder_token_ids(tokens, token_ids, "image")
    return ImageProcessorConfig(
        **slicing, patch_size=vision.patch_size, query_num=vision.query_num, **layout, token_ids=ids
    )


# --- audio ----------------------------------------------------------------------------------------------

WHISPER_CONTEXT = 1500  # encoder frames of Whisper's 30-second window (3000 mel frames, conv2's stride 2)
AUDIO_LAYER_NORM_EPS = 1e-5  # the audio encoder's LayerNorms (torch's default)


@dataclass(frozen=True)
class AudioConfig(_SavedFields):
    """The audio encoder: Whisper-large-v3's (conv1 k3, conv2 k3 stride 2, both with GELU, a learned
    position embedding of `n_ctx` rows, `n_layer` pre-norm blocks of width `n_state` with `n_head` heads and
    4x GELU MLPs), then average pooling by 2, `ln_post`, a linear projection to `output_dim` (the LLM's
    width), and two learned embeddings put before and after each clip."""

    saved_as = "model_config.audio_config"

    n_mels: int
    n_ctx: int
    n_state: int
    n_head: int
    n_layer: int
    output_dim: int

    @classmethod
    def from_hf(cls, hf: dict[str, Any], llm_hidden_size: int) -> AudioConfig:
        audio = hf.get("audio_config") or {}
        where = "config.json's audio_config"
        for flag in ("avg_pool", "add_audio_bos_eos_token"):
            if audio.get(flag, True) is not True:
                raise MegrezError(f"{where} sets {flag} to {audio[flag]!r}; only Megrez-3B-Omni's true works")
        config = cls(**{f.name: _positive_int(audio, f.name, where) for f in dataclasses.fields(cls)})
        if config.n_state % config.n_head:
            raise MegrezError(
                f"{where}: n_state {config.n_state} is not a multiple of n_head {config.n_head}"
            )
        if config.output_dim != llm_hidden_size:
            raise MegrezError(
                f"{where}: output_dim {config.output_dim} is not the LLM's hidden_size {llm_hidden_size}"
            )
        if config.n_ctx < WHISPER_CONTEXT:
            raise MegrezError(
                f"{where}: n_ctx {config.n_ctx} is below Whisper's 30-second window ({WHISPER_CONTEXT})"
            )
        return config


@dataclass(frozen=True)
class AudioProcessorConfig(_SavedFields):
    """How a clip becomes prompt tokens. Each 30-second chunk of a clip is `audio_start`, one `unk` per
    embedding (the begin embedding, about 25 per second of audio, the end embedding), `audio_end`; a clip's
    chunks follow one another after `label` (`{index}` is the clip's number in the conversation, from 1),
    and `separator` follows the clip. `token_ids` are the tokenizer's ids of the three tokens."""

    saved_as = "audio_processor"

    n_mels: int
    label: str
    audio_start: str
    audio_end: str
    unk: str
    separator: str
    token_ids: dict[str, int]


# Megrez-3B-Omni's audio layout (reconstructed; the README says from what): the LLM's audio tokens around
# each chunk, `<|unk|>` as the filler the embeddings overwrite, "Audio N: " before and a newline after.
DEFAULT_AUDIO_LAYOUT = {
    "label": "Audio {index}: ",
    "audio_start": "<|audio_start|>",
    "audio_end": "<|audio_end|>",
    "unk": "<|unk|>",
    "separator": "\n",
}


def audio_processor_config(audio: AudioConfig, token_ids: dict[str, int]) -> AudioProcessorConfig:
    """The audio placeholder settings of a checkpoint, with the tokens' ids from its tokenizer."""
    tokens = [DEFAULT_AUDIO_LAYOUT[key] for key in ("audio_start", "audio_end", "unk")]
    ids = placeholder_token_ids(tokens, token_ids, "audio")
    return AudioProcessorConfig(n_mels=audio.n_mels, **DEFAULT_AUDIO_LAYOUT, token_ids=ids)
