"""Read tensors from a Hugging Face checkpoint folder without loading it whole.

Safetensors files are parsed here (an 8-byte header length, a JSON header, raw little-endian data) and read
with plain file reads, a block of rows at a time, so bfloat16 needs no torch and memory stays bounded: pages
of a memory map would count toward the process's resident memory as they are touched (5.8 GB by the end of
Megrez-3B), while read() leaves them in the kernel's page cache. Reads open their own file handle, so
several threads can read at once. `pytorch_model*.bin` files go through
`torch.load(weights_only=True, mmap=True)`, which never unpickles arbitrary objects.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import struct
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import MegrezError

# Safetensors dtype -> (our name, how its bytes are read). bfloat16 is read as raw bits, widened on read.
_SAFETENSORS_DTYPES = {
    "F64": ("float64", np.dtype("<f8")),
    "F32": ("float32", np.dtype("<f4")),
    "F16": ("float16", np.dtype("<f2")),
    "BF16": ("bfloat16", np.dtype("<u2")),
}
FLOAT_DTYPES = ("float64", "float32", "float16", "bfloat16")
_MADV_DONTNEED = 4  # <sys/mman.h> on Linux
_OTHER_DTYPE_NAMES = {
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # as the checkpoint stores it: "float32", "float16", "bfloat16", ... ("int64" for a buffer)
    path: Path


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 is the top half of a float32: shift the 16 bits up (one pass, no temporary)."""
    wide = np.empty(bits.shape, dtype=np.uint32)
    np.left_shift(bits, 16, out=wide, dtype=np.uint32)
    return wide.view(np.float32)


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
                header = None
        if not isinstance(header, dict):
            raise MegrezError(f"{path} has a corrupt safetensors header; re-download it")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, dict[str, Any]] = header
        for name, entry in header.items():
            try:
                begin, end = entry["data_offsets"]
                dtype, shape = entry["dtype"], [int(n) for n in entry["shape"]]
            except (KeyError, TypeError, ValueError):
                raise MegrezError(f"{path}: the header entry of {name} is corrupt; re-download it") from None
            if self.data_start + end > size:
                raise MegrezError(
                    f"{path} is truncated: tensor {name} ends at byte {self.data_start + end} "
                    f"but the file has {size}; re-download it"
                )
            if dtype in _SAFETENSORS_DTYPES:
                needed = _SAFETENSORS_DTYPES[dtype][1].itemsize * int(np.prod(shape))
                if end - begin != needed:
                    raise MegrezError(
                        f"{path}: tensor {name} spans {end - begin} bytes, but {dtype} {shape} needs "
                        f"{needed}; re-download it"
                    )

    def info(self, name: str) -> TensorInfo:
        entry = self.entries[name]
        known = _SAFETENSORS_DTYPES.get(entry["dtype"])
        dtype = known[0] if known else _OTHER_DTYPE_NAMES.get(entry["dtype"], entry["dtype"])
        return TensorInfo(name, tuple(entry["shape"]), dtype, self.path)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        entry = self.entries[name]
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]][1]
        shape = entry["shape"]
        row_elems = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        rows = np.empty((stop - start, *shape[1:]) if shape else (), dtype=dtype)
        begin = self.data_start + entry["data_offsets"][0] + start * row_elems * dtype.itemsize
        try:
            with self.path.open("rb", buffering=0) as f:
                f.seek(begin)
                view = memoryview(rows).cast("B")
                filled = 0
                while filled < len(view):  # read() may return less than asked for
                    got = f.readinto(view[filled:])
                    if not got:
                        raise MegrezError(f"{self.path} ended early while reading {name}; re-download it")
                    filled += got
        except OSError as err:  # the file vanished or the disk failed while converting
            raise MegrezError(f"cannot read {self.path}: {err.strerror or err}") from None
        if entry["dtype"] == "BF16":
            return bf16_bits_to_float32(rows)
        return rows.astype(np.float32, copy=False)


def _torch_load_reason(err: Exception) -> str:
    """The line of torch.load's many-line error that says what is wrong (not how to load it unsafely)."""
    text = str(err)
    _, found, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if found else text).splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(err).__name__


def _drop_mapped_pages(address: int, length: int) -> None:
    """Let go of the pages of a memory-mapped range once read (Linux madvise MADV_DONTNEED).

    torch.load(mmap=True) maps the whole file; every page touched stays in this process's resident memory
    (5.8 GB by the end of Megrez-3B) unless released. The mapping is private and never written, so a
    dropped page is only re-read from the file if touched again. Only whole pages inside the range are
    dropped, so blocks read at the same time by other threads are never affected."""
    if sys.platform != "linux":
        return
    page = mmap.PAGESIZE
    first, end = -(-address // page) * page, (address + length) // page * page
    if end > first:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(end - first), _MADV_DONTNEED)


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
        # Files from torch.save since 1.6 are zip archives and can be memory-mapped; older ones load whole.
        self.mapped = zipfile.is_zipfile(path)
        try:
            self.tensors = torch.load(path, map_location="cpu", weights_only=True, mmap=self.mapped)
        except Exception as err:  # torch raises many types for a corrupt or hostile pickle
            raise MegrezError(
                f"cannot read {path} as a weights-only PyTorch checkpoint ({_torch_load_reason(err)}); "
                "megrez-mlc loads only plain state dicts of tensors, never other pickled objects"
            ) from None
        if not isinstance(self.tensors, dict) or not all(
            isinstance(t, torch.Tensor) for t in self.tensors.values()
        ):
            raise MegrezError(f"{path} does not hold a state dict of tensors")
        self.entries = self.tensors

    def info(self, name: str) -> TensorInfo:
        tensor = self.tensors[name]
        return TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), self.path)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        import torch

        rows = self.tensors[name][start:stop]
        # Widened by numpy into a new array (nothing may keep the mapped pages; torch's allocator and its
        # threads would hold hundreds of MB more).
        if rows.dtype == torch.bfloat16:
            block = bf16_bits_to_float32(rows.view(torch.int16).numpy().view(np.uint16))
        else:
            block = rows.numpy().astype(np.float32, copy=True)
        if self.mapped and rows.is_contiguous():
            _drop_mapped_pages(rows.data_ptr(), rows.numel() * rows.element_size())
        return block


class Checkpoint:
    """All weight tensors of a HF checkpoint folder, by name."""

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir
        self._files: dict[str, _SafetensorsFile | _TorchBinFile] = {}
        for path in self._weight_files(hf_dir):
            reader = _SafetensorsFile(path) if path.suffix == ".safetensors" else _TorchBinFile(path)
            for name in reader.entries:
                if name in self._files:
                    raise MegrezError(
                        f"tensor {name} is in both {self._files[name].path.name} and {path.name}; "
                        "the folder mixes two checkpoints, keep one"
                    )
                self._files[name] = reader

    @staticmethod
    def _weight_files(hf_dir: Path) -> list[Path]:
        for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
            index_path = hf_dir / index_name
            if index_path.is_file():
                try:
                    weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                    raise MegrezError(f"{index_path} is corrupt (no weight_map); re-download it") from None
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

    def row_ranges(self, name: str, max_rows: int) -> list[tuple[int, int]]:
        """[start, stop) row ranges of at most max_rows covering a tensor, to read one at a time."""
        rows = self.info(name).shape[0]
        return [(start, min(rows, start + max_rows)) for start in range(0, rows, max_rows)]
