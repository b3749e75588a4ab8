"""`compile`: a converted model folder in, a model library (MLC-LLM's engine ABI) out."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tvm
from tvm import relax

from ..config import ModelConfig
from ..errors import MegrezError
from ..quantize.gen_config import read_chat_config
from ..quantize.schemes import QuantScheme, get_scheme
from .model import MegrezForCausalLM
from .pipeline import build_pipeline
from .targets import TargetPreset, get_target

DEFAULT_MAX_BATCH_SIZE = 32


@dataclass(frozen=True)
class CompileResult:
    output: Path
    target: str
    seconds: float
    metadata: dict[str, Any]


def library_metadata(
    config: ModelConfig,
    scheme: QuantScheme,
    named_params: list[tuple[str, Any]],
    prefill_chunk_size: int,
    max_batch_size: int,
) -> dict[str, Any]:
    """What `_metadata()` returns, memory usage aside (the pipeline adds it after memory planning)."""
    return {
        "model_type": "llama",
        "quantization": scheme.name,
        "context_window_size": config.context_window_size,
        "sliding_window_size": -1,
        "attention_sink_size": -1,
        "prefill_chunk_size": prefill_chunk_size,
        "max_batch_size": max_batch_size,
        "tensor_parallel_shards": 1,
        "pipeline_parallel_stages": 1,
        "disaggregation": False,
        "kv_state_kind": "kv_cache",
        "params": [
            {"name": name, "shape": [int(d) for d in param.shape], "dtype": param.dtype, "preprocs": []}
            for name, param in named_params
        ],
        "kv_cache": {
            "num_hidden_layers": config.num_hidden_layers,
            "num_attention_heads": config.num_attention_heads,
            "num_key_value_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
        },
    }


def build_ir_module(
    config: ModelConfig, scheme: QuantScheme, target: tvm.target.Target
) -> tuple[tvm.IRModule, list[tuple[str, Any]]]:
    model = MegrezForCausalLM(config, scheme, target)
    return model.export_tvm(spec=model.get_default_spec())


def compile_model(
    model: Path,
    target_name: str,
    output: Path,
    *,
    host: str | None = None,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    prefill_chunk_size: int | None = None,
    context_window_size: int | None = None,
) -> CompileResult:
    start = time.perf_counter()
    _, chat_config = read_chat_config(model)
    config = ModelConfig.from_mlc_dict(chat_config["model_config"])
    if context_window_size:
        config = config.replace(context_window_size=context_window_size)
    scheme = get_scheme(chat_config["quantization"])
    prefill = min(prefill_chunk_size or chat_config["prefill_chunk_size"], config.context_window_size)
    preset: TargetPreset = get_target(target_name)
    target = preset.make(host)
    preset.check_output(output)

    mod, named_params = build_ir_module(config, scheme, target)
    metadata = library_metadata(config, scheme, named_params, prefill, max_batch_size)
    bounds = {"seq_len": prefill, "batch_size": max_batch_size, "total_seq_len": config.context_window_size}
    pipeline = build_pipeline(target, bounds, metadata, preset.schedule_passes(target))
    executable = relax.build(mod, target, relax_pipeline=pipeline, system_lib=preset.system_lib)
    _export(executable, output, preset)
    return CompileResult(output, preset.name, time.perf_counter() - start, metadata)


def _export(executable: relax.VMExecutable, output: Path, preset: TargetPreset) -> None:
    """Write the library beside its final path, then rename: a failed build leaves nothing behind."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=output.parent, prefix=f".{output.name}.") as tmp:
        partial = Path(tmp) / output.name
        try:
            preset.export(executable, partial)
        except Exception as err:  # linker and toolchain failures surface as assorted TVM/OS errors
            raise MegrezError(f"could not write {output} for target {preset.name}: {err}") from None
        os.replace(partial, output)
