"""The same weights for llama.cpp: a Hugging Face LLaMA checkpoint written as an F16 GGUF, then quantized
by llama.cpp itself (through llama-cpp-python's `llama_model_quantize`) to Q4_0 or Q4_K_M.

The GGUF follows llama.cpp's LLaMA layout: its RoPE rotates adjacent pairs of a head's dimensions where
Hugging Face rotates the two halves, so the rows of q_proj and k_proj are reordered per head (row j of the
first half and row j of the second half become rows 2j and 2j+1). The vocabulary is a list of placeholder
tokens: the benchmark feeds token ids, never text, but llama.cpp wants a tokenizer of the model's size.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from megrez_mlc.quantize.checkpoint import Checkpoint


def interleave_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder each head's rows from halves [x0..x(d/2-1), y0..y(d/2-1)] to pairs [x0, y0, x1, y1, ...]."""
    rows, cols = weight.shape
    head_dim = rows // num_heads
    return weight.reshape(num_heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensor_plan(cfg: dict) -> list[tuple[str, str, int | None]]:
    """(GGUF name, HF name, heads to interleave for RoPE or None), in llama.cpp's usual order."""
    plan = [("token_embd.weight", "model.embed_tokens.weight", None)]
    for i in range(cfg["num_hidden_layers"]):
        hf, gg = f"model.layers.{i}", f"blk.{i}"
        plan += [
            (f"{gg}.attn_norm.weight", f"{hf}.input_layernorm.weight", None),
            (f"{gg}.attn_q.weight", f"{hf}.self_attn.q_proj.weight", cfg["num_attention_heads"]),
            (f"{gg}.attn_k.weight", f"{hf}.self_attn.k_proj.weight", cfg["num_key_value_heads"]),
            (f"{gg}.attn_v.weight", f"{hf}.self_attn.v_proj.weight", None),
            (f"{gg}.attn_output.weight", f"{hf}.self_attn.o_proj.weight", None),
            (f"{gg}.ffn_norm.weight", f"{hf}.post_attention_layernorm.weight", None),
            (f"{gg}.ffn_gate.weight", f"{hf}.mlp.gate_proj.weight", None),
            (f"{gg}.ffn_up.weight", f"{hf}.mlp.up_proj.weight", None),
            (f"{gg}.ffn_down.weight", f"{hf}.mlp.down_proj.weight", None),
        ]
    plan.append(("output_norm.weight", "model.norm.weight", None))
    if not cfg.get("tie_word_embeddings"):
        plan.append(("output.weight", "lm_head.weight", None))
    return plan


def write_f16_gguf(hf_dir: Path, out: Path) -> None:
    """Stream the checkpoint into an F16 GGUF (norms stay float32, as llama.cpp's converter keeps them)."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    checkpoint = Checkpoint(hf_dir)
    plan = _tensor_plan(cfg)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    vocab = cfg["vocab_size"]

    writer = gguf.GGUFWriter(out, "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(cfg["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([f"<t{i}>" for i in range(vocab)])
    writer.add_token_types([gguf.TokenType.NORMAL] * vocab)
    writer.add_token_merges(["<t2> <t3>"])  # llama.cpp refuses a BPE vocabulary without merges
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_add_bos_token(False)

    for gguf_name, hf_name, _ in plan:
        shape = checkpoint.info(hf_name).shape
        dtype = np.float32 if len(shape) == 1 else np.float16
        writer.add_tensor_info(
            gguf_name, shape, np.dtype(dtype), int(np.prod(shape)) * np.dtype(dtype).itemsize
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, hf_name, rope_heads in plan:
        tensor = checkpoint.read(hf_name)
        if rope_heads:
            tensor = interleave_rope_rows(tensor, rope_heads)
        writer.write_tensor_data(tensor.astype(np.float32 if tensor.ndim == 1 else np.float16))
    writer.close()


def quantize_gguf(f16: Path, out: Path, kind: str, threads: int) -> None:
    """llama.cpp's own quantizer: kind is "Q4_0" or "Q4_K_M"."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = {"Q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, "Q4_K_M": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M}[
        kind
    ]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(str(f16).encode(), str(out).encode(), params)
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize {f16} to {kind} (status {status})")
