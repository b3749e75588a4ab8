"""int4 group quantization: MLC's exact bit layout, read back from the files convert-weight writes."""

from __future__ import annotations

import numpy as np
import pytest

from megrez_mlc.config import load_hf_model_config
from megrez_mlc.quantize.checkpoint import Checkpoint
from megrez_mlc.quantize.group_quant import dequantize_int4, pack_int4_nk, quantize_int4, unpack_int4_nk
from megrez_mlc.quantize.param_map import llama_param_specs
from megrez_mlc.quantize.schemes import get_scheme
from megrez_mlc.quantize.tensor_cache import load_tensors


def reference_unpack(q_weight: np.ndarray, q_scale: np.ndarray, k: int) -> np.ndarray:
    """Bit by bit, straight from DESIGN.md §2: input j of a row is bits 4*(j%8).. of word j//8."""
    n = q_weight.shape[0]
    out = np.zeros((n, k), dtype=np.float64)
    for row in range(n):
        for j in range(k):
            word = int(q_weight[row, j // 8])
            q = (word >> (4 * (j % 8))) & 0xF
            out[row, j] = (q - 7) * float(q_scale[row, j // 32])
    return out


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


@pytest.mark.parametrize("quantization", ["q4f32_1", "q4f16_1"])
def test_converted_tensors_unpack_to_numpy_dequantization(built, quantization: str) -> None:
    model = built(quantization)
    config, _ = load_hf_model_config(model.hf_dir)
    stored = load_tensors(model.model_dir)
    checkpoint = Checkpoint(model.hf_dir)
    for spec in llama_param_specs(config):
        if not spec.matrix:
            assert stored[f"{spec.name}.weight"].dtype == np.dtype(get_scheme(quantization).model_dtype)
            continue
        q_weight, q_scale = stored[f"{spec.name}.q_weight"], stored[f"{spec.name}.q_scale"]
        n, k = spec.shape
        assert q_weight.shape == (n, -(-k // 32) * 4) and q_scale.shape == (n, -(-k // 32))
        ours = dequantize_int4(q_weight, q_scale, k)
        np.testing.assert_array_equal(ours, reference_unpack(q_weight, q_scale, k).astype(np.float32))
        original = np.concatenate([checkpoint.read(name) for name in spec.hf_names])
        step = np.repeat(q_scale.astype(np.float32), 32, axis=1)[:, :k]
        assert np.all(np.abs(ours - original) <= step / 2 + 1e-6 * np.abs(original)), spec.name
