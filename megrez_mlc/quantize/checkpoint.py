"""Read tensors from a Hugging Face checkpoint folder without loading it whole.

Safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and
memory-mapped, so a tensor or a block of its rows is read only when asked for, and bfloat16 needs no torch.
`pytorch_model*.bin` files go through `torch.load(weights_only=True, mmap=True)`, which never unpickles
arbitrary objects.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MegrezError

_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bits; widened to float32 on read
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # as the checkpoint stores it: "float32", "float16", "bfloat16", "float64"
    path: Path


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


class _SafetensorsFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        with path.open("rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise MegrezError(f"{path} is truncated (no safetensors header); re-download it")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > size - 8:
                raise MegrezError(f"{path} is truncated or not a safetensors file; re-download it")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise MegrezError(f"{path} has a corrupt safetensors header; re-download it") from None
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            if entry["dtype"] not in _SAFETENSORS_DTYPES:
                raise MegrezError(f"{path}: tensor {name} has dtype {entry['dtype']}, expected a float type")
            end = entry["data_offsets"][1]
            if self.data_start + end > size:
                raise MegrezError(
                    f"{path} is truncated: tensor {name} ends at byte {self.data_start + end} "
                    f"but the file has {size}; re-download it"
                )
        self._mmap: np.memmap | None = None

    def info(self, name: str) -> TensorInfo:
        entry = self.entries[name]
        dtype = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}[entry["dtype"]]
        return TensorInfo(name, tuple(entry["shape"]), dtype, self.path)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = entry["shape"]
        row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        begin = self.data_start + entry["data_offsets"][0] + start * row_elems * dtype.itemsize
        count = (stop - start) * row_elems
        flat = np.frombuffer(self._mmap, dtype=dtype, count=count, offset=begin)
        rows = flat.reshape((stop - start, *shape[1:]) if shape else ())
        if entry["dtype"] == "BF16":
            return bf16_bits_to_float32(rows)
        return rows.astype(np.float32)


class _TorchBinFile:
    def __init__(self, path: Path) -> None:
        try:
            import torch
        except ImportError:
            raise MegrezError(
                f"{path.name} is a PyTorch checkpoint; reading it needs torch: "
                "pip install 'megrez-mlc[torch]'"
            ) from None
        self.path = path
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as err:  # torch raises many types for a corrupt or hostile pickle
            raise MegrezError(f"cannot read {path} as a weights-only PyTorch checkpoint: {err}") from None
        if not isinstance(self.tensors, dict):
            raise MegrezError(f"{path} does not hold a state dict of tensors")
        self.entries = self.tensors

    def info(self, name: str) -> TensorInfo:
        tensor = self.tensors[name]
        return TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), self.path)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        import torch

        return self.tensors[name][start:stop].to(torch.float32).numpy()


class Checkpoint:
    """All weight tensors of a HF checkpoint folder, by name."""

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir
        self._files: dict[str, _SafetensorsFile | _TorchBinFile] = {}
        for path in self._weight_files(hf_dir):
            reader = _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchBinFile(path)
            for name in reader.entries:
                self._files[name] = reader

    @staticmethod
    def _weight_files(hf_dir: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = hf_dir / index_name
            if index_path.is_file():
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                files = sorted({hf_dir / f for f in weight_map.values()})
                missing = [f.name for f in files if not f.is_file()]
                if missing:
                    raise MegrezError(
                        f"{index_name} names {', '.join(missing)}, which is missing; re-download it"
                    )
                return files
        for pattern in ("*.safetensors", "pytorch_model*.bin"):
            files = sorted(hf_dir.glob(pattern))
            if files:
                return files
        raise MegrezError(
            f"no weights in {hf_dir}: expected model.safetensors, sharded *.safetensors with an index, "
            "or pytorch_model*.bin"
        )

    def names(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def info(self, name: str) -> TensorInfo:
        return self._files[name].info(name)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a tensor as float32 (the whole tensor for 1-D ones when 0..len)."""
        return self._files[name].read_rows(name, start, stop)

    def read(self, name: str) -> np.ndarray:
        return self.read_rows(name, 0, self.info(name).shape[0])

    def row_blocks(self, name: str, max_rows: int) -> Iterator[np.ndarray]:
        rows = self.info(name).shape[0]
        for start in range(0, rows, max_rows):
            yield self.read_rows(name, start, min(rows, start + max_rows))
