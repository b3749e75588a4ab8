"""Shared fixtures: tiny Megrez-shaped checkpoints, their converted and compiled forms, and the oracle."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from megrez_mlc.artifacts.int4 import dequantize_int4
from megrez_mlc.artifacts.param_names import llama_param_specs
from megrez_mlc.artifacts.tensor_cache import load_tensors
from megrez_mlc.config import ModelConfig
from megrez_mlc.quantize.convert import convert_weight
from megrez_mlc.quantize.gen_config import gen_config
from megrez_mlc.runtime.request import StreamDelta
from megrez_mlc.tiny import TinyShape, make_tiny_checkpoint

# A shell that starts the tests in the background (`... &`) ignores SIGINT, and the CLIs the tests spawn
# would inherit that; the Ctrl-C tests need SIGINT delivered, so give it back its default handling.
signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass(frozen=True)
class BuiltModel:
    hf_dir: Path
    model_dir: Path
    lib: Path
    quantization: str


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "tiny-megrez")


@pytest.fixture(scope="session")
def tiny_hf_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("hf-tied") / "tiny-megrez-tied", tie_word_embeddings=True, seed=1
    )


@pytest.fixture(scope="session")
def tiny_hf_gpu(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_hf with Megrez's head_dim of 64: TVM's GPU attention kernels cannot tile every head size (18
    fails for CUDA, 16 and 32 for float32 OpenCL); the other sizes stay awkward."""
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("hf-gpu") / "tiny-megrez-gpu", shape=TinyShape(head_dim=64), seed=2
    )


@pytest.fixture(scope="session")
def gpu_model(tiny_hf_gpu: Path, tmp_path_factory: pytest.TempPathFactory):
    """quantization -> the converted tiny_hf_gpu folder (converted once per session)."""
    root = tmp_path_factory.mktemp("gpu-models")
    converted: dict[str, Path] = {}

    def get(quantization: str) -> Path:
        if quantization not in converted:
            model_dir = root / f"tiny-megrez-gpu-{quantization}"
            convert_weight(tiny_hf_gpu, model_dir, quantization)
            gen_config(tiny_hf_gpu, model_dir, quantization)
            converted[quantization] = model_dir
        return converted[quantization]

    return get


_BUILT: dict[tuple[Path, str], BuiltModel] = {}


def build(
    hf_dir: Path,
    quantization: str,
    root: Path,
    cpu_kernels: str = "exact",
    kv_cache_dtype: str | None = None,
    **gen_config_args: object,
) -> BuiltModel:
    """Convert, gen-config and compile once per (checkpoint, quantization, CPU kernels, KV cache type) for the
    session.

    The exact float32 kernels by default: the tests that compare with transformers token for token run
    them; the int8 ones (compile's default) are compared with these in test_int8_kernels.py. The KV cache
    type is compile's default for the kernels unless given (test_kv_cache_dtype.py)."""
    from megrez_mlc.compile.compiler import compile_model  # here: importing TVM costs the unit tier seconds

    key = (hf_dir, quantization, cpu_kernels, kv_cache_dtype)
    if key not in _BUILT:
        model_dir = root / f"{hf_dir.name}-{quantization}"
        if not (model_dir / "mlc-chat-config.json").is_file():
            convert_weight(hf_dir, model_dir, quantization)
            gen_config(hf_dir, model_dir, quantization, **gen_config_args)
        lib = model_dir / f"lib-{cpu_kernels}-{kv_cache_dtype or 'default'}-kv.so"
        compile_model(model_dir, "cpu", lib, cpu_kernels=cpu_kernels, kv_cache_dtype=kv_cache_dtype)
        _BUILT[key] = BuiltModel(hf_dir, model_dir, lib, quantization)
    return _BUILT[key]


@pytest.fixture(scope="session")
def built(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("built")
    return lambda quantization, cpu_kernels="exact", kv_cache_dtype=None: build(
        tiny_hf, quantization, root, cpu_kernels, kv_cache_dtype
    )


@pytest.fixture(scope="session")
def omni_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megrez_mlc.omni.tiny import make_tiny_omni_checkpoint

    return make_tiny_omni_checkpoint(tmp_path_factory.mktemp("omni-hf") / "tiny-megrez-omni")


@pytest.fixture(scope="session")
def omni_built(omni_hf: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("omni-built")
    return lambda quantization: build(omni_hf, quantization, root)


@pytest.fixture(scope="session")
def oracle(omni_hf: Path):
    from .omni_oracle import OmniOracle

    return OmniOracle(omni_hf)


def reference_state_dict(model_dir: Path, config: ModelConfig) -> dict[str, np.ndarray]:
    """The float32 HF weights the converted model really holds (dequantized, fused tensors split back)."""
    stored = load_tensors(model_dir)
    state = {}
    for spec in llama_param_specs(config):
        if spec.matrix and f"{spec.name}.q_weight" in stored:
            full = dequantize_int4(
                stored[f"{spec.name}.q_weight"], stored[f"{spec.name}.q_scale"], spec.shape[1]
            )
        else:
            full = stored[f"{spec.name}.{spec.role}"].astype(np.float32)
        offsets = np.cumsum((0, *spec.hf_rows))
        for name, start, stop in zip(spec.hf_names, offsets[:-1], offsets[1:]):
            state[name] = full[start:stop]
    return state


def reference_model(hf_dir: Path, model_dir: Path):
    """transformers' LlamaForCausalLM (float32) on exactly the weights of a converted model."""
    import torch
    from transformers import AutoModelForCausalLM

    from megrez_mlc.config import load_hf_model_config

    config, _ = load_hf_model_config(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    state = {
        k: torch.from_numpy(np.ascontiguousarray(v))
        for k, v in reference_state_dict(model_dir, config).items()
    }
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected
    assert set(missing) <= {"lm_head.weight"}, missing  # only a tied lm_head is absent
    return model.eval()


def run_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """`megrez-mlc ARGS` in a child process, as a user runs it."""
    proc = subprocess.run([sys.executable, "-m", "megrez_mlc", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"megrez-mlc {' '.join(args)} failed:\n{proc.stderr}")
    return proc


class Collector:
    """The deltas of one request, and an event set by its last one."""

    def __init__(self) -> None:
        self.deltas: list[StreamDelta] = []
        self.done = threading.Event()

    def __call__(self, delta: StreamDelta) -> None:
        self.deltas.append(delta)
        if delta.finish_reason is not None:
            self.done.set()

    @property
    def token_ids(self) -> list[int]:
        return [d.token_id for d in self.deltas if d.token_id is not None]

    @property
    def finish_reason(self) -> str | None:
        return self.deltas[-1].finish_reason if self.deltas else None
