"""int4 group quantization: MLC's exact bit layout, read back from the files convert-weight writes."""

from __future__ import annotations

import numpy as np
import pytest

from megrez_mlc.artifacts.int4 import dequantize_int4
from megrez_mlc.artifacts.param_names import llama_param_specs
from megrez_mlc.artifacts.schemes import get_scheme
from megrez_mlc.artifacts.tensor_cache import load_tensors
from megrez_mlc.config import load_hf_model_config
from megrez_mlc.quantize.checkpoint import Checkpoint


def reference_unpack(q_weight: np.ndarray, q_scale: np.ndarray, k: int) -> np.ndarray:
    """Bit by bit, from MLC's layout: input j of a row is bits 4*(j%8).. of word j//8."""
    n = q_weight.shape[0]
    out = np.zeros((n, k), dtype=np.float64)
    for row in range(n):
        for j in range(k):
            word = int(q_weight[row, j // 8])
            q = (word >> (4 * (j % 8))) & 0xF
            out[row, j] = (q - 7) * float(q_scale[row, j // 32])
    return out


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
