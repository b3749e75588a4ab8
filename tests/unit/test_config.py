"""Reading a model's shape: config.json (with presets and LLaMA defaults), the checks on its fields, and the
mlc-chat-config.json "model_config" round trip. (Both RoPE layouts and the RoPE math: tests/test_rope.py.)"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import pytest

from megrez_mlc.config import (
    ModelConfig,
    guess_preset,
    load_hf_model_config,
    load_preset,
    preset_names,
    read_hf_config,
)
from megrez_mlc.errors import MegrezError
from megrez_mlc.tiny import TinyShape, hf_config

# The config.json of the tests' tiny checkpoint (tiny.make_tiny_checkpoint writes exactly this).
TINY_HF = hf_config(TinyShape(), vocab_size=322, tie=False, eos_id=305, dtype="float32")


# --- config.json --------------------------------------------------------------------------------------------


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
        # the types transformers' LlamaConfig would not take either
        ({"hidden_size": 96.0}, "config.json's hidden_size must be an int, got 96.0; fix config.json"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be an int, got True"),
        ({"attention_bias": "false"}, "attention_bias must be a boolean, got 'false'"),
        ({"mlp_bias": 0}, "mlp_bias must be a boolean, got 0"),
        ({"vocab_size": None}, "config.json lacks the field 'vocab_size'; is this a LLaMA checkpoint?"),
        ({"head_dim": 17}, "head_dim must be even for rotary embeddings, got 17"),
        ({"num_key_value_heads": 0}, "model config field num_key_value_heads must be positive, got 0"),
        ({"rope_scaling": [2.0]}, "must be an object, got [2.0]"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path: Path, change: dict, message: str) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps(TINY_HF | change))
    with pytest.raises(MegrezError, match=re.escape(message)):
        load_hf_model_config(hf)


@pytest.mark.parametrize(("value", "shown"), [("1e-5", "'1e-5'"), (math.nan, "nan"), (math.inf, "inf")])
def test_a_float_field_refuses_strings_and_non_finite_numbers(value: object, shown: str) -> None:
    with pytest.raises(MegrezError, match=rf"config\.json's rms_norm_eps must be a number, got {shown}; fix"):
        ModelConfig.from_hf_dict(TINY_HF | {"rms_norm_eps": value})


def test_folders_that_are_not_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(MegrezError) as caught:
        read_hf_config(tmp_path / "missing")
    assert str(caught.value) == (
        f"{tmp_path / 'missing'} is not a directory; pass the folder of a Hugging Face checkpoint"
    )
    with pytest.raises(MegrezError) as caught:
        read_hf_config(tmp_path)
    assert str(caught.value) == (
        f"{tmp_path / 'config.json'} not found; "
        "pass the folder of a Hugging Face checkpoint (with config.json)"
    )
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(MegrezError, match=re.escape("config.json holds a JSON list, not an object")):
        read_hf_config(tmp_path)


# --- presets ------------------------------------------------------------------------------------------------


def test_the_megrez_preset_is_megrez_3b_in_mlc_names() -> None:
    config = ModelConfig.from_hf_dict(load_preset("megrez-3b-instruct")["model_config"])
    assert config.to_mlc_dict() == {
        "hidden_size": 2560,
        "intermediate_size": 7168,
        "num_attention_heads": 40,
        "num_hidden_layers": 32,
        "rms_norm_eps": 1e-05,
        "vocab_size": 122880,
        "tie_word_embeddings": False,
        "position_embedding_base": 5e6,
        "rope_scaling": None,
        "context_window_size": 32768,
        "num_key_value_heads": 10,
        "head_dim": 64,
        "attention_bias": False,
        "mlp_bias": False,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
    }


def test_presets_are_found_by_name_folder_or_recorded_path(tmp_path: Path) -> None:
    assert "megrez-3b-instruct" in preset_names()
    assert guess_preset(tmp_path / "Megrez-3B-Instruct-fp16", {}) == "megrez-3b-instruct"
    assert guess_preset(tmp_path / "model", {"_name_or_path": "Infinigence/Megrez_3B_Instruct"}) == (
        "megrez-3b-instruct"
    )
    assert guess_preset(tmp_path / "llama-2-7b", {"_name_or_path": "meta/llama"}) is None
    with pytest.raises(MegrezError) as caught:
        load_preset("llama-9000")
    assert (
        str(caught.value) == f"unknown model preset 'llama-9000'; choose one of: {', '.join(preset_names())}"
    )


# --- mlc-chat-config.json's model_config --------------------------------------------------------------------

VARIANTS = {
    "plain": {},
    "linear": {"rope_scaling": {"rope_type": "linear", "factor": 2.5}},
    "llama3": {
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 128,
        }
    },
    "yarn": {
        "rope_scaling": {
            "type": "yarn",
            "factor": 4.0,
            "original_max_position_embeddings": 128,
            "beta_fast": 16.0,
            "truncate": False,
        }
    },
    "dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    "transformers-5-layout": {"rope_parameters": {"rope_theta": 1e6, "rope_type": "linear", "factor": 3.0}},
    "biases-and-tied-embeddings": {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True},
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_mlc_model_config_round_trips(variant: str) -> None:
    config = ModelConfig.from_hf_dict(TINY_HF | VARIANTS[variant])
    stored = json.loads(json.dumps(config.to_mlc_dict()))  # as mlc-chat-config.json holds it
    restored = ModelConfig.from_mlc_dict(stored)
    assert restored == config
    assert restored.to_mlc_dict() == stored


def test_what_the_round_trip_carries() -> None:
    """The values read from config.json, not only their survival: RoPE parameters, theta, biases."""
    yarn = ModelConfig.from_hf_dict(TINY_HF | VARIANTS["yarn"])
    assert yarn.to_mlc_dict()["rope_scaling"] == {
        "rope_type": "yarn",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 16.0,
        "beta_slow": 1.0,
        "truncate": False,
        "attention_factor": 0.1 * math.log(4.0) + 1.0,  # yarn's default mscale
    }
    v5 = ModelConfig.from_hf_dict(TINY_HF | VARIANTS["transformers-5-layout"]).to_mlc_dict()
    assert (v5["position_embedding_base"], v5["rope_scaling"]["factor"]) == (1e6, 3.0)
    dynamic = ModelConfig.from_hf_dict(TINY_HF | VARIANTS["dynamic"])
    assert dynamic.rope_scaling.original_max_position_embeddings == dynamic.context_window_size == 512
    both = ModelConfig.from_hf_dict(TINY_HF | VARIANTS["biases-and-tied-embeddings"]).to_mlc_dict()
    assert (both["attention_bias"], both["mlp_bias"], both["tie_word_embeddings"]) == (True, True, True)


def test_an_mlc_config_written_before_biases_existed_has_none() -> None:
    stored = ModelConfig.from_hf_dict(TINY_HF).to_mlc_dict()
    del stored["attention_bias"], stored["mlp_bias"]
    restored = ModelConfig.from_mlc_dict(stored)
    assert (restored.attention_bias, restored.mlp_bias) == (False, False)


@pytest.mark.parametrize(
    ("change", "missing", "garbled"),
    [
        ({}, "head_dim", "'head_dim'"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0, "bogus": 1}}, None, "'bogus'"),
        ({"hidden_size": "2560"}, None, "'<=' not supported"),
    ],
)
def test_a_broken_mlc_model_config_says_to_regenerate_it(
    change: dict, missing: str | None, garbled: str
) -> None:
    stored = ModelConfig.from_hf_dict(TINY_HF).to_mlc_dict() | change
    stored.pop(missing, None)
    with pytest.raises(MegrezError) as caught:
        ModelConfig.from_mlc_dict(stored)
    message = str(caught.value)
    assert message.startswith("mlc-chat-config.json's model_config lacks or garbles ")
    assert garbled in message
    assert message.endswith("; regenerate it with `megrez-mlc gen-config`")


def test_omni_placeholders_need_the_tokenizers_tokens() -> None:
    from megrez_mlc.omni.config import AudioConfig, audio_processor_config

    audio = AudioConfig(n_mels=80, n_ctx=1500, n_state=52, n_head=4, n_layer=2, output_dim=264)
    ids = {"<|audio_start|>": 120020, "<|audio_end|>": 120021, "<|unk|>": 120001}
    assert audio_processor_config(audio, ids).token_ids == ids
    with pytest.raises(MegrezError, match=r"^the tokenizer has no <\|audio_end\|> token, which the audio"):
        audio_processor_config(audio, {k: v for k, v in ids.items() if k != "<|audio_end|>"})
