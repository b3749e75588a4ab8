"""File formats: tensor-cache.json + shards, mlc-chat-config.json, and the config loader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megrez_mlc.artifacts.tensor_cache import read_index
from megrez_mlc.config import ModelConfig, load_hf_model_config
from megrez_mlc.quantize.checkpoint import Checkpoint
from megrez_mlc.quantize.gen_config import gen_config

from .conftest import run_cli


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
    gen_config(tiny_hf, tmp_path / "m", "q0f16", context_window_size=256, prefill_chunk_size=64)
    chat = json.loads((tmp_path / "m" / "mlc-chat-config.json").read_text())
    assert chat["context_window_size"] == 256 and chat["prefill_chunk_size"] == 64
    assert chat["model_config"]["context_window_size"] == 256


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
