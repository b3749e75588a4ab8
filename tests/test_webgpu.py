"""The webgpu device on this machine: megrez-mlc's WebGPU runtime (megrez_mlc/webgpu) running TVM's WGSL
kernels through wgpu-native, here on Mesa's lavapipe (a Vulkan device on the CPU; .ci/run installs it).

Three levels: the runtime itself (copies, scalar arguments, grids wider than a dimension allows), each kernel
kind the model uses scheduled as the compiler schedules it and checked alone against numpy on odd shapes,
and whole tiny models whose greedy tokens must equal the CPU's exact kernels, through the API and the CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import openai
import pytest
import tvm
from tvm import relax, te, topi
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache
from tvm.runtime import ShapeTuple
from tvm.script import tirx as T

from megrez_mlc import webgpu
from megrez_mlc.artifacts.int4 import dequantize_int4, quantize_int4
from megrez_mlc.compile import ops
from megrez_mlc.compile.compiler import compile_model
from megrez_mlc.compile.gpu import gpu_schedule_passes
from megrez_mlc.compile.model import MegrezForCausalLM
from megrez_mlc.compile.pipeline import build_pipeline
from megrez_mlc.compile.rope_kernel import split_rotary
from megrez_mlc.compile.targets import host_llvm_target
from megrez_mlc.config import ModelConfig
from megrez_mlc.errors import MegrezError
from megrez_mlc.model_source import default_quantization, prepare_model
from megrez_mlc.rope import inv_freq_reference
from megrez_mlc.runtime.engine import Engine
from megrez_mlc.runtime.model_lib import check_fits_adapter
from megrez_mlc.runtime.sampling import SamplingParams
from megrez_mlc.tiny import TinyShape, make_tiny_checkpoint

from .conftest import BuiltModel, build, run_cli
from .test_serve import serving

ADAPTER = webgpu.open_adapter()  # no adapter fails the module: CI must run these on lavapipe
WEBGPU = tvm.target.Target({"kind": "webgpu"}, host=host_llvm_target())
DEVICE = tvm.device("webgpu", 0)
RNG = np.random.default_rng(7)
# float32 kernels sum in another order than numpy; float16 ones also round every stored value.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
DTYPES = ["float32", "float16"] if ADAPTER.shader_f16 else ["float32"]


def exported(executable) -> tvm.runtime.Module:
    """An executable as a user gets it: written as a .so and loaded (its kernels then go through the
    serialized webgpu module, the only form the runtime runs)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "lib.so"
        executable.export_library(str(path))
        return tvm.runtime.load_module(str(path))


def compile_kernel(name: str, func: tvm.tirx.PrimFunc):
    """One TIR function scheduled by the compiler's GPU rules and built for webgpu."""
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name)})
    with WEBGPU:
        mod = tvm.transform.Sequential(gpu_schedule_passes(WEBGPU))(mod)
    return exported(tvm.compile(mod, target=WEBGPU))[name]


def on_device(array: np.ndarray) -> tvm.runtime.Tensor:
    return tvm.runtime.tensor(array, DEVICE)


def empty(shape: tuple[int, ...], dtype: str) -> tvm.runtime.Tensor:
    return on_device(np.zeros(shape, dtype))


def assert_close(kernel: str, got: np.ndarray, expected: np.ndarray, dtype: str) -> None:
    scale = max(float(np.abs(expected).max()), 1.0)
    error = float(np.abs(got.astype(np.float64) - expected).max()) / scale
    assert error <= TOLERANCE[dtype], f"kernel {kernel} ({dtype}): relative error {error:.2e}"


# --- the runtime --------------------------------------------------------------------------------------------


@T.prim_func
def axpy(a: T.handle, b: T.handle, c: T.handle, n: T.int32, alpha: T.float32):
    A = T.match_buffer(a, (n,), "float32")
    B = T.match_buffer(b, (n,), "float32")
    C = T.match_buffer(c, (n,), "float32")
    for bx in T.thread_binding((n + 31) // 32, thread="blockIdx.x"):
        for tx in T.thread_binding(32, thread="threadIdx.x"):
            if bx * 32 + tx < n:
                C[bx * 32 + tx] = alpha * A[bx * 32 + tx] + B[bx * 32 + tx]


def test_the_adapter_and_its_limits() -> None:
    assert DEVICE.exist
    assert DEVICE.device_name == ADAPTER.name
    assert DEVICE.max_threads_per_block >= 256
    assert DEVICE.max_thread_dimensions[0] >= 256
    assert ADAPTER.max_storage_buffer_binding_size >= 1 << 27  # WebGPU's guaranteed minimum is 128 MiB


@pytest.mark.parametrize(
    "n", [0, 1, 1000, 32 * 65535 + 77]
)  # 0: no workgroups; the last: more than a dimension holds
def test_scalar_arguments_and_wide_grids(n: int) -> None:
    kernel = exported(tvm.compile(tvm.IRModule({"axpy": axpy}), target=WEBGPU))["axpy"]
    a, b = RNG.standard_normal((2, n)).astype(np.float32)
    out = empty((n,), "float32")
    kernel(on_device(a), on_device(b), out, n, -1.75)
    np.testing.assert_allclose(out.numpy(), -1.75 * a + b, rtol=1e-6, atol=1e-6)


def test_copies_of_partial_words() -> None:
    """int8 and float16 tensors whose sizes and offsets are not whole 32-bit words, which is all WebGPU's
    buffer copies take."""
    data = np.arange(11, dtype=np.int8)
    tensor = on_device(data)
    np.testing.assert_array_equal(tensor.numpy(), data)
    halves = RNG.standard_normal(7).astype(np.float16)
    np.testing.assert_array_equal(on_device(halves).numpy(), halves)
    target = empty((11,), "int8")
    tensor.copyto(target)  # device to device
    np.testing.assert_array_equal(target.numpy(), data)
    view = tvm.runtime.tensor(np.zeros(13, np.int8), DEVICE)
    view.copyfrom(np.full(13, -3, np.int8))
    np.testing.assert_array_equal(view.numpy(), np.full(13, -3, np.int8))


def webgpu_module(name: str, wgsl: str) -> tvm.runtime.Module:
    """A webgpu module as TVM serializes one (u64 counts and lengths): one kernel taking one read-write
    float32 buffer, launched over blockIdx.x."""

    def text(value: str) -> bytes:
        return struct.pack("<Q", len(value.encode())) + value.encode()

    handle = bytes([3, 64, 1, 0])  # DLDataType: opaque handle
    tags = text("blockIdx.x") + text("paramWriteAccess:[1]")
    info = text(name) + struct.pack("<Q", 1) + handle + struct.pack("<Q", 2) + tags + struct.pack("<Q", 0)
    data = struct.pack("<Q", 1) + text(name) + info + struct.pack("<Q", 1) + text(name) + text(wgsl)
    return tvm.get_global_func("ffi.Module.load_from_bytes.webgpu")(data)


def test_a_kernel_that_does_not_compile_is_named() -> None:
    kernel = webgpu_module("broken_kernel", "this is not WGSL")["broken_kernel"]
    with pytest.raises(Exception, match="webgpu: kernel broken_kernel: the WGSL does not compile"):
        kernel(empty((4,), "float32"), 1)


# --- each kernel kind alone ---------------------------------------------------------------------------------


def quantized(n: int, k: int, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    weight = RNG.standard_normal((n, k)).astype(np.float32) * 0.3
    q_weight, q_scale = quantize_int4(weight, dtype)
    return q_weight, q_scale, dequantize_int4(q_weight, q_scale, k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 37], ids=["gemv", "gemm"])
def test_dequantize_matmul(rows: int, dtype: str) -> None:
    n, k = 97, 131
    q_weight, q_scale, weight = quantized(n, k, dtype)
    seq = tvm.tirx.Var("seq_len", "int32")
    x = te.placeholder((1, seq, k), dtype, name="x")
    qw = te.placeholder(q_weight.shape, "uint32", name="q_weight")
    qs = te.placeholder(q_scale.shape, dtype, name="q_scale")
    out = ops.dequantize_matmul_nt(x, qw, qs, k, dtype)
    kernel = compile_kernel("dequantize_matmul", te.create_prim_func([x, qw, qs, out]))
    xs = RNG.standard_normal((1, rows, k)).astype(dtype)
    result = empty((1, rows, n), dtype)
    kernel(on_device(xs), on_device(q_weight), on_device(q_scale), result)
    assert_close("dequantize_matmul", result.numpy(), xs.astype(np.float64) @ weight.T, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype: str) -> None:
    rows, hidden, eps = 29, 73, 1e-5
    seq = tvm.tirx.Var("seq_len", "int32")
    x = te.placeholder((1, seq, hidden), dtype, name="x")
    w = te.placeholder((hidden,), dtype, name="weight")
    out = topi.nn.rms_norm(x, w, axis=[2], epsilon=eps)
    kernel = compile_kernel("rms_norm", te.create_prim_func([x, w, out]))
    xs = RNG.standard_normal((1, rows, hidden)).astype(dtype)
    ws = RNG.standard_normal(hidden).astype(dtype)
    result = empty((1, rows, hidden), dtype)
    kernel(on_device(xs), on_device(ws), result)
    x64 = xs.astype(np.float64)
    expected = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps) * ws
    assert_close("rms_norm", result.numpy(), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_times_up(dtype: str) -> None:
    rows, inter = 19, 101
    seq = tvm.tirx.Var("seq_len", "int32")
    gate_up = te.placeholder((1, seq, 2 * inter), dtype, name="gate_up")
    out = te.compute(
        (1, seq, inter),
        lambda b, s, i: tvm.tirx.sigmoid(gate_up[b, s, i]) * gate_up[b, s, i] * gate_up[b, s, i + inter],
        name="silu_multiply",
    )
    kernel = compile_kernel("silu_multiply", te.create_prim_func([gate_up, out]))
    xs = RNG.standard_normal((1, rows, 2 * inter)).astype(dtype)
    result = empty((1, rows, inter), dtype)
    kernel(on_device(xs), result)
    gate, up = xs.astype(np.float64)[..., :inter], xs.astype(np.float64)[..., inter:]
    assert_close("silu_multiply", result.numpy(), gate / (1 + np.exp(-gate)) * up, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_lookup(dtype: str) -> None:
    vocab, hidden = 311, 75
    q_weight, q_scale, table = quantized(vocab, hidden, dtype)
    n = tvm.tirx.Var("n", "int32")
    ids = te.placeholder((n,), "int32", name="ids")
    qw = te.placeholder(q_weight.shape, "uint32", name="q_weight")
    qs = te.placeholder(q_scale.shape, dtype, name="q_scale")
    out = ops.dequantize_take(qw, qs, ids, hidden, dtype)
    kernel = compile_kernel("dequantize_take", te.create_prim_func([qw, qs, ids, out]))
    token_ids = RNG.integers(0, vocab, 23).astype(np.int32)
    result = empty((23, hidden), dtype)
    kernel(on_device(q_weight), on_device(q_scale), on_device(token_ids), result)
    assert_close("dequantize_take", result.numpy(), table[token_ids], dtype)


def test_logit_positions_gather() -> None:
    """The one sampling-side kernel in the library: batch_prefill's pick of each sequence's last hidden
    state (sampling itself runs on the host over the float32 logits)."""
    seq, hidden, batch = tvm.tirx.Var("s", "int32"), 45, tvm.tirx.Var("b", "int32")
    x = te.placeholder((1, seq, hidden), "float32", name="hidden")
    positions = te.placeholder((batch,), "int32", name="positions")
    out = ops.take_positions(x, positions)
    kernel = compile_kernel("take_positions", te.create_prim_func([x, positions, out]))
    xs = RNG.standard_normal((1, 31, hidden)).astype(np.float32)
    picks = np.array([4, 17, 30], np.int32)
    result = empty((1, 3, hidden), "float32")
    kernel(on_device(xs), on_device(picks), result)
    np.testing.assert_array_equal(result.numpy(), xs[:, picks])


def rotate_reference(x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
    """Llama's rotate-half RoPE of x [n, heads, head_dim] at `positions`, in float64."""
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :].astype(np.float64)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    half = x.shape[-1] // 2
    first, second = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
    return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def odd_config(head_dim: int = 32) -> ModelConfig:
    return ModelConfig.from_hf_dict(
        {
            "architectures": ["LlamaForCausalLM"],
            "hidden_size": 5 * head_dim,
            "intermediate_size": 100,
            "num_hidden_layers": 1,
            "num_attention_heads": 5,
            "num_key_value_heads": 1,
            "head_dim": head_dim,
            "vocab_size": 311,
            "max_position_embeddings": 4096,
            "rope_theta": 123_457.0,
            "rms_norm_eps": 1e-6,
        }
    )


def test_rope() -> None:
    config = odd_config()
    q_heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    kernel = compile_kernel("fused_rope", split_rotary(config, "float32"))
    positions = np.sort(RNG.choice(4000, 41, replace=False)).astype(np.int32)
    qkv = RNG.standard_normal((41, q_heads + 2 * kv_heads, d)).astype(np.float32)
    outs = [empty((41, heads, d), "float32") for heads in (q_heads, kv_heads, kv_heads)]
    kernel(on_device(qkv), on_device(positions), *outs, 1)
    inv_freq = inv_freq_reference(config.rope_scaling, config.rope_theta, d)
    q, k, v = (out.numpy() for out in outs)
    # float32 angles of up to 4000 radians carry ~3e-4 absolute error (sin/cos of a rounded argument)
    np.testing.assert_allclose(q, rotate_reference(qkv[:, :q_heads], positions, inv_freq), atol=2e-3)
    np.testing.assert_allclose(
        k, rotate_reference(qkv[:, q_heads : q_heads + kv_heads], positions, inv_freq), atol=2e-3
    )
    np.testing.assert_array_equal(v, qkv[:, q_heads + kv_heads :])


class AttentionOnly(MegrezForCausalLM):
    """The model's paged KV cache and its attention, with nothing around them: q, k, v in, attention out."""

    def attend(self, qkv: nn.Tensor, paged_kv_cache: PagedKVCache) -> tuple[nn.Tensor, PagedKVCache]:
        c = self.config
        out = paged_kv_cache.attention_with_fused_qkv(
            0, qkv, c.num_attention_heads, sm_scale=c.head_dim**-0.5
        )
        return out, paged_kv_cache

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        c = self.config
        heads = c.num_attention_heads + 2 * c.num_key_value_heads
        spec = {
            "attend": {
                "qkv": nn.spec.Tensor(["batch_size", "seq_len", heads, c.head_dim], self.dtype),
                "paged_kv_cache": nn.spec.Object(object_type=PagedKVCache),
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
            "create_tir_paged_kv_cache": {
                name: int
                for name in (
                    "max_batch_size",
                    "max_total_seq_len",
                    "prefill_chunk_size",
                    "page_size",
                    "support_sliding_window",
                )
            }
            | {"$": {"param_mode": "none", "effect_mode": "none"}},
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)


def attention_reference(q: np.ndarray, k: np.ndarray, v: np.ndarray, start: int) -> np.ndarray:
    """Causal GQA attention of queries at positions start.. over keys 0.. (all float64)."""
    groups = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, groups, axis=1), np.repeat(v, groups, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
    mask = np.arange(k.shape[0])[None, :] > (start + np.arange(q.shape[0]))[:, None]
    scores = np.where(mask[None], -np.inf, scores)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", weights, v)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_prefill_and_decode(dtype: str) -> None:
    """TVM's paged-KV attention kernels as the model builds them (RoPE inside the cache): a 37-token prefill
    and a 41-token one in one batch (two pages and a part), then batched decode steps."""
    config = odd_config()
    model = AttentionOnly(config, WEBGPU)
    model.dtype = dtype
    mod, _ = model.export_tvm(spec=model.get_default_spec())
    bounds = {"seq_len": 128, "batch_size": 4, "total_seq_len": 256}
    with WEBGPU:
        mod = build_pipeline(WEBGPU, bounds, {}, gpu_schedule_passes(WEBGPU))(mod)
    with tvm.transform.PassContext(config={"tirx.disable_cse_tir": True}):  # as the compiler builds
        vm = relax.VirtualMachine(exported(relax.build(mod, WEBGPU, relax_pipeline=None)), DEVICE)
    cache = vm["create_tir_paged_kv_cache"](*(ShapeTuple([x]) for x in (4, 256, 128, 16, 0)))
    kv = {
        name: tvm.get_global_func(f"vm.builtin.kv_state_{name}")
        for name in ("add_sequence", "begin_forward", "end_forward")
    }
    q_heads, kv_heads, d = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    inv_freq = inv_freq_reference(config.rope_scaling, config.rope_theta, d)
    lengths = [37, 41]
    history = {
        s: RNG.standard_normal((n, q_heads + 2 * kv_heads, d)).astype(dtype) for s, n in enumerate(lengths)
    }
    for seq_id in history:
        kv["add_sequence"](cache, seq_id)

    def run(seq_ids: list[int], chunks: list[np.ndarray], batch: int) -> np.ndarray:
        kv["begin_forward"](cache, ShapeTuple(seq_ids), ShapeTuple([len(c) for c in chunks]))
        qkv = np.concatenate(chunks).reshape(batch, -1, *chunks[0].shape[1:])
        out = vm["attend"](on_device(qkv), cache)[0].numpy()
        kv["end_forward"](cache)
        return out.reshape(-1, q_heads, d)

    def expected(seq_id: int, new: int) -> np.ndarray:
        full = history[seq_id].astype(np.float64)
        positions = np.arange(len(full))
        q = rotate_reference(full[-new:, :q_heads], positions[-new:], inv_freq)
        k = rotate_reference(full[:, q_heads : q_heads + kv_heads], positions, inv_freq)
        return attention_reference(q, k, full[:, q_heads + kv_heads :], len(full) - new)

    got = run([0, 1], [history[0], history[1]], batch=1)
    assert_close("batch_prefill_paged_kv", got[:37], expected(0, 37), dtype)
    assert_close("batch_prefill_paged_kv", got[37:], expected(1, 41), dtype)
    for _ in range(3):
        steps = [RNG.standard_normal((1, q_heads + 2 * kv_heads, d)).astype(dtype) for _ in lengths]
        for seq_id, step in enumerate(steps):
            history[seq_id] = np.concatenate([history[seq_id], step])
        got = run([0, 1], steps, batch=2)
        for seq_id in (0, 1):
            assert_close("batch_decode_paged_kv", got[seq_id : seq_id + 1], expected(seq_id, 1), dtype)


# --- whole models -------------------------------------------------------------------------------------------

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
PROMPTS = ["def main():", "print(hello) and a longer prompt that spans more than one page of the KV cache"]
# float16 activations round at every layer, so logits drift from the float32 CPU path by that much
LOGIT_TOLERANCE = {"q0f32": 1e-3, "q4f32_1": 1e-3, "q4f16_1": 0.1}


@pytest.fixture(scope="module")
def tiny_hf_webgpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """head_dim 32 (TVM's float32 webgpu decode kernels read heads in vectors of 4, so not 18), the odd
    hidden, intermediate and vocabulary sizes of the other tiny models kept."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("hf-webgpu") / "tiny-megrez-webgpu", shape=TinyShape(head_dim=32), seed=5
    )


@pytest.fixture(scope="module")
def webgpu_models(tiny_hf_webgpu: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("webgpu-models")
    built: dict[str, tuple[BuiltModel, Path]] = {}

    def get(quantization: str) -> tuple[BuiltModel, Path]:
        if quantization not in built:
            cpu = build(tiny_hf_webgpu, quantization, root)
            lib = cpu.model_dir / "lib-webgpu.so"
            compile_model(cpu.model_dir, "webgpu", lib)
            built[quantization] = (cpu, lib)
        return built[quantization]

    return get


def greedy_and_logits(engine: Engine) -> tuple[list[list[int]], list[int], np.ndarray]:
    batch = [r.token_ids for r in engine.generate_batch(PROMPTS, GREEDY)]
    alone = engine.generate(PROMPTS[1], GREEDY).token_ids
    seq = engine.model.add_sequence()
    logits = engine.model.prefill([seq], [engine.tokenizer.encode(PROMPTS[1])])
    engine.model.remove_sequence(seq)
    return batch, alone, logits


@pytest.mark.parametrize("quantization", ["q0f32", "q4f32_1", "q4f16_1"])
def test_greedy_tokens_equal_the_cpu(webgpu_models, quantization: str) -> None:
    if quantization == "q4f16_1" and not ADAPTER.shader_f16:
        pytest.skip("this adapter has no shader-f16")
    cpu, lib = webgpu_models(quantization)
    expected = greedy_and_logits(Engine(cpu.model_dir, cpu.lib))
    got = greedy_and_logits(Engine(cpu.model_dir, lib, "webgpu"))
    assert got[0] == expected[0]  # a batch of two
    assert got[1] == expected[1]  # one sequence alone
    scale = float(np.abs(expected[2]).max())
    assert float(np.abs(got[2] - expected[2]).max()) <= LOGIT_TOLERANCE[quantization] * max(scale, 1.0)


def test_vulkan_target_generate_and_bench_on_the_cli(webgpu_models, tmp_path: Path) -> None:
    cpu, _ = webgpu_models("q4f32_1")
    lib = tmp_path / "model-vulkan.so"
    run_cli("compile", str(cpu.model_dir), "--target", "vulkan", "-o", str(lib))
    engine = Engine(cpu.model_dir, cpu.lib)
    expected = engine.generate(PROMPTS[0], engine.default_sampling(temperature=0.0, max_tokens=20)).token_ids
    args = ["--model-lib", str(lib), "--device", "vulkan"]
    out = run_cli(
        "generate",
        str(cpu.model_dir),
        "-p",
        PROMPTS[0],
        *args,
        "--raw",
        "--json",
        "--temperature",
        "0",
        "--max-tokens",
        "20",
    ).stdout
    assert json.loads(out)["token_ids"] == expected  # the model's own sampling defaults, greedy
    bench = json.loads(
        run_cli("bench", str(cpu.model_dir), *args, "--prompt-len", "16", "--gen-len", "8", "--json").stdout
    )
    assert bench["decode_tok_s"] > 0


CHAT_OPTIONS = ("--device", "webgpu", "--temperature", "0", "--max-tokens", "8")


def test_chat_on_webgpu(webgpu_models) -> None:
    cpu, lib = webgpu_models("q4f32_1")
    engine = Engine(cpu.model_dir, cpu.lib)
    params = engine.chat_sampling(engine.default_sampling(temperature=0.0, max_tokens=8))
    expected = engine.generate(engine.encode_chat([{"role": "user", "content": "hello"}]), params).text
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "megrez_mlc",
            "chat",
            str(cpu.model_dir),
            "--model-lib",
            str(lib),
            *CHAT_OPTIONS,
        ],
        input="hello\n",
        capture_output=True,
        text=True,
        check=True,
    )
    assert proc.stdout.startswith(expected + "\n")
    assert "XDG_RUNTIME_DIR" not in proc.stderr  # the Vulkan loader's noise is not passed on


def test_serve_on_webgpu(webgpu_models, tmp_path: Path) -> None:
    cpu, lib = webgpu_models("q4f32_1")
    engine = Engine(cpu.model_dir, cpu.lib)
    messages = [{"role": "user", "content": "write a function"}]
    params = engine.chat_sampling(engine.default_sampling(temperature=0.0, max_tokens=12))
    expected = engine.generate(engine.encode_chat(messages), params).text
    model = BuiltModel(cpu.hf_dir, cpu.model_dir, lib, cpu.quantization)
    with serving(model, tmp_path, "--device", "webgpu") as server:
        client: openai.OpenAI = server.client()
        reply = client.chat.completions.create(
            model="tiny-megrez", messages=messages, temperature=0, max_tokens=12
        )
    assert reply.choices[0].message.content == expected


def test_no_adapter_is_one_line(tmp_path: Path) -> None:
    """A backend with no device here (D3D12 on Linux) gets the driver hint, not a wgpu panic."""
    proc = subprocess.run(
        [sys.executable, "-m", "megrez_mlc", "targets"],
        capture_output=True,
        text=True,
        env={**os.environ, "MEGREZ_MLC_WGPU_BACKEND": "dx12"},
    )
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[1:]}
    webgpu_row = rows["webgpu"]
    assert webgpu_row.split()[2] == "no" and "no WebGPU adapter" in webgpu_row
    assert "mesa-vulkan-drivers" in webgpu_row
    assert rows["vulkan"].split()[2] == "yes"  # asks for Vulkan by name: the failed D3D12 does not stick
    with pytest.raises(MegrezError, match="unknown wgpu backend"):
        webgpu.open_adapter("directx")


def test_a_library_the_adapter_cannot_hold_is_refused_in_one_line() -> None:
    """Megrez-3B's int4 embedding table (122,880 x 2,560) is 150 MiB, above lavapipe's 128 MiB binding
    limit; a float16 library needs shader-f16."""
    metadata = {
        "quantization": "q4f16_1",
        "params": [
            {"name": "model.embed_tokens.q_weight", "shape": [122880, 320], "dtype": "uint32"},
            {"name": "model.embed_tokens.q_scale", "shape": [122880, 80], "dtype": "float16"},
        ],
    }
    with pytest.raises(MegrezError, match="has no shader-f16, so it cannot run this q4f16_1 library"):
        check_fits_adapter(metadata, dataclasses.replace(ADAPTER, shader_f16=False))
    small = dataclasses.replace(ADAPTER, shader_f16=True, max_storage_buffer_binding_size=128 << 20)
    with pytest.raises(
        MegrezError, match=r"q_weight is 150 MiB, more than .* \(maxStorageBufferBindingSize 128 MiB\)"
    ):
        check_fits_adapter(metadata, small)
    check_fits_adapter(metadata, dataclasses.replace(small, max_storage_buffer_binding_size=1 << 30))


def test_a_raw_checkpoint_is_prepared_for_the_adapter(
    tiny_hf_webgpu: Path, webgpu_models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`chat CHECKPOINT --device webgpu` converts for what the adapter has and caches a host-native .so."""
    monkeypatch.setenv("MEGREZ_MLC_HOME", str(tmp_path))
    quantization = "q4f16_1" if ADAPTER.shader_f16 else "q4f32_1"
    assert default_quantization("webgpu") == default_quantization("vulkan") == quantization
    prepared = prepare_model(str(tiny_hf_webgpu), device="webgpu")
    assert prepared.model_lib.suffix == ".so" and prepared.model_lib.parent == tmp_path / "libs"
    cpu, _ = webgpu_models(quantization)
    expected = Engine(cpu.model_dir, cpu.lib).generate(PROMPTS[0], GREEDY).token_ids
    assert Engine(prepared.model_dir, prepared.model_lib, "webgpu").generate(
        PROMPTS[0], GREEDY
    ).token_ids == (expected)
