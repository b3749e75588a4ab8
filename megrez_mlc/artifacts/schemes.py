"""Quantization schemes by name, as in MLC-LLM (`q{bits}f{activation float bits}[_{variant}]`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import MegrezError


@dataclass(frozen=True)
class QuantScheme:
    """How weights are stored and in which float type the model computes.

    `bits == 0` keeps plain `.weight` tensors; `bits == 4` stores MLC's group quantization
    (`.q_weight` uint32 words of 8 nibbles, `.q_scale` one scale per `group_size` inputs).
    """

    name: str
    bits: int
    model_dtype: str
    group_size: int = 32

    @property
    def quantized(self) -> bool:
        return self.bits > 0

    @property
    def scale_dtype(self) -> str:
        return self.model_dtype

    @property
    def values_per_word(self) -> int:
        return 32 // self.bits


SCHEMES: dict[str, QuantScheme] = {
    scheme.name: scheme
    for scheme in (
        QuantScheme("q0f32", bits=0, model_dtype="float32"),
        QuantScheme("q0f16", bits=0, model_dtype="float16"),
        QuantScheme("q4f32_1", bits=4, model_dtype="float32"),
        QuantScheme("q4f16_1", bits=4, model_dtype="float16"),
    )
}


def get_scheme(name: str) -> QuantScheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise MegrezError(f"unknown quantization {name!r}; choose one of: {', '.join(SCHEMES)}") from None
