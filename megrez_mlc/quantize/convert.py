"""`convert-weight`: a Hugging Face checkpoint in, MLC-format (optionally int4) weights out.

Tensors stream through in blocks of rows (quantization is per row, so blocks are independent): a pool of
threads reads and converts the next few blocks while this thread writes finished ones, in order, into the
shard being written. numpy, file reads, file writes and md5 release the GIL, so the threads really run in
parallel. Memory is bounded by the blocks in flight, never the checkpoint: the full Megrez-3B converts in
well under 1 GB (see benchmarks/convert.py).
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TypeVar

import numpy as np
from tqdm import tqdm

from ..artifacts.int4 import quantize_int4
from ..artifacts.param_names import ParamSpec, expected_hf_shapes, llama_param_specs, stored_tensors
from ..artifacts.schemes import QuantScheme, get_scheme
from ..artifacts.tensor_cache import TensorCacheWriter, written_files
from ..config import ModelConfig, load_hf_model_config
from ..errors import MegrezError
from ..omni.weights import AUDIO_PREFIXES, EncoderTensor, encoder_tensors
from ..staging import staged_model_dir
from .checkpoint import FLOAT_DTYPES, Checkpoint
from .gen_config import check_output_quantization

log = logging.getLogger("megrez_mlc")

BLOCK_BYTES = 16 * 1024 * 1024  # float32 bytes read per block: bounds memory, keeps numpy calls large
MAX_WORKERS = 8  # each thread adds ~45-90 MB of peak RSS (measured): 8 stay within the 1 GB budget
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class ConversionResult:
    out_dir: Path
    num_tensors: int
    param_bytes: int
    bits_per_param: float


def show_progress() -> bool:
    """Progress bars only for a person watching a terminal: not in pipes, logs or CI."""
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"


def worker_count() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def convert_weight(
    hf_dir: Path,
    out_dir: Path,
    quantization: str,
    *,
    preset: str | None = None,
    force: bool = False,
    threads: int | None = None,
) -> ConversionResult:
    """Convert hf_dir into out_dir; `threads` converter threads (default: one per core, at most 8)."""
    if threads is not None and threads < 1:
        raise MegrezError(f"--threads must be at least 1, got {threads}")
    scheme = get_scheme(quantization)
    config, _ = load_hf_model_config(hf_dir, preset)
    checkpoint = Checkpoint(hf_dir)
    specs = llama_param_specs(config, config.checkpoint_prefix)
    encoders = encoder_tensors(config)
    check_checkpoint(checkpoint, specs, config, encoders)
    check_output_quantization(out_dir, scheme, force)
    total_bytes = sum(t.nbytes for spec in specs for t in stored_tensors(spec, scheme))
    total_bytes += sum(int(np.prod(v.shape)) * np.dtype(scheme.model_dtype).itemsize for v in encoders)
    workers = threads or worker_count()
    pool = ThreadPoolExecutor(workers, thread_name_prefix="convert")
    try:
        with staged_model_dir(out_dir, force, superseded=written_files(out_dir)) as staging:
            writer = TensorCacheWriter(staging)
            jobs_per_spec = [[(spec, *rows) for rows in _block_rows(checkpoint, spec)] for spec in specs]
            jobs = [job for spec_jobs in jobs_per_spec for job in spec_jobs]
            blocks = ordered_map(pool, lambda job: convert_block(checkpoint, scheme, *job), jobs, 2 * workers)
            bar = tqdm(specs, desc="convert", unit="param", disable=not show_progress(), file=sys.stderr)
            for spec, spec_jobs in zip(bar, jobs_per_spec):
                write_param(writer, spec, scheme, islice(blocks, len(spec_jobs)))  # its blocks come next
                bar.set_postfix_str(f"{writer.param_bytes / 2**20:.1f}/{total_bytes / 2**20:.1f} MiB written")
            bar.close()
            for tensor in encoders:  # small tensors (the largest is ~26 MB), each read whole
                write_encoder_tensor(writer, checkpoint, tensor, scheme)
            index = writer.finish()
    except OSError as err:  # a full disk or a read-only folder: the staging folder is already gone
        raise MegrezError(f"cannot write the converted weights to {out_dir}: {err.strerror or err}") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    num_tensors = sum(len(shard["records"]) for shard in index["records"])
    meta = index["metadata"]
    return ConversionResult(out_dir, num_tensors, meta["ParamBytes"], meta["BitsPerParam"])


def check_checkpoint(
    checkpoint: Checkpoint, specs: list[ParamSpec], config: ModelConfig, encoders: list[EncoderTensor]
) -> None:
    """Every tensor the model needs is there with the shape config.json implies; checked before writing."""
    needed: set[str] = set()
    shapes = [shape for spec in specs for shape in expected_hf_shapes(spec).items()]
    shapes += [(v.source, v.source_shape) for v in encoders]
    for name, shape in shapes:
        needed.add(name)
        if name not in checkpoint:
            raise MegrezError(
                f"tensor {name} is missing from {checkpoint.hf_dir}; the download is incomplete or "
                "config.json describes another model"
            )
        info = checkpoint.info(name)
        if info.shape != shape:
            raise MegrezError(
                f"tensor {name} has shape {list(info.shape)} but config.json implies {list(shape)}; "
                "the checkpoint and its config.json disagree"
            )
        if info.dtype not in FLOAT_DTYPES:
            raise MegrezError(f"tensor {name} in {info.path.name} is {info.dtype}, not a float type")
    tied_head = {f"{config.checkpoint_prefix}lm_head.weight"} if config.tie_word_embeddings else set()
    unused = [
        n for n in checkpoint.names() if n not in needed | tied_head and not n.endswith(IGNORED_HF_SUFFIXES)
    ]
    if config.vision is not None and config.audio is None:
        audio = [n for n in unused if n.startswith(AUDIO_PREFIXES)]
        if audio:
            log.info("skipping the %d audio encoder tensors (config.json has no audio_config)", len(audio))
        unused = [n for n in unused if not n.startswith(AUDIO_PREFIXES)]
    if unused:
        log.warning(
            "ignoring %d checkpoint tensors the LLaMA graph does not use: %s",
            len(unused),
            ", ".join(unused[:3]),
        )


def _block_rows(checkpoint: Checkpoint, spec: ParamSpec) -> Iterator[tuple[str, tuple[int, int]]]:
    cols = spec.shape[1] if spec.matrix else 1
    rows_per_block = max(1, BLOCK_BYTES // (4 * cols))
    for name in spec.hf_names:
        for rows in checkpoint.row_ranges(name, rows_per_block):
            yield name, rows


def convert_block(
    checkpoint: Checkpoint, scheme: QuantScheme, spec: ParamSpec, name: str, rows: tuple[int, int]
) -> tuple[np.ndarray, ...]:
    """Rows of one source tensor in their stored form: (q_weight words, q_scale) or (weight,)."""
    block = checkpoint.read_rows(name, *rows)
    with np.errstate(invalid="ignore", over="ignore"):  # reported below, as one clear error
        if scheme.quantized and spec.matrix:
            stored = quantize_int4(block, scheme.scale_dtype)
            floats = stored[1]
        else:
            stored = floats = block.astype(scheme.model_dtype, copy=False)
    if not np.isfinite(floats).all():
        raise MegrezError(
            f"tensor {name} rows {rows[0]}..{rows[1] - 1} hold NaN or infinite values, or values too large "
            f"for {scheme.model_dtype}; the checkpoint is corrupt (re-download it)"
            + ("" if scheme.model_dtype == "float32" else " or needs a float32 quantization")
        )
    return stored if isinstance(stored, tuple) else (stored,)


def ordered_map(
    pool: ThreadPoolExecutor, func: Callable[[T], R], items: Iterable[T], ahead: int
) -> Iterator[R]:
    """pool.map that keeps at most `ahead` results pending, so memory stays bounded."""
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(func, item))
        if len(pending) > ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def write_param(
    writer: TensorCacheWriter, spec: ParamSpec, scheme: QuantScheme, blocks: Iterable[tuple[np.ndarray, ...]]
) -> None:
    """Write one parameter's tensors from its converted blocks, in row order."""
    tensors = stored_tensors(spec, scheme)
    writer.count_float_params(int(np.prod(spec.shape)))
    if len(tensors) == 1:
        (out,) = tensors
        writer.write(out.name, out.shape, out.dtype, (weight for (weight,) in blocks))
        return
    q_weight, q_scale = tensors
    scales: list[np.ndarray] = []

    def words() -> Iterator[np.ndarray]:
        for block_words, block_scale in blocks:
            scales.append(block_scale)
            yield block_words

    writer.write(q_weight.name, q_weight.shape, q_weight.dtype, words())
    writer.write(q_scale.name, q_scale.shape, q_scale.dtype, scales)


def write_encoder_tensor(
    writer: TensorCacheWriter, checkpoint: Checkpoint, tensor: EncoderTensor, scheme: QuantScheme
) -> None:
    """One encoder parameter, in the scheme's float type (omni/weights.py says why it is not quantized)."""
    with np.errstate(invalid="ignore", over="ignore"):
        values = tensor.load(checkpoint).astype(scheme.model_dtype, copy=False)
    if not np.isfinite(values).all():
        raise MegrezError(
            f"tensor {tensor.source} holds NaN or infinite values (or values too large for "
            f"{scheme.model_dtype}); the checkpoint is corrupt (re-download it)"
        )
    writer.count_float_params(values.size)
    writer.write(tensor.name, tensor.shape, scheme.model_dtype, [values])
