"""The int8 dot-product CPU kernels (compile/int8_matmul.py): each kernel against numpy on odd shapes, each
ISA path's instructions in its assembly, the path `compile` picks, and int8 libraries against exact ones.

The numpy reference quantizes the activations exactly as the kernels do (float32 d = max|x| / 127, x_q =
rint(x * (1 / d))) and sums the integer products exactly (float64), so the only difference left is float32
rounding in the kernel's scale products and accumulation. Each output accumulates (lanes of) its groups'
terms in float32: at most `groups` additions per lane, log2(16) in the lane tree, and three roundings per
term (int -> float is exact below 2**24; d * s; the product), so
    |kernel - reference| <= (groups + 8) * 2**-24 * sum_g |d_g s_g dot_g|   (+ 2**-11 |y| for float16 y).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import tvm
from tvm.target import Target

from megrez_mlc.artifacts.int4 import GROUP_SIZE, MAX_INT, dequantize_int4, padded_k, quantize_int4
from megrez_mlc.compile.compiler import compile_model
from megrez_mlc.compile.int8_matmul import (
    AVX2,
    AVX512_VNNI,
    AVX_VNNI,
    ISAS,
    DotIsa,
    int8_gemm_kernel,
    int8_gemv_kernel,
    isa_supported,
    select_isa,
)
from megrez_mlc.compile.targets import host_llvm_target

from .test_logits import ours_and_reference

# an LLVM CPU of each path: the kernels compile for it on any x86 machine, and run where the host has it
# Whole models, relative to the largest logit: against a reference that quantizes the activations the same
# way only float rounding differs, but it can move a value across a rounding boundary (one step of d in one
# input); against float activations, each input moves by up to d / 2.
# The shape sweep spreads its weights so that logits are peaky (test_shape_sweep._spread_weights): there
# the int8 rounding moves the largest logits further (measured up to 20.8%), and rounding-boundary
# flips compound over the layers (measured up to 2.1e-2 against the same quantization, on the 4-layer hd96
# case in CI; 5e-3 and 6e-3 on hd32 and hd80 here).
INT8_TOLERANCE = {
    "same quantization": 1e-3,
    "float": 5e-2,
    "same quantization, spread weights": 3e-2,
    "float, spread weights": 0.3,
}
ISA_CPU = {AVX512_VNNI.name: "sapphirerapids", AVX_VNNI.name: "alderlake", AVX2.name: "haswell"}
HOST = host_llvm_target()


def cpu_target(isa: DotIsa) -> Target:
    return Target({"kind": "llvm", "mcpu": ISA_CPU[isa.name], "num-cores": 2})


def runnable(isa: DotIsa):
    return pytest.param(
        isa, marks=pytest.mark.skipif(not isa_supported(isa, HOST), reason=f"this CPU has no {isa.name}")
    )


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(x_q [M, groups, 32] int64, d [M, groups] float32), the kernels' rule in float32."""
    m, k = x.shape
    padded = np.zeros((m, padded_k(k)), np.float32)
    padded[:, :k] = x
    groups = padded.reshape(m, -1, GROUP_SIZE)
    amax = np.abs(groups).max(axis=2)
    d = amax / np.float32(127)
    inverse = np.where(amax > 0, np.float32(1) / np.where(d > 0, d, np.float32(1)), np.float32(0))
    return np.rint(groups * inverse[:, :, None].astype(np.float32)).astype(np.int64), d


def int8_reference(x: np.ndarray, q_weight: np.ndarray, q_scale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(y [M, N] float64, sum of |terms| [M, N]) with the integer dot products summed exactly."""
    x_q, d = quantize_activations(x)
    n = q_weight.shape[0]
    nibbles = (q_weight[:, :, None] >> (4 * np.arange(8, dtype=np.uint32))) & 0xF
    w_q = nibbles.reshape(n, -1, GROUP_SIZE).astype(np.int64) - MAX_INT
    dots = np.einsum("mgk,ngk->mng", x_q, w_q)  # exact in int64
    terms = dots * d[:, None, :].astype(np.float64) * q_scale.astype(np.float64)[None, :, :]
    return terms.sum(axis=2), np.abs(terms).sum(axis=2)


def build_kernel(func, target: Target):
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)


def run_kernel(func, target: Target, *arrays: np.ndarray, out: np.ndarray) -> np.ndarray:
    lib = build_kernel(func, target)
    result = tvm.runtime.tensor(out)
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], result)
    return result.numpy()


SHAPES = [  # (N, K, M): N not a multiple of 16 rows or of 4; K not a multiple of 32 or of 16 words
    (37, 97, 1),
    (48, 33, 3),
    (625, 200, 8),
    (19, 512, 5),
    (96, 416, 2),
    (64, 96, 13),
]


@pytest.mark.parametrize("isa", [runnable(isa) for isa in ISAS])
@pytest.mark.parametrize(("n", "k", "m"), SHAPES)
def test_kernels_match_numpy_on_odd_shapes(isa: DotIsa, n: int, k: int, m: int) -> None:
    rng = np.random.default_rng(n * k + m)
    q_weight, q_scale = quantize_int4(rng.standard_normal((n, k)).astype(np.float32), "float32")
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, : min(k, GROUP_SIZE)] = 0  # an all-zero group: d = 0 must give zeros, not NaN
    x[0, -1] = 40.0  # one outlier dominates its group's scale
    ref, magnitude = int8_reference(x, q_weight, q_scale)
    kernels = [int8_gemm_kernel] + ([int8_gemv_kernel] if m == 1 else [])
    for kernel in kernels:
        func = kernel(isa, n, k, "float32", "float32", "float32")
        ours = run_kernel(func, cpu_target(isa), x, q_weight, q_scale, out=np.zeros((m, n), np.float32))
        groups = q_scale.shape[1]
        bound = (groups + 8) * 2.0**-24 * magnitude
        assert np.all(np.abs(ours - ref) <= bound), f"{kernel.__name__}: {np.abs(ours - ref).max():.3g}"
        # and close to the float product: rounding moves each input by up to d / 2 (d = max|x| / 127 of its
        # group; the outlier's group is coarse on purpose)
        exact = x @ dequantize_int4(q_weight, q_scale, k).T
        assert np.abs(ours - exact).max() <= 0.05 * np.abs(exact).max()


@pytest.mark.parametrize("kernel", [int8_gemv_kernel, int8_gemm_kernel])
def test_float16_activations_scales_and_output(kernel) -> None:
    """q4f16_1's types: float16 x, scales and y (the kernel works in float32 inside)."""
    isa = select_isa(HOST) or pytest.skip("this CPU has no AVX2")
    n, k, m = 83, 160, 1 if kernel is int8_gemv_kernel else 6
    rng = np.random.default_rng(3)
    q_weight, q_scale = quantize_int4(rng.standard_normal((n, k)).astype(np.float32), "float16")
    x = rng.standard_normal((m, k)).astype(np.float16)
    ref, magnitude = int8_reference(x.astype(np.float32), q_weight, q_scale)
    func = kernel(isa, n, k, "float16", "float16", "float16")
    ours = run_kernel(func, HOST, x, q_weight, q_scale, out=np.zeros((m, n), np.float16)).astype(np.float64)
    bound = (q_scale.shape[1] + 8) * 2.0**-24 * magnitude + 2.0**-11 * np.abs(ref)
    assert np.all(np.abs(ours - ref) <= bound)


ISA_INSTRUCTIONS = {  # what each path's inner loop must be made of, and what it must not use
    AVX512_VNNI.name: ([r"vpdpbusd\s+%zmm"], []),
    AVX_VNNI.name: ([r"\{vex\}\s*vpdpbusd\s+%ymm"], [r"%zmm"]),
    AVX2.name: ([r"vpmaddubsw\s+%ymm", r"vpmaddwd\s+%ymm"], [r"vpdpbusd", r"%zmm"]),
}


@pytest.mark.parametrize("isa", ISAS, ids=lambda isa: isa.name)
@pytest.mark.parametrize("kernel", [int8_gemv_kernel, int8_gemm_kernel])
def test_each_isa_path_compiles_to_its_instructions(isa: DotIsa, kernel) -> None:
    """Compiled for a CPU of each kind (whatever this machine is), the assembly holds that path's integer
    dot products and nothing the CPU lacks."""
    func = kernel(isa, 2560, 2560, "float32", "float32", "float32")
    executable = build_kernel(func, cpu_target(isa))
    assembly = executable.mod.inspect_source("asm")
    present, absent = ISA_INSTRUCTIONS[isa.name]
    for pattern in present:
        assert re.search(pattern, assembly), pattern
    for pattern in absent:
        assert not re.search(pattern, assembly), pattern


@pytest.mark.parametrize(
    ("cpu", "expected"),
    [
        ("sapphirerapids", "avx512-vnni"),
        ("znver5", "avx512-vnni"),
        ("alderlake", "avx-vnni"),
        ("znver3", "avx2"),
        ("haswell", "avx2"),
        ("x86-64", None),  # no AVX2: today's float32 kernels
    ],
)
def test_the_isa_comes_from_the_target_cpu(cpu: str, expected: str | None) -> None:
    isa = select_isa(Target({"kind": "llvm", "mcpu": cpu}))
    assert (isa.name if isa else None) == expected


def test_other_architectures_get_the_exact_kernels() -> None:
    assert select_isa(Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})) is None


def test_compile_picks_the_fast_path_by_default(built) -> None:
    """`compile` without --cpu-kernels uses the int8 kernels of this CPU's best ISA, with a float16 KV cache;
    exact on request, with the model's float32 cache."""
    host_isa = select_isa(HOST)
    int8 = built("q4f32_1", "int8")
    result = compile_model(int8.model_dir, "cpu", int8.lib.with_name("default.so"))
    assert result.cpu_kernels == (f"int8 ({host_isa.name})" if host_isa else "exact")
    assert result.kv_cache_dtype == ("float16" if host_isa else "float32")
    exact = compile_model(int8.model_dir, "cpu", int8.lib.with_name("exact.so"), cpu_kernels="exact")
    assert (exact.cpu_kernels, exact.kv_cache_dtype) == ("exact", "float32")


@contextmanager
def int8_activations() -> Iterator[None]:
    """Every torch Linear sees its input as the int8 kernels do: x_q * d, per group of 32 inputs."""
    forward = torch.nn.Linear.forward

    def quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).numpy()
        x_q, d = quantize_activations(rows)
        fake = (x_q * d[:, :, None]).reshape(rows.shape[0], -1)[:, : rows.shape[1]].astype(np.float32)
        return forward(self, torch.from_numpy(fake).reshape(x.shape))

    torch.nn.Linear.forward = quantized_forward
    try:
        yield
    finally:
        torch.nn.Linear.forward = forward


def assert_within(ours: np.ndarray, ref: np.ndarray, relative: float) -> None:
    error, bound = np.abs(ours - ref).max(), relative * np.abs(ref).max()
    assert error <= bound, f"max abs error {error:.3g} > {bound:.3g}"


@pytest.mark.parametrize("quantization", ["q4f32_1", "q4f16_1"])
def test_int8_library_matches_transformers(built, quantization: str) -> None:
    """The tiny model, int8 library: logits after a prompt and 16 greedy steps within 5% (relative to the
    largest logit) of transformers in float (the exact library's reference) and, for q4f32_1 with a float32
    KV cache (float16 is the int8 default), within 1e-3 of transformers whose every Linear sees its input
    quantized as the kernels do. (q4f16_1's float16
    activations differ from float32 ones by ~2**-11, which moves a few percent of them across an int8
    rounding boundary: no tighter reference exists for it.) The shape sweep runs the same checks."""
    prompt = np.random.default_rng(7).integers(0, 300, 23).tolist()
    model = built(quantization, "int8")
    ours, float_reference = ours_and_reference(model, prompt)
    assert_within(ours, float_reference, INT8_TOLERANCE["float"])
    if quantization == "q4f32_1":
        with int8_activations():
            ours, fake_quantized = ours_and_reference(built(quantization, "int8", "float32"), prompt)
        assert_within(ours, fake_quantized, INT8_TOLERANCE["same quantization"])
