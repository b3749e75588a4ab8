"""`convert-weight`: a Hugging Face checkpoint in, MLC-format (optionally int4) weights out.

Tensors stream through in blocks of rows (quantization is per row, so blocks are independent) and go
straight into the shard being written; the whole checkpoint is never in memory.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..config import ModelConfig, load_hf_model_config
from ..errors import MegrezError
from ..staging import staged_model_dir
from .checkpoint import Checkpoint
from .group_quant import quantize_int4
from .param_map import ParamSpec, expected_hf_shapes, llama_param_specs, stored_tensors
from .schemes import QuantScheme, get_scheme
from .tensor_cache import TensorCacheWriter

log = logging.getLogger("megrez_mlc")

BLOCK_BYTES = 16 * 1024 * 1024  # float32 bytes read per block: bounds memory, keeps numpy calls large
WEIGHT_FILES = ("params_shard_*.bin", "tensor-cache.json")
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ConversionResult:
    out_dir: Path
    num_tensors: int
    param_bytes: int
    bits_per_param: float


def convert_weight(
    hf_dir: Path, out_dir: Path, quantization: str, *, preset: str | None = None, force: bool = False
) -> ConversionResult:
    scheme = get_scheme(quantization)
    config, _ = load_hf_model_config(hf_dir, preset)
    checkpoint = Checkpoint(hf_dir)
    specs = llama_param_specs(config)
    check_checkpoint(checkpoint, specs, config)
    with staged_model_dir(out_dir, WEIGHT_FILES, force) as staging:
        writer = TensorCacheWriter(staging)
        bar = tqdm(specs, desc="convert", unit="param", disable=not sys.stderr.isatty(), file=sys.stderr)
        for spec in bar:
            write_param(writer, checkpoint, spec, scheme)
            bar.set_postfix_str(f"{writer.param_bytes / 2**20:.0f} MiB")
        index = writer.finish()
    num_tensors = sum(len(shard["records"]) for shard in index["records"])
    meta = index["metadata"]
    return ConversionResult(out_dir, num_tensors, meta["ParamBytes"], meta["BitsPerParam"])


def check_checkpoint(checkpoint: Checkpoint, specs: list[ParamSpec], config: ModelConfig) -> None:
    """Every tensor the model needs is there with the shape config.json implies; checked before writing."""
    needed: set[str] = set()
    for spec in specs:
        for name, shape in expected_hf_shapes(spec).items():
            needed.add(name)
            if name not in checkpoint:
                raise MegrezError(
                    f"tensor {name} is missing from {checkpoint.hf_dir}; the download is incomplete or "
                    "config.json describes another model"
                )
            actual = checkpoint.info(name).shape
            if actual != shape:
                raise MegrezError(
                    f"tensor {name} has shape {list(actual)} but config.json implies {list(shape)}; "
                    "the checkpoint and its config.json disagree"
                )
    tied_head = {"lm_head.weight"} if config.tie_word_embeddings else set()
    unused = [
        n for n in checkpoint.names() if n not in needed | tied_head and not n.endswith(IGNORED_HF_SUFFIXES)
    ]
    if unused:
        log.warning(
            "ignoring %d checkpoint tensors the LLaMA graph does not use: %s",
            len(unused),
            ", ".join(unused[:3]),
        )


def _rows_per_block(cols: int) -> int:
    return max(1, BLOCK_BYTES // (4 * cols))


def _source_blocks(checkpoint: Checkpoint, spec: ParamSpec) -> Iterator[np.ndarray]:
    cols = spec.shape[1] if spec.matrix else 1
    for name in spec.hf_names:
        yield from checkpoint.row_blocks(name, _rows_per_block(cols))


def write_param(
    writer: TensorCacheWriter, checkpoint: Checkpoint, spec: ParamSpec, scheme: QuantScheme
) -> None:
    tensors = stored_tensors(spec, scheme)
    writer.count_float_params(int(np.prod(spec.shape)))
    if len(tensors) == 1:
        (out,) = tensors
        writer.write(out.name, out.shape, out.dtype, _source_blocks(checkpoint, spec))
        return
    q_weight, q_scale = tensors
    scales: list[np.ndarray] = []

    def packed_blocks() -> Iterator[np.ndarray]:
        for block in _source_blocks(checkpoint, spec):
            words, scale = quantize_int4(block, scheme.scale_dtype)
            scales.append(scale)
            yield words

    writer.write(q_weight.name, q_weight.shape, q_weight.dtype, packed_blocks())
    writer.write(q_scale.name, q_scale.shape, q_scale.dtype, scales)
