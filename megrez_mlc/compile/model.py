"""The Megrez (LLaMA) graph in `tvm.relax.frontend.nn`, exporting MLC-LLM's engine functions.

The graph is built of float layers (`Linear`, `Embedding`: `.weight`, float32) that know nothing of
quantization; compile/quantized.py then sets the scheme's float type and swaps in the int4 layers.
Parameter names follow MLC's llama model (artifacts/param_names.py builds the same list from data, and the
compiler checks that the two agree); every exported function takes the weights as one trailing tuple
("packed" params), logits are float32.

Layers that need a CPU formulation ask `compiling_for_cpu()`: the model is traced under its target.
"""

from __future__ import annotations

from typing import Any

from tvm import relax as rx
from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op
from tvm.relax.frontend.nn.llm.kv_cache import PagedKVCache, RopeMode, TIRPagedKVCache
from tvm.target import Target

from ..config import ModelConfig
from . import cpu_attention, ops
from .audio import OmniAudio
from .layers import Embedding, Linear, compiling_for_cpu
from .rope_kernel import split_rotary
from .vision import OmniVision


class Attention(nn.Module):
    """With a `kv_cache_dtype` other than the activations', q/k/v are cast to it on their way into the cache
    (whose attention kernels then work in that type) and the attention output back."""

    def __init__(self, config: ModelConfig, kv_cache_dtype: str | None) -> None:
        self.kv_cache_dtype = kv_cache_dtype  # not `dtype`: Module.to must leave it alone
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.qkv_proj = Linear(config.hidden_size, config.qkv_out_features, bias)
        self.o_proj = Linear(config.attention_out_features, config.hidden_size, bias)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        b, s, _ = x.shape
        qkv = op.reshape(self.qkv_proj(x), (b, s, self.num_heads + 2 * self.num_kv_heads, self.head_dim))
        cast = self.kv_cache_dtype not in (None, qkv.dtype)
        if cast:
            qkv = qkv.astype(self.kv_cache_dtype)
        # RoPE is applied inside the KV cache (RopeMode.NORMAL), by the kernel of rope_kernel.py.
        out = kv_cache.attention_with_fused_qkv(layer_id, qkv, self.num_heads, sm_scale=self.head_dim**-0.5)
        if cast:
            out = out.astype(x.dtype)
        return self.o_proj(op.reshape(out, (b, s, self.num_heads * self.head_dim)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        bias = config.mlp_bias
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias)

    def forward(self, x: Tensor) -> Tensor:
        gate_up = self.gate_up_proj(x)
        # CPUs: a vectorizable exp, since libm's scalar exp cost a measurable share of each decode step
        if compiling_for_cpu():
            return self.down_proj(op.tensor_expr_op(ops.swiglu_cpu, "swiglu", [gate_up]))
        gate, up = op.split(gate_up, 2, axis=-1)
        return self.down_proj(op.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, kv_cache_dtype: str | None) -> None:
        self.self_attn = Attention(config, kv_cache_dtype)
        self.mlp = MLP(config)
        self.input_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, kv_cache: PagedKVCache, layer_id: int) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), kv_cache, layer_id)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, kv_cache_dtype: str | None) -> None:
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, kv_cache_dtype) for _ in range(config.num_hidden_layers)]
        )
        self.norm = nn.RMSNorm(config.hidden_size, -1, config.rms_norm_eps, bias=False)

    def forward(self, x: Tensor, kv_cache: PagedKVCache) -> Tensor:
        for layer_id, layer in enumerate(self.layers):
            x = layer(x, kv_cache, layer_id)
        return self.norm(x)


# TVM's CPU prefill attention kernels (serial reference loops) and the faster ones with their signatures
# (the decode one, which also takes whether to prefetch, is swapped in by _replace_kv_cache_kernels).
FAST_CPU_PREFILL_ATTENTION = {
    "batch_prefill_ragged_kv": cpu_attention.ragged_prefill_attention_cpu,
    "batch_prefill_paged_kv_cpu": cpu_attention.paged_prefill_attention_cpu,
}


def _replace_kv_cache_kernels(config: ModelConfig, dtype: str, cpu: bool, prefetch: bool) -> None:
    """Swap kernels of the KV cache being built for ours: the RoPE kernel (rope_kernel.py) on every target,
    and on CPUs TVM's attention kernels (cpu_attention.py; the decode one prefetches with `prefetch`)."""
    replacements = {"fused_rope": split_rotary(config, dtype)}
    if cpu:
        heads = (config.num_key_value_heads, config.num_attention_heads, config.head_dim, dtype)
        replacements |= {symbol: factory(*heads) for symbol, factory in FAST_CPU_PREFILL_ATTENTION.items()}
        replacements["batch_decode_paged_kv_cpu"] = cpu_attention.paged_decode_attention_cpu(
            *heads, prefetch_pages=prefetch
        )
    bb = rx.BlockBuilder.current()
    for gvar, func in bb.get().functions_items():
        replacement = replacements.get(func.attrs.get("global_symbol") if func.attrs else None)
        if replacement is not None:
            bb.update_func(gvar, replacement)


class MegrezForCausalLM(nn.Module):
    """Functions and signatures of MLC-LLM's engine ABI: embed, prefill, decode, batch_prefill, batch_decode,
    batch_verify (weights as one trailing tuple, float32 logits) and create_tir_paged_kv_cache.

    The KV cache holds `kv_cache_dtype`, by default the activations' float type (as in MLC-LLM)."""

    def __init__(
        self, config: ModelConfig, target: Target, kv_cache_dtype: str | None = None, prefetch: bool = True
    ) -> None:
        self.config = config
        self.prefetch = prefetch
        self.dtype = "float32"  # of the activations; quantize_model's `Module.to` sets the scheme's
        self.kv_cache_dtype = kv_cache_dtype
        self.target = target
        self.model = LlamaModel(config, kv_cache_dtype)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        if config.vision is not None:  # after the LLM's: its parameters keep their places
            self.vision = OmniVision(config.vision, config.hidden_size)
        if config.audio is not None:
            self.audio = OmniAudio(config.audio)

    def export_tvm(self, spec: nn.spec.ModuleSpecType, **options: Any) -> Any:
        """`nn.Module.export_tvm`, traced under this model's target, which `compiling_for_cpu` reads."""
        with self.target:
            return super().export_tvm(spec, **options)

    def logits(self, hidden: Tensor) -> Tensor:
        head = self.model.embed_tokens if self.config.tie_word_embeddings else self.lm_head
        return head(hidden, out_dtype="float32")

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens.lookup(input_ids)

    def image_embed(self, patches: Tensor, position_ids: Tensor, key_positions: Tensor) -> Tensor:
        """One image slice's patches -> its query_num embeddings, rows like `embed`'s (compile/vision.py)."""
        return self.vision(patches, position_ids, key_positions)

    def audio_embed(self, mel: Tensor) -> Tensor:
        """One clip's log-mel frames, in pairs -> its embeddings, rows like `embed`'s (compile/audio.py)."""
        return self.audio(mel)

    def prefill(self, input_embed: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        hidden = self.model(input_embed, paged_kv_cache)

        def last_position(x: te.Tensor) -> te.Tensor:
            b, s, d = x.shape
            return te.compute((b, 1, d), lambda i, _, k: x[i, s - 1, k], name="last_position")

        hidden = op.tensor_expr_op(last_position, "last_position", [hidden])
        return self.logits(hidden), paged_kv_cache

    def decode(self, input_embed: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.logits(self.model(input_embed, paged_kv_cache)), paged_kv_cache

    def batch_prefill(
        self, input_embeds: Tensor, logit_positions: Tensor, paged_kv_cache: PagedKVCache
    ) -> tuple[Tensor, PagedKVCache]:
        hidden = op.tensor_expr_op(
            ops.take_positions, "take_positions", [self.model(input_embeds, paged_kv_cache), logit_positions]
        )
        return self.logits(hidden), paged_kv_cache

    def batch_decode(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def batch_verify(self, input_embeds: Tensor, paged_kv_cache: PagedKVCache) -> tuple[Tensor, PagedKVCache]:
        return self.logits(self.model(input_embeds, paged_kv_cache)), paged_kv_cache

    def create_tir_paged_kv_cache(
        self,
        max_batch_size: tirx.Var,
        max_total_seq_len: tirx.Var,
        prefill_chunk_size: tirx.Var,
        page_size: tirx.Var,
        support_sliding_window: tirx.Var,
    ) -> PagedKVCache:
        c = self.config
        dtype = self.kv_cache_dtype or self.dtype
        cache = TIRPagedKVCache(
            attn_kind="mha",
            max_batch_size=max_batch_size,
            max_total_seq_len=max_total_seq_len,
            prefill_chunk_size=prefill_chunk_size,
            page_size=page_size,
            support_sliding_window=support_sliding_window,
            layer_partition=rx.ShapeExpr([0, c.num_hidden_layers]),
            num_hidden_layers=c.num_hidden_layers,
            num_attention_heads=c.num_attention_heads,
            num_key_value_heads=c.num_key_value_heads,
            qk_head_dim=c.head_dim,
            v_head_dim=c.head_dim,
            mla_original_qk_head_dim=0,
            mla_original_v_head_dim=0,
            rope_mode=RopeMode.NORMAL,
            rope_scale=1,
            rope_theta=c.rope_theta,
            rope_scaling={},  # ours, in the swapped-in RoPE kernel
            rope_ext_factors=rx.prim_value(0),
            rotary_dim=c.head_dim,
            enable_disaggregation=False,
            dtype=dtype,
            target=self.target,
        )
        _replace_kv_cache_kernels(c, dtype, cpu=compiling_for_cpu(), prefetch=self.prefetch)
        return cache

    def get_default_spec(self) -> nn.spec.ModuleSpec:
        hidden, dtype = self.config.hidden_size, self.dtype
        packed = {"param_mode": "packed", "effect_mode": "none"}
        kv = nn.spec.Object(object_type=PagedKVCache)
        spec: dict[str, Any] = {
            "embed": {"input_ids": nn.spec.Tensor(["seq_len"], "int32"), "$": packed},
            "prefill": {
                "input_embed": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "decode": {
                "input_embed": nn.spec.Tensor([1, 1, hidden], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_prefill": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                "logit_positions": nn.spec.Tensor(["batch_size"], "int32"),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_decode": {
                "input_embeds": nn.spec.Tensor(["batch_size", 1, hidden], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            "batch_verify": {
                "input_embeds": nn.spec.Tensor([1, "seq_len", hidden], dtype),
                "paged_kv_cache": kv,
                "$": packed,
            },
            **self._image_embed_spec(packed),
            **self._audio_embed_spec(packed),
            "create_tir_paged_kv_cache": {
                "max_batch_size": int,
                "max_total_seq_len": int,
                "prefill_chunk_size": int,
                "page_size": int,
                "support_sliding_window": int,
                "$": {"param_mode": "none", "effect_mode": "none"},
            },
        }
        return nn.spec.ModuleSpec.from_raw(spec, self)

    def _image_embed_spec(self, packed: dict[str, str]) -> dict[str, Any]:
        vision = self.config.vision
        if vision is None:
            return {}
        return {
            "image_embed": {
                "patches": nn.spec.Tensor(["num_patches", vision.patch_features], self.dtype),
                "position_ids": nn.spec.Tensor(["num_patches"], "int32"),
                "key_positions": nn.spec.Tensor(["num_patches", self.config.hidden_size], self.dtype),
                "$": packed,
            }
        }

    def _audio_embed_spec(self, packed: dict[str, str]) -> dict[str, Any]:
        audio = self.config.audio
        if audio is None:
            return {}
        mel = nn.spec.Tensor(["encoder_frames", 2, audio.n_mels], self.dtype)
        return {"audio_embed": {"mel": mel, "$": packed}}
