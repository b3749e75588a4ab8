"""MLC's weight format: `params_shard_N.bin` files plus a `tensor-cache.json` index. Writer and reader.

tensor-cache.json:
  {"metadata": {"ParamSize": float elements before packing, "ParamBytes": bytes on disk,
                "BitsPerParam": 8 * ParamBytes / ParamSize},
   "records": [{"dataPath": "params_shard_0.bin", "format": "raw-shard", "nbytes": shard size,
                "md5sum": hex digest of the shard,
                "records": [{"name", "shape", "dtype", "format": "raw", "nbytes", "byteOffset"}]}]}
A shard holds whole tensors, raw little-endian, back to back; it is closed once adding the next tensor
would pass the size limit (a tensor larger than the limit gets a shard of its own).
TVM's runtime (`vm.builtin.tensor_cache.load`) reads this; it checks each shard's size (with a C++ error) but
not its md5, nor that records lie inside their shard: `read_index` and `check_shard_sizes` check first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ..errors import MegrezError
from .files import INDEX_FILE
from .schemes import SCHEMES

SHARD_LIMIT_BYTES = 32 * 1024 * 1024


def shard_name(index: int) -> str:
    return f"params_shard_{index}.bin"


class TensorCacheWriter:
    """Writes tensors into shards as they come, so a conversion never holds the whole model in memory."""

    def __init__(self, out_dir: Path, shard_limit: int = SHARD_LIMIT_BYTES) -> None:
        self.out_dir = out_dir
        self.shard_limit = shard_limit
        self.shards: list[dict[str, Any]] = []
        self._file: BinaryIO | None = None
        self._md5 = hashlib.md5()
        self._offset = 0
        self.param_elements = 0
        self.param_bytes = 0

    def write(self, name: str, shape: tuple[int, ...], dtype: str, chunks: Iterable[np.ndarray]) -> None:
        """Append one tensor given as consecutive chunks of its C-order bytes."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if self._file is None or (self._offset > 0 and self._offset + nbytes > self.shard_limit):
            self._open_next_shard()
        written = 0
        for chunk in chunks:
            data = memoryview(np.ascontiguousarray(chunk, dtype=dtype)).cast("B")  # no copy
            self._file.write(data)  # file writes and md5 release the GIL: converter threads keep running
            self._md5.update(data)
            written += len(data)
        if written != nbytes:
            raise ValueError(f"{name}: wrote {written} bytes, shape {shape} {dtype} needs {nbytes}")
        self.shards[-1]["records"].append(
            {
                "name": name,
                "shape": list(shape),
                "dtype": dtype,
                "format": "raw",
                "nbytes": nbytes,
                "byteOffset": self._offset,
            }
        )
        self._offset += nbytes
        self.param_bytes += nbytes

    def add(self, name: str, array: np.ndarray) -> None:
        self.write(name, array.shape, str(array.dtype), [array])

    def count_float_params(self, elements: int) -> None:
        """Record how many float weights the written tensors stand for (for BitsPerParam)."""
        self.param_elements += elements

    def _open_next_shard(self) -> None:
        self._close_shard()
        path = self.out_dir / shard_name(len(self.shards))
        self._file = path.open("wb")
        self._md5 = hashlib.md5()
        self._offset = 0
        self.shards.append({"dataPath": path.name, "format": "raw-shard", "nbytes": 0, "records": []})

    def _close_shard(self) -> None:
        if self._file is not None:
            self._file.close()
            self.shards[-1]["nbytes"] = self._offset
            self.shards[-1]["md5sum"] = self._md5.hexdigest()
            self._file = None

    def finish(self) -> dict[str, Any]:
        """Close the last shard and write tensor-cache.json; returns its content."""
        self._close_shard()
        elements = max(self.param_elements, 1)
        index = {
            "metadata": {
                "ParamSize": self.param_elements,
                "ParamBytes": self.param_bytes,
                "BitsPerParam": 8.0 * self.param_bytes / elements,
            },
            "records": self.shards,
        }
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2), encoding="utf-8")
        return index


@dataclass(frozen=True)
class TensorRecord:
    name: str
    shape: tuple[int, ...]
    dtype: str
    shard: str
    byte_offset: int
    nbytes: int


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize  # numpy has no bfloat16


def read_index(model_dir: Path) -> dict[str, Any]:
    """Parse tensor-cache.json and check it is self-consistent (each tensor inside its shard, with as many
    bytes as its shape and dtype need), naming the offending entry; the shard files are not opened."""
    path = model_dir / INDEX_FILE
    if not path.is_file():
        raise MegrezError(f"{path} not found; convert the weights first with `megrez-mlc convert-weight`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        for shard in index["records"]:
            data_path, shard_bytes = shard["dataPath"], int(shard["nbytes"])
            if Path(data_path).name != data_path:
                raise ValueError(f"shard path {data_path!r} leaves the folder")
            for rec in shard["records"]:
                name, shape, offset, nbytes = rec["name"], rec["shape"], rec["byteOffset"], rec["nbytes"]
                elements = int(np.prod(shape, dtype=np.int64))
                try:
                    needed = elements * _itemsize(rec["dtype"])
                except TypeError:
                    raise ValueError(f"{name} has an unknown dtype {rec['dtype']!r}") from None
                if nbytes != needed:
                    raise ValueError(f"{name} is {rec['dtype']}{shape} ({needed} bytes) but records {nbytes}")
                if offset < 0 or offset + nbytes > shard_bytes:
                    raise ValueError(f"{name} lies outside {data_path} ({shard_bytes} bytes)")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        detail = f"no {err}" if isinstance(err, KeyError) else str(err)
        raise MegrezError(f"{path} is corrupt ({detail}); convert the weights again") from None
    return index


def tensor_records(index: dict[str, Any]) -> dict[str, TensorRecord]:
    return {
        rec["name"]: TensorRecord(
            rec["name"],
            tuple(rec["shape"]),
            rec["dtype"],
            shard["dataPath"],
            rec["byteOffset"],
            rec["nbytes"],
        )
        for shard in index["records"]
        for rec in shard["records"]
    }


def check_shard_sizes(model_dir: Path, index: dict[str, Any]) -> None:
    """Every shard exists with the size the index gives (a cheap check before loading)."""
    for shard in index["records"]:
        path = model_dir / shard["dataPath"]
        if not path.is_file():
            raise MegrezError(f"weight shard {path} is missing; convert the weights again")
        size = path.stat().st_size
        if size != shard["nbytes"]:
            raise MegrezError(
                f"weight shard {path} has {size} bytes but {INDEX_FILE} says {shard['nbytes']} "
                "(truncated or modified); convert the weights again"
            )


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb", buffering=0) as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def written_files(model_dir: Path) -> list[str]:
    """The files a previous conversion wrote into model_dir, as its index lists them (none if unreadable)."""
    try:
        index = read_index(model_dir)
    except MegrezError:
        return []
    return [INDEX_FILE, *(shard["dataPath"] for shard in index["records"])]


def stored_quantization(index: dict[str, Any]) -> str | None:
    """Which scheme wrote an index, read off its embedding's tensors (None if it has no embedding)."""
    records = tensor_records(index)
    for scheme in SCHEMES.values():
        probe = "model.embed_tokens." + ("q_scale" if scheme.quantized else "weight")
        if probe in records and records[probe].dtype == scheme.model_dtype:
            return scheme.name
    return None


def load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    """Every tensor as a numpy array (memory-mapped, read-only): the mirror image of the writer."""
    index = read_index(model_dir)
    check_shard_sizes(model_dir, index)
    maps: dict[str, np.memmap] = {}
    tensors = {}
    for rec in tensor_records(index).values():
        if rec.shard not in maps:
            maps[rec.shard] = np.memmap(model_dir / rec.shard, dtype=np.uint8, mode="r")
        count = rec.nbytes // np.dtype(rec.dtype).itemsize
        tensors[rec.name] = np.frombuffer(
            maps[rec.shard], dtype=rec.dtype, count=count, offset=rec.byte_offset
        ).reshape(rec.shape)
    return tensors
