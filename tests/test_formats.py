"""File formats: tensor-cache.json + shards, mlc-chat-config.json, and the config loader."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest

from megrez_mlc.config import ModelConfig, load_hf_model_config, load_preset
from megrez_mlc.errors import MegrezError
from megrez_mlc.quantize.checkpoint import Checkpoint
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.quantize.tensor_cache import TensorCacheWriter, load_tensors, read_index

from .conftest import run_cli


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


def test_converted_model_index_matches_mlc_schema(built) -> None:
    model = built("q4f16_1")
    index = read_index(model.model_dir)
    meta = index["metadata"]
    config, _ = load_hf_model_config(model.hf_dir)
    float_params = sum(
        int(np.prod(Checkpoint(model.hf_dir).info(n).shape)) for n in Checkpoint(model.hf_dir).names()
    )
    assert meta["ParamSize"] == float_params
    assert meta["ParamBytes"] == sum(s["nbytes"] for s in index["records"])
    assert meta["BitsPerParam"] == pytest.approx(8 * meta["ParamBytes"] / meta["ParamSize"])
    names = [r["name"] for s in index["records"] for r in s["records"]]
    assert names[:4] == [
        "model.embed_tokens.q_weight",
        "model.embed_tokens.q_scale",
        "model.layers.0.self_attn.qkv_proj.q_weight",
        "model.layers.0.self_attn.qkv_proj.q_scale",
    ]
    assert "model.layers.1.post_attention_layernorm.weight" in names and names[-1] == "lm_head.q_scale"
    assert len(names) == 2 + config.num_hidden_layers * 10 + 1 + 2


def test_chat_config_fields(built) -> None:
    model = built("q4f32_1")
    chat = json.loads((model.model_dir / "mlc-chat-config.json").read_text())
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model.hf_dir / "tokenizer.json"))
    stop_ids = [tok.token_to_id(t) for t in ("<|turn_end|>", "<|eos|>", "<|turn_end>")]
    assert chat["model_type"] == "llama" and chat["quantization"] == "q4f32_1"
    assert chat["conv_template"]["name"] == "megrez"
    assert chat["conv_template"]["stop_token_ids"] == stop_ids == chat["eos_token_id"]
    assert chat["pad_token_id"] == tok.token_to_id("<|pad|>")
    assert (chat["temperature"], chat["top_p"], chat["repetition_penalty"]) == (0.7, 0.9, 1.02)
    assert chat["context_window_size"] == 512 and chat["prefill_chunk_size"] == 512
    assert chat["model_config"]["position_embedding_base"] == 5e6
    assert chat["tokenizer_files"] == ["tokenizer.json", "tokenizer_config.json"]
    assert (model.model_dir / "tokenizer.json").read_bytes() == (model.hf_dir / "tokenizer.json").read_bytes()
    restored = ModelConfig.from_mlc_dict(chat["model_config"])
    assert restored == load_hf_model_config(model.hf_dir)[0]


def test_gen_config_overrides(tiny_hf: Path, tmp_path: Path) -> None:
    chat = gen_config(tiny_hf, tmp_path / "m", "q0f16", context_window_size=256, prefill_chunk_size=64)
    assert chat["context_window_size"] == 256 and chat["prefill_chunk_size"] == 64
    assert chat["model_config"]["context_window_size"] == 256


def test_preset_fills_missing_fields_and_checkpoint_wins(tmp_path: Path, caplog) -> None:
    hf = tmp_path / "Megrez-3B-Instruct"
    hf.mkdir()
    preset = load_preset("megrez-3b-instruct")["model_config"]
    config = {k: v for k, v in preset.items() if k not in ("head_dim", "rope_theta")}
    config["rms_norm_eps"] = 1e-6  # disagrees with the preset
    (hf / "config.json").write_text(json.dumps(config))
    with caplog.at_level(logging.WARNING, logger="megrez_mlc"):
        loaded, used = load_hf_model_config(hf)
    assert used is not None and used["name"] == "megrez-3b-instruct"
    assert loaded.rope_theta == 5e6 and loaded.head_dim == 64  # filled from the preset
    assert loaded.rms_norm_eps == 1e-6  # the checkpoint wins
    assert "rms_norm_eps=1e-06 but the preset says 1e-05" in caplog.text
    assert (loaded.num_attention_heads, loaded.num_key_value_heads, loaded.hidden_size) == (40, 10, 2560)


def test_config_without_preset_uses_llama_defaults(tmp_path: Path) -> None:
    hf = tmp_path / "some-llama"
    hf.mkdir()
    (hf / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 96,
                "intermediate_size": 200,
                "num_hidden_layers": 2,
                "num_attention_heads": 6,
                "vocab_size": 100,
                "tie_word_embeddings": True,
            }
        )
    )
    config, preset = load_hf_model_config(hf)
    assert preset is None
    assert config.head_dim == 16 and config.num_key_value_heads == 6 and config.tie_word_embeddings
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "not LlamaForCausalLM"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 4.0}}, "RoPE type 'longrope' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"quantization_config": {"quant_method": "gptq"}}, "already-quantized checkpoint"),
        ({"sliding_window": 4096}, "sliding-window attention is not supported"),
        ({"pretraining_tp": 2}, "pretraining_tp > 1 is not supported"),
        ({"num_attention_heads": "four"}, "num_attention_heads must be an int, got 'four'"),
        ({"tie_word_embeddings": "false"}, "tie_word_embeddings must be a boolean, got 'false'"),
        ({"rms_norm_eps": -1e-6}, "rms_norm_eps must be a positive number"),
        ({"rope_theta": "5e6"}, "rope_theta must be a number"),
    ],
)
def test_unsupported_configs_are_refused(tiny_hf: Path, tmp_path: Path, change: dict, message: str) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    config = json.loads((tiny_hf / "config.json").read_text()) | change
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(MegrezError, match=message):
        load_hf_model_config(hf)


FOUR_HEADS = object()  # config.json with "num_attention_heads": "four"


@pytest.mark.parametrize(
    ("verb", "file", "content", "message"),
    [
        ("convert-weight", "config.json", "[1, 2]", "config.json holds a JSON list, not an object"),
        ("gen-config", "config.json", "[1, 2]", "config.json holds a JSON list, not an object"),
        ("convert-weight", "config.json", FOUR_HEADS, "num_attention_heads must be an int, got 'four'"),
        ("gen-config", "config.json", FOUR_HEADS, "num_attention_heads must be an int, got 'four'"),
        ("gen-config", "tokenizer.json", '{"model": ', "tokenizer.json is not valid JSON"),
        ("gen-config", "generation_config.json", '{"eos_token_id": [5, 100000]}', "eos_token_id 100000"),
        (
            "gen-config",
            "generation_config.json",
            '{"temperature": "hot"}',
            "temperature = 'hot', not a number",
        ),
    ],
)
def test_broken_checkpoint_files_are_one_line_errors(
    tiny_hf: Path, tmp_path: Path, verb: str, file: str, content: object, message: str
) -> None:
    hf = tmp_path / "hf"
    shutil.copytree(tiny_hf, hf)
    if content is FOUR_HEADS:
        content = json.dumps(json.loads((hf / "config.json").read_text()) | {"num_attention_heads": "four"})
    (hf / file).write_text(content)
    out = tmp_path / "out"
    proc = run_cli(verb, str(hf), "-q", "q4f32_1", "-o", str(out), check=False)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and message in proc.stderr
    assert not out.exists()
