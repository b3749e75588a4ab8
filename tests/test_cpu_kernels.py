"""The CPU kernels that replace TVM's reference ones: attention over many pages and query tiles, batched
prefill of ragged prompts, and the bench verb that measures them."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import tvm
from tvm import te, tirx

from megrez_mlc.artifacts.int4 import dequantize_int4, quantize_int4, quantized_shapes
from megrez_mlc.compile import ops
from megrez_mlc.compile.compiler import compile_model
from megrez_mlc.compile.cpu_schedule import cpu_schedule_passes
from megrez_mlc.compile.targets import host_llvm_target
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.runtime.model_lib import ModelLibrary
from megrez_mlc.tiny import TinyShape, make_tiny_checkpoint

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


# --- every shape: schedules for sizes the tiles do not divide -----------------------------------------------


def _matmul_function(n: int, k: int, tokens: int | None, quantized: bool, token_axis: int, out_dtype: str):
    """One (dequantize +) matmul PrimFunc as the model emits it: x [1, M, K] or [M, 1, K] (M symbolic, or
    the static single token of a decode step when `tokens` is None) times an [N, K] weight."""
    m = tirx.Var("m", "int64") if tokens else 1
    x = te.placeholder((1, m, k) if token_axis == 1 else (m, 1, k), "float32", "x")
    if not quantized:
        weight = te.placeholder((n, k), "float32", "w")
        return [x, weight, ops.matmul_nt(x, weight, out_dtype)]
    (words_n, words), (scales_n, groups) = quantized_shapes(n, k)
    q_weight = te.placeholder((words_n, words), "uint32", "w")
    q_scale = te.placeholder((scales_n, groups), "float32", "s")
    if tokens is None:
        return [x, q_weight, q_scale, ops.dequantize_gemv_cpu(x, q_weight, q_scale, k, out_dtype)]
    return [x, q_weight, q_scale, ops.dequantize_matmul_nt(x, q_weight, q_scale, k, out_dtype, "float32")]


@pytest.mark.parametrize(
    ("n", "k", "tokens", "quantized", "token_axis", "out_dtype"),
    [
        (625, 72, 13, True, 1, "float32"),  # the vocabulary that crashed the GEMM schedule
        (2039, 37, 9, True, 1, "float32"),  # prime vocabulary, K far from a whole int4 group
        (1009, 70, 17, False, 0, "float32"),  # prime, unquantized, tokens on the batch axis (batch_decode)
        (74, 100, 8, True, 1, "float16"),  # gate_up of intermediate 37, a float16 epilogue
        (7, 37, 3, False, 1, "float16"),  # narrower than one column tile
        (2560, 64, 11, True, 1, "float32"),  # tiles divide: the unpadded fast path
        (625, 37, None, True, 1, "float32"),  # decode: the quantized GEMV
        (1009, 37, None, False, 1, "float32"),  # decode: the float GEMV, K not a multiple of its lanes
    ],
)
def test_cpu_matmul_schedules_match_numpy_for_any_shape(
    n: int, k: int, tokens: int | None, quantized: bool, token_axis: int, out_dtype: str
) -> None:
    args = _matmul_function(n, k, tokens, quantized, token_axis, out_dtype)
    target = host_llvm_target()
    mod = tvm.IRModule({"main": te.create_prim_func(args).with_attr("global_symbol", "main")})
    with target:
        scheduled = cpu_schedule_passes(target)[0](mod)
    assert scheduled["main"].attrs.get("tirx.is_scheduled"), "no CPU rule scheduled the matmul"
    library = tvm.compile(scheduled, target=target)

    rng = np.random.default_rng(n + k)
    rows = tokens or 1
    x = rng.standard_normal((1, rows, k) if token_axis == 1 else (rows, 1, k)).astype(np.float32)
    weight = rng.standard_normal((n, k)).astype(np.float32)
    if quantized:
        q_weight, q_scale = quantize_int4(weight, "float32")
        weight, inputs = dequantize_int4(q_weight, q_scale, k), [q_weight, q_scale]
    else:
        inputs = [weight]
    out = tvm.runtime.tensor(np.zeros((*x.shape[:2], n), out_dtype))
    library["main"](tvm.runtime.tensor(x), *map(tvm.runtime.tensor, inputs), out)
    expected = x @ weight.T
    tolerance = 2e-2 if out_dtype == "float16" else 1e-4
    np.testing.assert_allclose(out.numpy().astype(np.float32), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    ("quantization", "shape", "extra_vocab"),
    [
        # vocab 625 (= 300 BPE + 15 special + 310), sizes off every tile, head_dim 80, GQA 3
        (
            "q4f32_1",
            TinyShape(
                hidden_size=70,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=6,
                num_key_value_heads=2,
                head_dim=80,
            ),
            310,
        ),
        # prime vocab 1009, head_dim 256 without GQA; then head_dim 18 with GQA 8
        (
            "q0f32",
            TinyShape(
                hidden_size=100,
                intermediate_size=250,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=256,
            ),
            694,
        ),
        (
            "q4f16_1",
            TinyShape(
                hidden_size=72,
                intermediate_size=100,
                num_hidden_layers=1,
                num_attention_heads=8,
                num_key_value_heads=1,
                head_dim=18,
            ),
            8,
        ),
    ],
)
def test_odd_shapes_compile_for_cpu(tmp_path, quantization: str, shape: TinyShape, extra_vocab: int) -> None:
    hf_dir = make_tiny_checkpoint(tmp_path / "hf", shape=dataclasses.replace(shape, extra_vocab=extra_vocab))
    gen_config(hf_dir, tmp_path / "model", quantization)
    result = compile_model(tmp_path / "model", "cpu", tmp_path / "lib.so")
    assert result.output.stat().st_size > 0
    assert result.metadata["params"][0]["shape"][0] == 315 + extra_vocab  # the embedding's rows: the vocab
