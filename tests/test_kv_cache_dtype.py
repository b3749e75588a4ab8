"""`compile --kv-cache-dtype`: the KV cache of a CPU library in a float type other than the model's.

The cache is read back through TVM's debug entry point and compared with the keys and values (RoPE applied)
that transformers computes on the same weights; its float type shows in the read, which takes arrays of
exactly that type. The library's logits are compared with transformers as in test_logits.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm

from megrez_mlc.runtime.model_lib import ModelLibrary

from .conftest import reference_model
from .test_logits import TOLERANCE, assert_close, ours_and_reference

# Into a float16 cache, q/k/v are rounded to float16 (relative 2**-11) before RoPE, whose rotation mixes two
# rounded inputs (up to sqrt(2) x 2**-11 of the largest), and the rotated key is rounded again: on top of
# the float32 model's error (1e-4 of the largest value), the bound on what the cache holds. In the logits
# that rounding is amplified by the softmax and the layers after it: the tiny model measures 1.7e-3 x
# max |logit| (a float16 model, rounding every activation, 2-3e-3; test_logits.py allows it 1e-2).
FLOAT16_ROUNDING = 2.0**-11
CACHE_TOLERANCE = {("q4f32_1", "float16"): (1 + np.sqrt(2)) * FLOAT16_ROUNDING + TOLERANCE["q4f32_1"]}
LOGIT_TOLERANCE = {("q4f32_1", "float16"): 5e-3}
OTHER_TYPE = {"float16": "float32", "float32": "float16"}
PROMPT = np.random.default_rng(11).integers(0, 300, 29).tolist()


def cached_keys_and_values(lib: ModelLibrary, seq_id: int, length: int, dtype: str) -> tuple[np.ndarray, ...]:
    """The cache's keys and values of a sequence, [layers, positions, kv_heads, head_dim] each, read as
    `dtype` (TVM refuses arrays of another type)."""
    kv = lib.metadata["kv_cache"]
    shape = (kv["num_hidden_layers"], length, kv["num_key_value_heads"], kv["head_dim"])
    keys, values = (tvm.runtime.tensor(np.zeros(shape, dtype)) for _ in range(2))
    tvm.get_global_func("vm.builtin.attention_kv_cache_debug_get_kv")(
        lib.kv_cache, seq_id, 0, length, keys, values
    )
    return keys.numpy(), values.numpy()


def transformers_keys_and_values(model) -> tuple[np.ndarray, np.ndarray]:
    """transformers' cache after PROMPT, in the layout above."""
    with torch.no_grad():
        out = reference_model(model.hf_dir, model.model_dir)(torch.tensor([PROMPT]), use_cache=True)
    layers = out.cache.layers  # each [batch, kv_heads, positions, head_dim]
    keys, values = (
        np.stack([getattr(layer, part)[0].transpose(0, 1).numpy() for layer in layers])
        for part in ("keys", "values")
    )
    return keys, values


@pytest.mark.parametrize(("quantization", "kv_cache_dtype"), [("q4f32_1", "float16"), ("q4f16_1", "float32")])
def test_the_cache_holds_its_type(built, quantization: str, kv_cache_dtype: str) -> None:
    """A float16 cache for a float32 model, a float32 one for a float16 model (exact kernels): the cached
    keys and values are of that type and within its rounding of transformers', and so are the logits."""
    model = built(quantization, "exact", kv_cache_dtype)
    lib = ModelLibrary(model.model_dir, model.lib)
    seq = lib.add_sequence()
    lib.prefill([seq], [PROMPT])
    ours = cached_keys_and_values(lib, seq, len(PROMPT), kv_cache_dtype)
    with pytest.raises(Exception, match="dtype"):
        cached_keys_and_values(lib, seq, len(PROMPT), OTHER_TYPE[kv_cache_dtype])
    key = (quantization, kv_cache_dtype)
    for cached, reference in zip(ours, transformers_keys_and_values(model)):
        assert_close(cached.astype(np.float32), reference, CACHE_TOLERANCE.get(key, TOLERANCE[quantization]))
    logits, reference_logits = ours_and_reference(model, PROMPT)
    assert_close(logits, reference_logits, LOGIT_TOLERANCE.get(key, TOLERANCE[quantization]))
