"""A full-size random Megrez-3B-shaped checkpoint for the benchmarks, laid out like a Hugging Face download.

config.json (the megrez-3b-instruct preset) + three bf16 safetensors shards + model.safetensors.index.json,
~5.8 GB, written tensor by tensor in blocks of rows and cached: later benchmark runs reuse it. The
tokenizer is the tiny demo one (Megrez's special tokens and chat template, a small BPE vocabulary): the
benchmarks feed token ids, and gen-config needs a tokenizer.json.
"""

from __future__ import annotations

import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megrez_mlc.config import load_preset  # noqa: E402
from megrez_mlc.tiny import build_tokenizer  # noqa: E402

CHECKPOINT_NAME = "megrez-3b-instruct-random-bf16"
NUM_SHARDS = 3
GENERATE_ROWS = 4096  # rows of random numbers made at a time while writing the checkpoint


def hf_tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HF LlamaForCausalLM state dict, in the order transformers saves them."""
    hidden, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q_rows = cfg["num_attention_heads"] * cfg["head_dim"]
    kv_rows = cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.self_attn.q_proj.weight": (q_rows, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_rows, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_rows, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, q_rows),
            f"{p}.mlp.gate_proj.weight": (inter, hidden),
            f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter),
            f"{p}.input_layernorm.weight": (hidden,),
            f"{p}.post_attention_layernorm.weight": (hidden,),
        }
    shapes["model.norm.weight"] = (hidden,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def _nbytes_bf16(shape: tuple[int, ...]) -> int:
    return 2 * int(np.prod(shape))


def _write_safetensors_bf16(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A safetensors file written tensor by tensor (the safetensors package wants it all in memory)."""
    header: dict[str, dict] = {}
    offset = 0
    for name, shape in shapes.items():
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + _nbytes_bf16(shape)],
        }
        offset += _nbytes_bf16(shape)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the format pads the header to 8 bytes
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes)
        for shape in shapes.values():
            if len(shape) == 1:  # RMSNorm weights sit near 1
                f.write(_to_bf16(1 + 0.05 * rng.standard_normal(shape, dtype=np.float32)).tobytes())
                continue
            rows, cols = shape
            for start in range(0, rows, GENERATE_ROWS):
                n = min(GENERATE_ROWS, rows - start)
                block = rng.standard_normal((n, cols), dtype=np.float32) * np.float32(1 / np.sqrt(cols))
                f.write(_to_bf16(block).tobytes())


def _to_bf16(values: np.ndarray) -> np.ndarray:
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def make_checkpoint(hf_dir: Path) -> None:
    """Write the random checkpoint into a temp folder and rename it, so an interrupted run leaves no half."""
    cfg = {"model_type": "llama", **load_preset("megrez-3b-instruct")["model_config"]}
    shapes = hf_tensor_shapes(cfg)
    partial = hf_dir.with_name(hf_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "config.json").write_text(json.dumps(cfg, indent=2))
    total = sum(_nbytes_bf16(s) for s in shapes.values())
    groups: list[dict[str, tuple[int, ...]]] = [{} for _ in range(NUM_SHARDS)]
    filled = 0
    for name, shape in shapes.items():  # split by bytes, whole tensors, like transformers' max_shard_size
        groups[min(NUM_SHARDS - 1, filled * NUM_SHARDS // total)][name] = shape
        filled += _nbytes_bf16(shape)
    weight_map = {}
    rng = np.random.default_rng(0)
    for i, group in enumerate(groups):
        file_name = f"model-{i + 1:05d}-of-{NUM_SHARDS:05d}.safetensors"
        print(f"writing {partial / file_name} ({sum(map(_nbytes_bf16, group.values())) / 1e9:.2f} GB)")
        _write_safetensors_bf16(partial / file_name, group, rng)
        weight_map |= dict.fromkeys(group, file_name)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (partial / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    partial.rename(hf_dir)


def ensure_checkpoint(cache_dir: Path) -> Path:
    """The cached checkpoint folder under `cache_dir`, generated on first use."""
    hf_dir = cache_dir / CHECKPOINT_NAME
    if not (hf_dir / "model.safetensors.index.json").is_file():
        make_checkpoint(hf_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        build_tokenizer().save(str(hf_dir / "tokenizer.json"))
    return hf_dir
