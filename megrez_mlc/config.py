"""The model's shape: one dataclass, read from a Hugging Face config.json or from mlc-chat-config.json.

A shipped preset (model_configs/*.json) fills fields a checkpoint leaves out; where the checkpoint's own
config.json says something else, the checkpoint wins and the disagreement is logged as a warning.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from .errors import MegrezError
from .omni.config import AudioConfig, VisionConfig, is_omni
from .rope import RopeScaling, read_rope

log = logging.getLogger("megrez_mlc")

# HF LlamaConfig defaults, used when neither config.json nor a preset names a field.
_LLAMA_DEFAULTS = {
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
}
# config.json fields that would change the math and that the graph does not implement.
_UNSUPPORTED_IF_SET = {
    "quantization_config": "an already-quantized checkpoint (GPTQ, AWQ, bitsandbytes...); pass the float one",
    "sliding_window": "sliding-window attention",
    "pretraining_tp": "pretraining_tp > 1",
}


@dataclass(frozen=True)
class ModelConfig:
    """Shape and arithmetic of a LLaMA-architecture model (Megrez-3B is LLaMA-2 with grouped-query attention).

    `context_window_size` is the longest sequence the compiled model serves (by default the checkpoint's
    max_position_embeddings); RoPE is `rope_theta` plus `rope_scaling` (see rope.py).
    """

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    context_window_size: int
    tie_word_embeddings: bool
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    attention_bias: bool = False  # q/k/v/o projections have biases
    mlp_bias: bool = False  # gate/up/down projections have biases
    vision: VisionConfig | None = None  # Megrez-3B-Omni's vision tower and resampler (omni/config.py)
    audio: AudioConfig | None = None  # Megrez-3B-Omni's audio encoder

    def __post_init__(self) -> None:
        positive = (
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "context_window_size",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise MegrezError(f"model config field {name} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise MegrezError(f"rms_norm_eps must be a positive number, got {self.rms_norm_eps}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MegrezError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}): grouped-query attention needs whole groups; fix config.json"
            )
        if self.head_dim % 2:
            raise MegrezError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        exact_up_to = self.rope_scaling.exact_up_to
        if exact_up_to is not None and self.context_window_size > exact_up_to:
            raise MegrezError(
                f"a context window of {self.context_window_size} tokens is longer than dynamic RoPE's "
                f"max_position_embeddings ({exact_up_to}), past which its frequencies change with the "
                f"sequence length; use --context-window-size {exact_up_to} or less"
            )

    @property
    def qkv_out_features(self) -> int:
        return (self.num_attention_heads + 2 * self.num_key_value_heads) * self.head_dim

    @property
    def attention_out_features(self) -> int:
        return self.num_attention_heads * self.head_dim

    # --- Hugging Face config.json -------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], preset: dict[str, Any] | None = None) -> ModelConfig:
        """Build from a HF LlamaConfig dict (either RoPE layout); `preset` (a preset's "model_config")
        fills missing fields."""
        _check_supported_architecture(hf)
        preset = preset or {}
        if preset:
            _report_disagreements(hf, preset)
        merged = {**_LLAMA_DEFAULTS, **preset, **{k: v for k, v in hf.items() if v is not None}}
        try:
            hidden = _field(merged, "hidden_size", int)
            heads = _field(merged, "num_attention_heads", int)
            max_positions = _field(merged, "max_position_embeddings", int)
            theta, scaling = read_rope(merged, max_positions)
            omni = is_omni(hf)
            vision = VisionConfig.from_hf(hf, hidden) if omni else None
            audio = AudioConfig.from_hf(hf, hidden) if omni and hf.get("audio_config") else None
            return cls(
                hidden_size=hidden,
                intermediate_size=_field(merged, "intermediate_size", int),
                num_hidden_layers=_field(merged, "num_hidden_layers", int),
                num_attention_heads=heads,
                num_key_value_heads=_field(merged, "num_key_value_heads", int, heads),
                head_dim=_field(merged, "head_dim", int, hidden // heads if heads > 0 else 0),
                vocab_size=_field(merged, "vocab_size", int),
                rms_norm_eps=_field(merged, "rms_norm_eps", float),
                rope_theta=theta,
                context_window_size=max_positions,
                tie_word_embeddings=_field(merged, "tie_word_embeddings", bool),
                rope_scaling=scaling,
                attention_bias=_field(merged, "attention_bias", bool),
                mlp_bias=_field(merged, "mlp_bias", bool),
                vision=vision,
                audio=audio,
            )
        except KeyError as missing:
            raise MegrezError(f"config.json lacks the field {missing}; is this a LLaMA checkpoint?") from None

    # --- MLC's mlc-chat-config.json "model_config" (field names of mlc_llm's LlamaConfig) ------------------

    def to_mlc_dict(self) -> dict[str, Any]:
        return {
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "rms_norm_eps": self.rms_norm_eps,
            "vocab_size": self.vocab_size,
            "tie_word_embeddings": self.tie_word_embeddings,
            "position_embedding_base": self.rope_theta,
            "rope_scaling": self.rope_scaling.to_json(),
            "context_window_size": self.context_window_size,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "tensor_parallel_shards": 1,
            "pipeline_parallel_stages": 1,
            **({"vision_config": self.vision.to_json()} if self.vision else {}),
            **({"audio_config": self.audio.to_json()} if self.audio else {}),
        }

    @classmethod
    def from_mlc_dict(cls, mlc: dict[str, Any]) -> ModelConfig:
        try:
            return cls(
                hidden_size=mlc["hidden_size"],
                intermediate_size=mlc["intermediate_size"],
                num_hidden_layers=mlc["num_hidden_layers"],
                num_attention_heads=mlc["num_attention_heads"],
                num_key_value_heads=mlc["num_key_value_heads"],
                head_dim=mlc["head_dim"],
                vocab_size=mlc["vocab_size"],
                rms_norm_eps=mlc["rms_norm_eps"],
                rope_theta=mlc["position_embedding_base"],
                context_window_size=mlc["context_window_size"],
                tie_word_embeddings=mlc["tie_word_embeddings"],
                rope_scaling=RopeScaling.from_json(mlc.get("rope_scaling")),
                attention_bias=mlc.get("attention_bias", False),
                mlp_bias=mlc.get("mlp_bias", False),
                vision=VisionConfig.from_json(mlc["vision_config"]) if "vision_config" in mlc else None,
                audio=AudioConfig.from_json(mlc["audio_config"]) if "audio_config" in mlc else None,
            )
        except (KeyError, TypeError) as missing:
            raise MegrezError(
                f"mlc-chat-config.json's model_config lacks or garbles {missing}; "
                "regenerate it with `megrez-mlc gen-config`"
            ) from None

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def checkpoint_prefix(self) -> str:
        """Where the LLM's tensors are in the checkpoint: Megrez-3B-Omni keeps them under `llm.`."""
        return "llm." if self.vision else ""


_KIND_NAMES = {bool: "a boolean", int: "an int", float: "a number"}


def _field(merged: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """merged[name] as `kind`, refusing values transformers would not take (a string for a size, "true")."""
    value = merged.get(name, default)
    if value is None:
        raise KeyError(name)
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise MegrezError(f"config.json's {name} must be {_KIND_NAMES[kind]}, got {value!r}; fix config.json")
    return kind(value)


def _check_supported_architecture(hf: dict[str, Any]) -> None:
    archs = hf.get("architectures") or []
    if is_omni(hf):
        pass  # Megrez-3B-Omni: a LLaMA's fields at the top level, beside its encoders' configs
    elif hf.get("model_type") not in (None, "llama") or (archs and "LlamaForCausalLM" not in archs):
        raise MegrezError(
            f"config.json describes {archs or hf.get('model_type')}, not LlamaForCausalLM; "
            "megrez-mlc supports Megrez-3B (LLaMA) and Megrez-3B-Omni"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise MegrezError(f"hidden_act {hf['hidden_act']!r} is not supported (LLaMA uses silu)")
    for key, what in _UNSUPPORTED_IF_SET.items():
        value = hf.get(key)
        if value is not None and not (key == "pretraining_tp" and value == 1):
            raise MegrezError(f"config.json sets {key}: {what} is not supported")


def _report_disagreements(hf: dict[str, Any], preset: dict[str, Any]) -> None:
    for key, preset_value in preset.items():
        if key in hf and hf[key] is not None and hf[key] != preset_value:
            log.warning(
                "config.json says %s=%r but the preset says %r; using the checkpoint's value",
                key,
                hf[key],
                preset_value,
            )


# --- presets ----------------------------------------------------------------------------------------------


def preset_names() -> list[str]:
    folder = resources.files("megrez_mlc.model_configs")
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    names = preset_names()
    if name not in names:
        raise MegrezError(f"unknown model preset {name!r}; choose one of: {', '.join(names)}")
    text = resources.files("megrez_mlc.model_configs").joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def guess_preset(hf_dir: Path, hf: dict[str, Any]) -> str | None:
    """The preset whose name appears in the checkpoint's folder name or its recorded `_name_or_path`."""
    haystack = f"{hf_dir.resolve().name} {hf.get('_name_or_path', '')}".lower().replace("_", "-")
    for name in preset_names():
        if name in haystack:
            return name
    return None


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise MegrezError(f"{hf_dir} is not a directory; pass the folder of a Hugging Face checkpoint")
    if not path.is_file():
        mlc_files = [f for f in ("mlc-chat-config.json", "tensor-cache.json") if (hf_dir / f).is_file()]
        if mlc_files:
            raise MegrezError(
                f"{hf_dir} is an already-converted MLC model (it has {mlc_files[0]}, no config.json); "
                "pass the original Hugging Face checkpoint folder"
            )
        raise MegrezError(
            f"{path} not found; pass the folder of a Hugging Face checkpoint (with config.json)"
        )
    return read_json_object(path)


def read_json_object(path: Path, fix: str = "fix or re-download the checkpoint") -> dict[str, Any]:
    """A JSON file that must hold an object (a checkpoint's config.json, tokenizer.json,
    generation_config.json; a converted model's mlc-chat-config.json); anything else is an error that
    names the file and `fix`."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MegrezError(f"{path} is not valid JSON ({err}); {fix}") from None
    if not isinstance(value, dict):
        raise MegrezError(f"{path} holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def load_hf_model_config(
    hf_dir: Path, preset: str | None = None
) -> tuple[ModelConfig, dict[str, Any] | None]:
    """Read a checkpoint's config.json, merged with a preset (named, or guessed from the folder name).

    Returns the config and the preset dict (None when no preset applies).
    """
    hf = read_hf_config(hf_dir)
    name = preset or guess_preset(hf_dir, hf)
    preset_dict = load_preset(name) if name else None
    config = ModelConfig.from_hf_dict(hf, preset_dict["model_config"] if preset_dict else None)
    return config, preset_dict
