"""What an Omni checkpoint says about its vision half, read from its config.json (and
preprocessor_config.json), kept in mlc-chat-config.json.

Two objects: `VisionConfig` is the math of the vision tower and resampler (it goes into `model_config`, so
compile reads it), `ImageProcessorConfig` is how images become slices and placeholder tokens (a top-level
`image_processor` object, read at run time). Megrez-3B-Omni's config.json keeps the LLM's fields at its top
level, like a LlamaConfig, beside `vision_config` (SigLIP-SO400M's), `query_num` and `audio_config`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

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


def is_omni(hf: dict[str, Any]) -> bool:
    """Whether a config.json describes Megrez-3B-Omni (the LLM plus vision and audio encoders)."""
    return hf.get("model_type") == OMNI_MODEL_TYPE or OMNI_ARCHITECTURE in (hf.get("architectures") or [])


def _positive_int(values: dict[str, Any], key: str, where: str) -> int:
    value = values.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise MegrezError(f"{where}'s {key} must be a positive int, got {value!r}; fix {where}")
    return value


@dataclass(frozen=True)
class VisionConfig:
    """The vision tower (Idefics2/SigLIP: patch embedding, position embedding over a square grid of
    `image_size / patch_size` buckets per side, pre-norm encoder layers with tanh-GELU MLPs, a final
    LayerNorm) and the resampler (`query_num` learned queries of the LLM width attending to the patches)."""

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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VisionConfig:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class ImageProcessorConfig:
    """How an image becomes slices and prompt tokens (MiniCPM-V's slicing, as Megrez-3B-Omni uses it).

    An image is resized to about `scale_resolution`² pixels (the source slice) and, when larger than that,
    also cut into a grid of at most `max_slice_nums` slices of about that size. Each slice becomes
    `query_num` embeddings, written over the `unk` tokens of its placeholder: `image_start unk×query_num
    image_end` for the source, then the grid's slices as `slice_start unk×query_num slice_end`, a row's
    slices side by side, rows joined by `row_separator`. `token_ids` are the tokenizer's ids of the five
    tokens. Kept as data so a different layout needs no new release."""

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

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageProcessorConfig:
        try:
            return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls)})
        except (KeyError, TypeError) as err:
            raise MegrezError(
                f"mlc-chat-config.json's image_processor lacks or garbles {err}; run gen-config again"
            ) from None


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


def image_processor_config(
    preprocessor: dict[str, Any], vision: VisionConfig, token_ids: dict[str, int]
) -> ImageProcessorConfig:
    """The processor settings of a checkpoint: its preprocessor_config.json's slicing over MiniCPM-V's
    defaults, the vision config's patch size and query count, and the placeholder tokens' ids."""
    where = "preprocessor_config.json"
    slicing = {key: _positive_int({**DEFAULT_SLICING, **preprocessor}, key, where) for key in DEFAULT_SLICING}
    layout = {key: preprocessor.get(key, value) for key, value in DEFAULT_LAYOUT.items()}
    ids = {}
    for key in ("image_start", "image_end", "slice_start", "slice_end", "unk"):
        token = layout[key]
        if token not in token_ids:
            raise MegrezError(
                f"the tokenizer has no {token} token, which the image placeholders use; is this "
                "Megrez-3B-Omni's tokenizer.json?"
            )
        ids[token] = token_ids[token]
    return ImageProcessorConfig(
        **slicing, patch_size=vision.patch_size, query_num=vision.query_num, **layout, token_ids=ids
    )
