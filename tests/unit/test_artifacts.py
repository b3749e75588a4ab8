"""Artifact formats without a model: the tensor cache, mlc-chat-config.json and the limits rule."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest

from megrez_mlc.artifacts.chat_config import ChatConfig, Limits, read_chat_config, resolve_limits
from megrez_mlc.artifacts.tensor_cache import TensorCacheWriter, load_tensors, read_index
from megrez_mlc.config import ModelConfig
from megrez_mlc.errors import MegrezError
from megrez_mlc.rope import RopeScaling


def test_tensor_cache_round_trip_is_byte_identical(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        "a.q_weight": rng.integers(0, 2**32, (40, 12), dtype=np.uint32),
        "a.q_scale": rng.standard_normal((40, 3)).astype(np.float16),
        "b.weight": rng.standard_normal((50, 30)).astype(np.float32),
        "c.weight": rng.standard_normal(7).astype(np.float32),
    }
    writer = TensorCacheWriter(tmp_path, shard_limit=4096)  # small shards: several files, one oversize tensor
    for name, array in tensors.items():
        writer.add(name, array)
    writer.finish()
    back = load_tensors(tmp_path)
    assert list(back) == list(tensors)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].tobytes() == array.tobytes()
    index = read_index(tmp_path)
    assert [s["dataPath"] for s in index["records"]] == [
        "params_shard_0.bin",
        "params_shard_1.bin",
        "params_shard_2.bin",
    ]
    for shard in index["records"]:
        data = (tmp_path / shard["dataPath"]).read_bytes()
        assert shard["format"] == "raw-shard" and shard["nbytes"] == len(data)
        assert shard["md5sum"] == hashlib.md5(data).hexdigest()
        for rec in shard["records"]:
            assert rec["format"] == "raw"
            assert (
                data[rec["byteOffset"] : rec["byteOffset"] + rec["nbytes"]] == tensors[rec["name"]].tobytes()
            )


def chat_config() -> ChatConfig:
    """Every field away from its default."""
    model = ModelConfig(
        hidden_size=70,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=18,
        vocab_size=625,
        rms_norm_eps=3e-6,
        rope_theta=5e5,
        context_window_size=300,
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(
            rope_type="yarn", factor=3.0, original_max_position_embeddings=100, truncate=False
        ),
        attention_bias=True,
        mlp_bias=True,
    )
    return ChatConfig(
        quantization="q4f16_1",
        model_config=model,
        prefill_chunk_size=96,
        temperature=0.2,
        top_p=0.8,
        repetition_penalty=1.1,
        tokenizer_files=("tokenizer.json", "merges.txt"),
        conv_template={"name": "megrez", "stop_token_ids": [3, 5]},
        pad_token_id=7,
        bos_token_id=None,
        eos_token_id=(3, 5, 9),
    )


def test_chat_config_round_trip(tmp_path: Path) -> None:
    config = chat_config()
    config.write(tmp_path)
    folder, back = read_chat_config(tmp_path)
    assert folder == tmp_path and back == config
    written = json.loads((tmp_path / "mlc-chat-config.json").read_text())
    assert written["context_window_size"] == written["model_config"]["context_window_size"] == 300
    assert written["prefill_chunk_size"] == written["model_config"]["prefill_chunk_size"] == 96
    assert written["model_config"]["rope_scaling"]["rope_type"] == "yarn"
    assert (written["version"], written["model_type"], written["sliding_window_size"]) == (
        "0.1.0",
        "llama",
        -1,
    )
    assert read_chat_config(tmp_path / "mlc-chat-config.json")[1] == config  # the file itself works too


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{", "is not valid JSON"),
        ("[]", "holds a JSON list, not an object; run gen-config again"),
        ('{"quantization": "q4f16_1"}', "garbles"),
    ],
)
def test_broken_chat_config_is_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "mlc-chat-config.json").write_text(content)
    with pytest.raises(MegrezError, match=message):
        read_chat_config(tmp_path)


DEFAULTS = Limits(context_window_size=512, prefill_chunk_size=2048, max_batch_size=32)


def test_limits_default_chunk_is_cut_to_the_window_and_requests_win() -> None:
    assert resolve_limits(DEFAULTS) == Limits(512, 512, 32)
    assert resolve_limits(DEFAULTS, context_window_size=100) == Limits(100, 100, 32)
    assert resolve_limits(DEFAULTS, prefill_chunk_size=64, max_batch_size=3) == Limits(512, 64, 3)
    assert resolve_limits(DEFAULTS, context_window_size=4096) == Limits(4096, 2048, 32)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            {"prefill_chunk_size": 513},
            "--prefill-chunk-size 513 is larger than the context window (512 tokens)",
        ),
        ({"context_window_size": 0}, "--context-window-size must be at least 1, got 0"),
        ({"max_batch_size": -1}, "--max-batch-size must be at least 1, got -1"),
    ],
)
def test_limits_refuse_what_cannot_work(request_: dict, message: str) -> None:
    with pytest.raises(MegrezError, match=re.escape(message)):
        resolve_limits(DEFAULTS, **request_)


def test_a_compiled_library_cannot_grow() -> None:
    compiled = Limits(512, 128, 8)
    assert resolve_limits(compiled, prefill_chunk_size=64, max_batch_size=2, compiled="lib") == Limits(
        512, 64, 2
    )
    with pytest.raises(MegrezError, match="a prefill chunk of 129 tokens does not fit lib, compiled for"):
        resolve_limits(compiled, prefill_chunk_size=129, compiled="lib")
    with pytest.raises(MegrezError, match="lib was compiled for 1 to 8 sequences at once, not 9"):
        resolve_limits(compiled, max_batch_size=9, compiled="lib")
