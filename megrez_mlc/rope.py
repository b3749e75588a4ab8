"""Rotary position embedding parameters, read as transformers' LlamaRotaryEmbedding reads them.

A checkpoint states its RoPE in one of two layouts: transformers 4 writes a top-level `rope_theta` and an
optional `rope_scaling` dict (`"type"` or `"rope_type"`); transformers 5 writes one `rope_parameters` dict
holding `rope_theta` and `rope_type`. Either way the result is one frequency per pair of head dimensions,
inv_freq[i] = theta ** (-2i / head_dim), adjusted per type:

- `default`: unchanged.
- `linear`: inv_freq / factor (positions interpolated by the factor).
- `llama3`: low frequencies (wavelength above original_max_position_embeddings / low_freq_factor) divided by
  factor, high ones (below ... / high_freq_factor) kept, a linear blend in between.
- `yarn`: a ramp over dimension indices between two correction dims blends inv_freq / factor (interpolated)
  into inv_freq (extrapolated), and cos/sin are multiplied by an attention factor (0.1 ln(factor) + 1 unless
  the config gives it, or mscale / mscale_all_dim).
- `dynamic` (NTK): identical to `default` up to max_position_embeddings and re-based beyond it, so it is
  exact only within that length; the context window is held to it.

Every type reduces to inv_freq[i] = base[i] * ((1 - w[i]) + w[i] / factor) with an interpolation weight
w[i] in [0, 1], plus a factor on cos and sin: that is what `interpolation_weight` and `attention_factor`
describe, for the compiler's RoPE kernel and for this module's numpy reference alike.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from .errors import MegrezError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")
DEFAULT_ROPE_THETA = 10000.0  # transformers' LlamaConfig default


@dataclass(frozen=True)
class RopeScaling:
    """A RoPE type and the parameters that type reads (the others keep their defaults)."""

    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # llama3 and yarn: the pretraining length; dynamic: the length up to which it equals default
    original_max_position_embeddings: int = 0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    attention_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise MegrezError(
                f"RoPE type {self.rope_type!r} is not supported; megrez-mlc computes "
                f"{', '.join(SUPPORTED_ROPE_TYPES)} exactly as transformers does"
            )
        if self.rope_type != "default" and not (math.isfinite(self.factor) and self.factor > 0):
            raise MegrezError(f"RoPE {self.rope_type} scaling needs a positive factor, got {self.factor}")
        if self.rope_type == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise MegrezError(
                f"llama3 RoPE needs high_freq_factor > low_freq_factor, got {self.high_freq_factor} and "
                f"{self.low_freq_factor}; fix config.json"
            )
        if self.rope_type in ("llama3", "yarn", "dynamic") and self.original_max_position_embeddings <= 0:
            raise MegrezError(f"RoPE {self.rope_type} scaling needs original_max_position_embeddings")

    @property
    def llama3_blend(self) -> tuple[float, float]:
        """(slope, offset) of llama3's blend, clamp(slope * inv_freq - offset, 0, 1): transformers' smooth
        factor (original_len / wavelength - low) / (high - low) with wavelength = 2π / inv_freq. 1 keeps a
        frequency, 0 divides it by factor."""
        span = self.high_freq_factor - self.low_freq_factor
        return self.original_max_position_embeddings / (2 * math.pi) / span, self.low_freq_factor / span

    @property
    def exact_up_to(self) -> int | None:
        """The longest sequence this RoPE is computed exactly for (None: any length)."""
        return self.original_max_position_embeddings if self.rope_type == "dynamic" else None

    def yarn_ramp_range(self, rotary_dim: int, theta: float) -> tuple[float, float]:
        """The dimension indices between which yarn's ramp rises from 0 to 1."""

        def correction_dim(rotations: float) -> float:
            wavelengths = self.original_max_position_embeddings / (rotations * 2 * math.pi)
            return rotary_dim * math.log(wavelengths) / (2 * math.log(theta))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, rotary_dim - 1)
        return low, high + 0.001 if low == high else high  # transformers' guard against a zero-width ramp

    def to_json(self) -> dict[str, Any] | None:
        """The HF-style dict stored in mlc-chat-config.json's model_config (None for plain RoPE)."""
        return None if self.rope_type == "default" else asdict(self)

    @classmethod
    def from_json(cls, stored: dict[str, Any] | None) -> RopeScaling:
        return cls(**stored) if stored else cls()


def inv_freq_reference(rope: RopeScaling, theta: float, rotary_dim: int) -> np.ndarray:
    """The per-pair frequencies in float32, as transformers computes them (the tests' reference)."""
    exponent = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    base = (1.0 / np.power(np.float32(theta), exponent)).astype(np.float32)
    weight = interpolation_weight_reference(rope, theta, rotary_dim, base)
    return (base * ((1 - weight) + weight / np.float32(rope.factor))).astype(np.float32)


def interpolation_weight_reference(
    rope: RopeScaling, theta: float, rotary_dim: int, base: np.ndarray
) -> np.ndarray:
    if rope.rope_type in ("default", "dynamic"):
        return np.zeros_like(base)
    if rope.rope_type == "linear":
        return np.ones_like(base)
    if rope.rope_type == "llama3":
        slope, offset = rope.llama3_blend
        smooth = np.clip(slope * base - offset, 0, 1)
        return (1 - smooth).astype(np.float32)
    low, high = rope.yarn_ramp_range(rotary_dim, theta)
    ramp = np.clip((np.arange(rotary_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    return ramp.astype(np.float32)


def read_rope(hf: dict[str, Any], max_position_embeddings: int) -> tuple[float, RopeScaling]:
    """(theta, scaling) from a config.json in either layout; anything not computed exactly is an error."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise MegrezError(f"config.json's {key} must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise MegrezError(
            "config.json gives a RoPE per layer type; megrez-mlc supports one RoPE for all layers"
        )
    theta = _number(params.get("rope_theta", hf.get("rope_theta")), "rope_theta", DEFAULT_ROPE_THETA)
    if not theta > 1:
        raise MegrezError(f"rope_theta must be greater than 1, got {theta}; fix config.json")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise MegrezError(
            f"partial_rotary_factor={partial} is not supported (LLaMA rotates whole heads); fix config.json"
        )
    rope_type = params.get("rope_type", params.get("type")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise MegrezError(
            f"RoPE type {rope_type!r} is not supported; megrez-mlc computes "
            f"{', '.join(SUPPORTED_ROPE_TYPES)} exactly as transformers does"
        )
    if rope_type == "default":
        return theta, RopeScaling()
    original = int(
        _number(
            params.get("original_max_position_embeddings"),
            "original_max_position_embeddings",
            hf.get("original_max_position_embeddings", max_position_embeddings),
        )
    )
    factor = params.get("factor")
    if factor is None and rope_type == "yarn":  # transformers derives it from the two lengths
        factor = max_position_embeddings / original
    factor = _number(factor, "rope factor", None)
    fields: dict[str, Any] = {"rope_type": rope_type, "factor": factor}
    if rope_type == "llama3":
        fields |= {
            "low_freq_factor": _number(params.get("low_freq_factor"), "low_freq_factor", None),
            "high_freq_factor": _number(params.get("high_freq_factor"), "high_freq_factor", None),
            "original_max_position_embeddings": original,
        }
    elif rope_type == "yarn":
        fields |= {
            "original_max_position_embeddings": original,
            "beta_fast": _number(params.get("beta_fast") or 32, "beta_fast", None),
            "beta_slow": _number(params.get("beta_slow") or 1, "beta_slow", None),
            "truncate": bool(params.get("truncate", True)),
            "attention_factor": _yarn_attention_factor(params, factor),
        }
    elif rope_type == "dynamic":
        fields["original_max_position_embeddings"] = max_position_embeddings
    return theta, RopeScaling(**fields)


def _yarn_attention_factor(params: dict[str, Any], factor: float) -> float:
    if params.get("attention_factor") is not None:
        return _number(params["attention_factor"], "attention_factor", None)

    def mscale(scale: float, multiplier: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * multiplier * math.log(scale) + 1.0

    if params.get("mscale") and params.get("mscale_all_dim"):
        return mscale(factor, params["mscale"]) / mscale(factor, params["mscale_all_dim"])
    return mscale(factor)


def _number(value: Any, name: str, default: float | None) -> float:
    if value is None:
        if default is None:
            raise MegrezError(f"config.json's RoPE scaling lacks {name}; fix config.json")
        return float(default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise MegrezError(f"config.json's {name} must be a number, got {value!r}")
    return float(value)
