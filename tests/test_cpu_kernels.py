"""The CPU kernels that replace TVM's reference ones: attention over many pages and query tiles, batched
prefill of ragged prompts, and the bench verb that measures them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from megrez_mlc.runtime.model_lib import ModelLibrary

from .conftest import reference_model, run_cli
from .test_logits import assert_close, ours_and_reference


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1"])
def test_long_prompt_over_many_pages_in_chunks(built, quantization: str) -> None:
    """150 tokens in chunks of 64: the ragged kernel sees partial query tiles and key blocks, the paged
    prefill kernel attends to 4-8 earlier pages, decode spans 11 pages; all against transformers."""
    prompt = np.random.default_rng(10).integers(0, 300, 150).tolist()
    ours, ref = ours_and_reference(built(quantization), prompt, prefill_chunk_size=64)
    assert_close(ours, ref, 1e-4)


def test_batched_prefill_of_ragged_prompts_matches_transformers(built) -> None:
    """Six prompts of different lengths prefilled in one call (batch_prefill, one ragged attention over
    the batch), then decoded together (batch_decode): each sequence's logits equal transformers' alone."""
    model = built("q4f32_1")
    lib = ModelLibrary(model.model_dir, model.lib, max_batch_size=8)
    hf = reference_model(model.hf_dir, model.model_dir)
    rng = np.random.default_rng(11)
    prompts = [rng.integers(0, 300, n).tolist() for n in (5, 37, 18, 1, 29, 11)]
    seqs = [lib.add_sequence() for _ in prompts]
    ours = [lib.prefill(seqs, prompts)]
    histories = [list(p) for p in prompts]
    for _ in range(4):
        nxt = [int(np.argmax(row)) for row in ours[-1]]
        for history, token in zip(histories, nxt):
            history.append(token)
        ours.append(lib.decode(seqs, nxt))
    for i, history in enumerate(histories):
        with torch.no_grad():
            ref = hf(torch.tensor([history])).logits[0].numpy()[len(prompts[i]) - 1 :]
        assert_close(np.stack([step[i] for step in ours]), ref, 1e-4)


def test_bench_reports_consistent_numbers(built) -> None:
    model = built("q4f32_1")
    proc = run_cli(
        "bench",
        str(model.model_dir),
        "--model-lib",
        str(model.lib),
        "--prompt-len",
        "40",
        "--gen-len",
        "9",
        "--batch",
        "2",
        "--threads",
        "1",
        "--runs",
        "2",
        "--json",
    )
    result = json.loads(proc.stdout)
    assert (result["prompt_len"], result["gen_len"], result["batch"], result["threads"], result["runs"]) == (
        40,
        9,
        2,
        1,
        2,
    )
    # time to first token is the prefill plus one argmax: at least the prefill of 2 x 40 tokens (the JSON
    # rounds to 0.01, a few percent of the tiny model's sub-millisecond prefill)
    prefill_ms = 1e3 * 80 / result["prefill_tok_s"]
    assert result["ttft_ms"] >= prefill_ms - 0.01
    assert result["decode_tok_s"] > 0 and result["peak_rss_mb"] > 50


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--threads", "0"], "--threads must be at least 1"),
        (["--prompt-len", "600"], "exceeds the library's"),
    ],
)
def test_bench_bad_options(built, args: list[str], message: str) -> None:
    model = built("q4f32_1")
    proc = run_cli("bench", str(model.model_dir), "--model-lib", str(model.lib), *args, check=False)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("quantization", ["q4f32_1", "q4f16_1"])
def test_megrez_head_dim_64_kernels(tiny_hf_gpu, tmp_path, quantization: str) -> None:
    """head_dim 64 (Megrez's) takes the 16-lane paths of the attention kernels (the 16 -> 4 lane folding
    of Q.K): logits against transformers over a chunked 80-token prompt."""
    from .conftest import build
    from .test_logits import TOLERANCE

    model = build(tiny_hf_gpu, quantization, tmp_path)
    prompt = np.random.default_rng(12).integers(0, 300, 80).tolist()
    ours, ref = ours_and_reference(model, prompt, prefill_chunk_size=32)
    assert_close(ours, ref, TOLERANCE[quantization])
