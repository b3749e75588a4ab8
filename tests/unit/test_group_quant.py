"""int4 group quantization in numpy: MLC's bit layout (first input in the low nibble), padding of a
partial group, and an error of at most half a quantization step."""

from __future__ import annotations

import numpy as np
import pytest

from megrez_mlc.artifacts.int4 import dequantize_int4, pack_int4_nk, quantize_int4, unpack_int4_nk


def test_pack_puts_first_value_in_low_nibble() -> None:
    values = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=np.uint8)
    assert pack_int4_nk(values)[0, 0] == 0x87654321
    assert np.array_equal(unpack_int4_nk(pack_int4_nk(values)), values)


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_quantize_shapes_padding_and_half_step_error(scale_dtype: str) -> None:
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((7, 45)).astype(np.float32)  # K=45: one full group, one padded
    weight[2] = 0.0  # an all-zero row must survive (scale 0)
    q_weight, q_scale = quantize_int4(weight, scale_dtype)
    assert q_weight.shape == (7, 8) and q_weight.dtype == np.uint32
    assert q_scale.shape == (7, 2) and q_scale.dtype == np.dtype(scale_dtype)
    assert np.all(unpack_int4_nk(q_weight)[:, 45:] == 7)  # padding stores zero
    assert np.all(unpack_int4_nk(q_weight) <= 14)
    deq = dequantize_int4(q_weight, q_scale, 45)
    step = np.repeat(q_scale.astype(np.float32), 32, axis=1)[:, :45]
    assert np.all(np.abs(deq - weight) <= step / 2 + 1e-6 * np.abs(weight))
    assert np.all(deq[2] == 0)
