"""A loaded model library plus its weights: the functions of MLC's engine ABI, called from Python.

This is the thin layer over TVM's VM and the paged KV cache: sequence ids in, float32 logits out. The
`Engine` (engine.py) hands out `Sequence` handles over these ids, and samples, stops and detokenizes.
"""

from __future__ import annotations

import functools
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import tvm
from tvm import relax
from tvm.runtime import ShapeTuple

from ..artifacts.chat_config import Limits, resolve_limits
from ..artifacts.schemes import get_scheme
from ..artifacts.tensor_cache import check_shard_sizes, read_index, tensor_records
from ..errors import MegrezError
from ..webgpu import DEVICE_BACKENDS, Adapter, device_adapter
from .media import MediaStore, is_media_id
from .threads import configure_threads

PAGE_SIZE = 16
# On a CPU, batch_decode runs the weights as a GEMM padded to 8-token tiles that dequantizes them once per
# call: on the full Megrez-3B shape a step of 2 to 8 sequences costs as much as ~4.7 single-sequence steps
# (measured: 196-201 ms against 42 ms), so up to this many sequences are decoded one after the other.
SEQUENTIAL_DECODE_MAX = 4
CPU_DEVICE_TYPE = 1  # DLPack's kDLCPU
DEVICE_NAMES = ("cpu", "cuda", "metal", "rocm", "opencl", "webgpu", "vulkan")


def pages_for(num_tokens: int) -> int:
    """KV-cache pages a sequence of `num_tokens` tokens occupies."""
    return -(-num_tokens // PAGE_SIZE)


def open_device(device: str) -> tvm.runtime.Device:
    kind, _, index = device.partition(":")
    if kind not in DEVICE_NAMES:
        raise MegrezError(f"unknown device {device!r}; use one of {', '.join(DEVICE_NAMES)} (optionally :N)")
    if kind in DEVICE_BACKENDS:  # our WebGPU runtime, through any of wgpu's backends or the one named
        if int(index or 0) != 0:
            raise MegrezError(f"device {device}: the webgpu runtime opens one adapter, {kind}:0")
        device_adapter(kind)
        return tvm.device("webgpu", 0)
    dev = tvm.device(kind, int(index or 0))
    if not dev.exist:
        raise MegrezError(
            f"device {device} is not available on this machine (or this TVM build lacks its runtime)"
        )
    return dev


def check_params_against_metadata(model_dir: Path, metadata: dict[str, Any]) -> None:
    """Before TVM reads a byte (its own checks end in a C++ exception): tensor-cache.json is consistent,
    every shard has its recorded size, and every parameter the library expects is there with its shape and
    dtype. Each failure names the file or parameter in one line. (md5 sums: `megrez-mlc verify`.)"""
    index = read_index(model_dir)
    check_shard_sizes(model_dir, index)
    records = tensor_records(index)
    for param in metadata["params"]:
        name = param["name"]
        rec = records.get(name)
        if rec is None:
            raise MegrezError(
                f"parameter {name} is missing from {model_dir}/tensor-cache.json; the weights were converted "
                f"for another model or quantization than the library ({metadata['quantization']})"
            )
        if list(rec.shape) != list(param["shape"]) or rec.dtype != param["dtype"]:
            raise MegrezError(
                f"parameter {name} is {rec.dtype}{list(rec.shape)} in {model_dir} but the library expects "
                f"{param['dtype']}{list(param['shape'])}; "
                "convert and compile from the same model and quantization"
            )


def check_fits_adapter(metadata: dict[str, Any], adapter: Adapter) -> None:
    """A WebGPU adapter runs a library only with shader-f16 for float16 models, and binds no tensor larger
    than its maxStorageBufferBindingSize: say so in one line before any weight is uploaded."""
    params = metadata["params"]
    if not adapter.shader_f16 and any(p["dtype"] == "float16" for p in params):
        raise MegrezError(
            f"{adapter.name} has no shader-f16, so it cannot run this {metadata['quantization']} library; "
            "convert and compile the model as q4f32_1 (or q0f32) for it"
        )
    limit = adapter.max_storage_buffer_binding_size
    for param in params:
        size = int(np.prod(param["shape"])) * np.dtype(param["dtype"]).itemsize
        if size > limit:
            raise MegrezError(
                f"parameter {param['name']} is {size / 2**20:.0f} MiB, more than {adapter.name} binds in one "
                f"buffer (maxStorageBufferBindingSize {limit / 2**20:.0f} MiB); run it on a GPU whose driver "
                "allows more, or on --device cpu"
            )


class ModelLibrary:
    """Weights on a device, the VM, and one paged KV cache shared by all sequences."""

    def __init__(
        self,
        model_dir: Path,
        model_lib: Path,
        device: str = "cpu",
        *,
        max_batch_size: int = 8,
        max_total_seq_len: int | None = None,
        prefill_chunk_size: int | None = None,
        threads: int | None = None,
        max_sequences: int | None = None,
    ) -> None:
        """`max_batch_size`: sequences in one forward pass; `max_sequences`: sequences the cache holds at once
        (default the same; the server's prefix cache keeps finished ones beside the running batch)."""
        if not Path(model_lib).is_file():
            raise MegrezError(f"model library {model_lib} not found; build it with `megrez-mlc compile`")
        self.threads = configure_threads(threads)
        self.device = open_device(device)
        try:
            self.vm = relax.VirtualMachine(tvm.runtime.load_module(str(model_lib)), self.device)
        except Exception as err:  # a library for another target/OS or a corrupt file
            raise MegrezError(f"cannot load model library {model_lib} on {device}: {err}") from None
        self.metadata: dict[str, Any] = json.loads(self.vm["_metadata"]())
        check_params_against_metadata(model_dir, self.metadata)
        kind = device.partition(":")[0]
        if kind in DEVICE_BACKENDS:
            check_fits_adapter(self.metadata, device_adapter(kind))
        self.params = self._load_params(model_dir)

        compiled = Limits(
            int(self.metadata["context_window_size"]),
            int(self.metadata["prefill_chunk_size"]),
            int(self.metadata["max_batch_size"]),
        )
        limits = resolve_limits(
            compiled,
            prefill_chunk_size=prefill_chunk_size,
            max_batch_size=max_batch_size,
            compiled=str(model_lib),
        )
        self.context_window_size = limits.context_window_size
        self.prefill_chunk_size = limits.prefill_chunk_size
        self.max_batch_size = limits.max_batch_size
        if max_total_seq_len is not None and max_total_seq_len < 1:
            raise MegrezError(f"the KV cache must hold at least 1 token, not {max_total_seq_len}")
        self.max_total_seq_len = max_total_seq_len or self.context_window_size
        self.max_sequences = max(max_sequences or 0, self.max_batch_size)
        self.vocab_size = int(self.metadata["params"][0]["shape"][0])
        self.kv_cache = self.vm["create_tir_paged_kv_cache"](
            ShapeTuple([max_batch_size]),
            ShapeTuple([self.max_total_seq_len]),
            ShapeTuple([self.prefill_chunk_size]),
            ShapeTuple([PAGE_SIZE]),
            ShapeTuple([0]),
        )
        # The library's entry points by name (a test wraps one to cut a forward pass short).
        self.functions = {
            name: self.vm[name] for name in ("embed", "prefill", "decode", "batch_prefill", "batch_decode")
        }
        self._kv = {
            name: tvm.get_global_func(f"vm.builtin.{name}")
            for name in (
                "kv_state_add_sequence",
                "kv_state_fork_sequence",
                "kv_state_remove_sequence",
                "kv_state_popn",
                "kv_state_begin_forward",
                "kv_state_end_forward",
                "attention_kv_cache_get_num_available_pages",
                "attention_kv_cache_get_total_sequence_length",
            )
        }
        self._reshape = tvm.get_global_func("vm.builtin.reshape")
        # Omni libraries: the vision encoder, and the embeddings of the images in prompts (runtime/media.py)
        self.has_image_embed = self.vm.module.implements_function("image_embed")
        self.has_audio_embed = self.vm.module.implements_function("audio_embed")
        self.media = MediaStore()
        # The VM runs one call at a time: the server encodes images on a request's worker thread while its
        # scheduler thread prefills and decodes.
        self.lock = threading.RLock()
        self._next_seq_id = 0
        self.sequence_lengths: dict[int, int] = {}

    def _load_params(self, model_dir: Path) -> Any:
        load = tvm.get_global_func("vm.builtin.tensor_cache.load")
        by_name = tvm.get_global_func("vm.builtin.param_array_from_cache_by_name")
        clear = tvm.get_global_func("vm.builtin.tensor_cache.clear")
        try:
            load(str(model_dir), self.device.dlpack_device_type(), self.device.index)
            return by_name([p["name"] for p in self.metadata["params"]])
        except Exception as err:
            raise MegrezError(f"cannot load the weights in {model_dir}: {err}") from None
        finally:
            clear()

    # --- sequences in the KV cache -------------------------------------------------------------------------

    def _new_seq_id(self) -> int:
        if len(self.sequence_lengths) >= self.max_sequences:
            raise MegrezError(f"the KV cache holds at most {self.max_sequences} sequences at once")
        seq_id = self._next_seq_id
        self._next_seq_id += 1
        return seq_id

    def add_sequence(self) -> int:
        seq_id = self._new_seq_id()
        self._kv["kv_state_add_sequence"](self.kv_cache, seq_id)
        self.sequence_lengths[seq_id] = 0
        return seq_id

    def fork_sequence(self, parent_id: int, length: int) -> int:
        """A new sequence holding the first `length` tokens of the parent's. The two share those tokens' full
        pages (a partly filled last page is copied) and both can go on growing apart."""
        if not 0 <= length <= self.sequence_lengths[parent_id]:
            raise MegrezError(
                f"cannot fork {length} tokens from a sequence of {self.sequence_lengths[parent_id]}"
            )
        seq_id = self._new_seq_id()
        self._kv["kv_state_fork_sequence"](self.kv_cache, parent_id, seq_id, length)
        self.sequence_lengths[seq_id] = length
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self._kv["kv_state_remove_sequence"](self.kv_cache, seq_id)
        del self.sequence_lengths[seq_id]

    def truncate_sequence(self, seq_id: int, length: int) -> None:
        """Keep the first `length` tokens of a sequence in the cache (all of them when it holds fewer)."""
        drop = self.sequence_lengths[seq_id] - length
        if drop > 0:
            self._kv["kv_state_popn"](self.kv_cache, seq_id, drop)
            self.sequence_lengths[seq_id] = length

    @property
    def num_sequences(self) -> int:
        return len(self.sequence_lengths)

    def cached_tokens(self) -> int:
        """Tokens in the cache, all sequences together, as the cache itself counts them."""
        return int(self._kv["attention_kv_cache_get_total_sequence_length"](self.kv_cache))

    def free_pages(self) -> int:
        """KV-cache pages not holding any sequence's tokens."""
        return int(self._kv["attention_kv_cache_get_num_available_pages"](self.kv_cache))

    def pages_to_append(self, seq_ids: list[int], lengths: list[int]) -> int:
        """Free pages that appending lengths[i] tokens to each sequence takes. A page holds PAGE_SIZE tokens
        of one sequence, so the cache can fill up before max_total_seq_len tokens: 16 sequences of 17
        tokens take 32 pages (512 tokens' room)."""
        return sum(
            pages_for(self.sequence_lengths[s] + n) - pages_for(self.sequence_lengths[s])
            for s, n in zip(seq_ids, lengths)
        )

    # --- forward passes ------------------------------------------------------------------------------------

    @functools.cached_property
    def hidden_size(self) -> int:
        """Width of the embeddings (what `embed` returns per token)."""
        return int(
            self.functions["embed"](
                tvm.runtime.tensor(np.zeros(1, np.int32), self.device), self.params
            ).shape[1]
        )

    def image_embed(self, inputs: Any) -> np.ndarray:
        """One image slice's embeddings [query_num, hidden] (inputs: omni/images.py SliceInputs)."""
        if not self.has_image_embed:
            raise MegrezError("this model library has no image encoder; images need a Megrez-3B-Omni model")
        dtype = get_scheme(self.metadata["quantization"]).model_dtype
        args = [
            tvm.runtime.tensor(inputs.patches.astype(dtype), self.device),
            tvm.runtime.tensor(inputs.position_ids, self.device),
            tvm.runtime.tensor(inputs.key_positions.astype(dtype), self.device),
        ]
        with self.lock:
            return self.vm["image_embed"](*args, self.params).numpy().astype(np.float32)

    def audio_embed(self, mel: np.ndarray) -> np.ndarray:
        """One clip's embeddings [frames // 4 + 2, hidden] from its log-mel frames [frames, n_mels] (an even
        count: omni/audio.py's clip_features)."""
        if not self.has_audio_embed:
            raise MegrezError("this model library has no audio encoder; audio needs a Megrez-3B-Omni model")
        dtype = get_scheme(self.metadata["quantization"]).model_dtype
        with self.lock:
            pairs = np.ascontiguousarray(mel, dtype=dtype).reshape(len(mel) // 2, 2, mel.shape[1])
            mel_frames = tvm.runtime.tensor(pairs, self.device)
            return self.vm["audio_embed"](mel_frames, self.params).numpy().astype(np.float32)

    def _embed(self, token_ids: np.ndarray, batch: int) -> Any:
        """Embeddings of the tokens as [batch, n / batch, hidden] (a view, no copy); media ids take their
        image's rows."""
        media = is_media_id(token_ids)
        if token_ids.size and token_ids.max() >= self.vocab_size:
            raise MegrezError(f"token id out of range [0, {self.vocab_size}): {token_ids.tolist()}")
        ids = tvm.runtime.tensor(np.where(media, 0, token_ids).astype(np.int32), self.device)
        embeds = self.functions["embed"](ids, self.params)
        n, hidden = embeds.shape
        if media.any():
            rows = embeds.numpy()
            rows[media] = self.media.rows(token_ids[media])
            embeds = tvm.runtime.tensor(rows, self.device)
        return self._reshape(embeds, ShapeTuple([batch, n // batch, hidden]))

    def _forward(self, seq_ids: list[int], lengths: list[int], call: Any) -> np.ndarray:
        if self.pages_to_append(seq_ids, lengths) > self.free_pages():
            raise MegrezError(
                f"the KV cache is full ({self.max_total_seq_len} tokens in all); "
                "shorten the prompts or raise max_total_seq_len"
            )
        self._kv["kv_state_begin_forward"](self.kv_cache, ShapeTuple(seq_ids), ShapeTuple(lengths))
        try:
            logits, _ = call()
            self._kv["kv_state_end_forward"](self.kv_cache)
        except BaseException:
            # A pass cut short (Ctrl-C, a failing kernel) has grown the sequences in begin_forward without
            # writing them: give those positions back, so every sequence again holds exactly its completed
            # passes and can go on (or be truncated) as if the pass had never started.
            for seq_id, n in zip(seq_ids, lengths):
                self._kv["kv_state_popn"](self.kv_cache, seq_id, n)
            raise
        for seq_id, n in zip(seq_ids, lengths):
            self.sequence_lengths[seq_id] += n
        return logits.numpy()

    def prefill(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        """Append each sequence's tokens; returns the logits [b, vocab] after each one's last token.

        Longer inputs are split into rounds of at most prefill_chunk_size tokens in all."""
        with self.lock:
            return self._prefill(seq_ids, token_lists)

    def _prefill(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        pending = {s: list(t) for s, t in zip(seq_ids, token_lists) if t}
        last_logits: dict[int, np.ndarray] = {}
        while pending:
            budget, round_ids, round_tokens = self.prefill_chunk_size, [], []
            for seq_id, tokens in pending.items():
                if budget == 0:
                    break
                piece = tokens[:budget]
                round_ids.append(seq_id)
                round_tokens.append(piece)
                budget -= len(piece)
            logits = self._prefill_round(round_ids, round_tokens)
            for i, (seq_id, piece) in enumerate(zip(round_ids, round_tokens)):
                pending[seq_id] = pending[seq_id][len(piece) :]
                if not pending[seq_id]:
                    del pending[seq_id]
                    last_logits[seq_id] = logits[i]
        return np.stack([last_logits[s] for s in seq_ids])

    def _prefill_round(self, seq_ids: list[int], token_lists: list[list[int]]) -> np.ndarray:
        lengths = [len(t) for t in token_lists]
        flat = np.concatenate([np.asarray(t, dtype=np.int32) for t in token_lists])
        embeds = self._embed(flat, batch=1)
        if len(seq_ids) == 1:
            logits = self._forward(
                seq_ids, lengths, lambda: self.functions["prefill"](embeds, self.kv_cache, self.params)
            )
            return logits.reshape(1, -1)
        positions = tvm.runtime.tensor(np.cumsum(lengths).astype(np.int32) - 1, self.device)
        logits = self._forward(
            seq_ids,
            lengths,
            lambda: self.functions["batch_prefill"](embeds, positions, self.kv_cache, self.params),
        )
        return logits.reshape(len(seq_ids), -1)

    def decode(self, seq_ids: list[int], token_ids: list[int]) -> np.ndarray:
        """Append one token to each sequence; returns logits [b, vocab]."""
        with self.lock:
            return self._decode(seq_ids, token_ids)

    def _decode(self, seq_ids: list[int], token_ids: list[int]) -> np.ndarray:
        b = len(seq_ids)
        if 1 < b <= SEQUENTIAL_DECODE_MAX and self.device.dlpack_device_type() == CPU_DEVICE_TYPE:
            return np.concatenate([self._decode([s], [t]) for s, t in zip(seq_ids, token_ids)])
        embeds = self._embed(np.asarray(token_ids, dtype=np.int32), batch=b)
        name = "decode" if b == 1 else "batch_decode"
        logits = self._forward(
            seq_ids, [1] * b, lambda: self.functions[name](embeds, self.kv_cache, self.params)
        )
        return logits.reshape(b, -1)
