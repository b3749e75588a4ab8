"""Which MLC parameters the vision half of an Omni checkpoint becomes, and from which of its tensors.

The names are the checkpoint's own (`vision.vpm.*` for the SigLIP tower, `vision.resampler.*`), except
where a tensor is reshaped for the graph: the patch convolution becomes a [hidden, 3*14*14] matrix; the
resampler's packed `attn.in_proj_weight`/`in_proj_bias` become `attn.{q,k,v}_proj`; and `proj`, which the
checkpoint multiplies as `x @ proj`, is stored transposed as a linear layer's [out, in] weight.

The vision weights stay in the scheme's float type under every quantization (see the README for the
measurement behind it): the tower runs once per slice over ~1000 patches, which is compute-bound, so int4
weights would save memory but no time, and would cost accuracy on every image token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import VisionConfig

TOWER = "vision.vpm"
RESAMPLER = "vision.resampler"
# Prefixes of the audio encoder's tensors (converted in a later release; skipped with one info line).
AUDIO_PREFIXES = ("audio.",)
# The LLM's tensors in an Omni checkpoint: Megrez-3B's names under this prefix.
LLM_PREFIX = "llm."


@dataclass(frozen=True)
class VisionTensor:
    """One MLC parameter: `rows` [start, stop) of the checkpoint tensor `source` (all of it when None),
    reshaped to `shape`, transposed first when `transpose`."""

    name: str
    shape: tuple[int, ...]
    source: str
    source_shape: tuple[int, ...]
    rows: tuple[int, int] | None = None
    transpose: bool = False

    def load(self, checkpoint) -> np.ndarray:
        start, stop = self.rows or (0, self.source_shape[0])
        block = checkpoint.read_rows(self.source, start, stop)
        if self.transpose:
            block = np.ascontiguousarray(block.T)
        return block.reshape(self.shape)


def _same(name: str, *shape: int) -> VisionTensor:
    return VisionTensor(name, shape, name, shape)


def _linear(name: str, out_features: int, in_features: int, bias: bool = True) -> list[VisionTensor]:
    weight = _same(f"{name}.weight", out_features, in_features)
    return [weight, _same(f"{name}.bias", out_features)] if bias else [weight]


def _norm(name: str, width: int) -> list[VisionTensor]:
    return [_same(f"{name}.weight", width), _same(f"{name}.bias", width)]


def vision_tensors(vision: VisionConfig, llm_hidden: int) -> list[VisionTensor]:
    """Every vision parameter, in the order compile/vision.py declares them."""
    h, inter, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    e = llm_hidden
    embeddings = f"{TOWER}.embeddings"
    tensors = [
        VisionTensor(
            f"{embeddings}.patch_embedding.weight",
            (h, vision.patch_features),
            f"{embeddings}.patch_embedding.weight",
            (h, 3, p, p),
        ),
        _same(f"{embeddings}.patch_embedding.bias", h),
        _same(f"{embeddings}.position_embedding.weight", vision.patches_per_side**2, h),
    ]
    for i in range(vision.num_hidden_layers):
        layer = f"{TOWER}.encoder.layers.{i}"
        tensors += _norm(f"{layer}.layer_norm1", h)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            tensors += _linear(f"{layer}.self_attn.{proj}", h, h)
        tensors += _norm(f"{layer}.layer_norm2", h)
        tensors += _linear(f"{layer}.mlp.fc1", inter, h) + _linear(f"{layer}.mlp.fc2", h, inter)
    tensors += _norm(f"{TOWER}.post_layernorm", h)

    r = RESAMPLER
    tensors += [_same(f"{r}.query", vision.query_num, e), *_linear(f"{r}.kv_proj", e, h, bias=False)]
    for index, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        rows = (index * e, (index + 1) * e)
        tensors += [
            VisionTensor(f"{r}.attn.{proj}.weight", (e, e), f"{r}.attn.in_proj_weight", (3 * e, e), rows),
            VisionTensor(f"{r}.attn.{proj}.bias", (e,), f"{r}.attn.in_proj_bias", (3 * e,), rows),
        ]
    tensors += _linear(f"{r}.attn.out_proj", e, e)
    tensors += _norm(f"{r}.ln_q", e) + _norm(f"{r}.ln_kv", e) + _norm(f"{r}.ln_post", e)
    tensors.append(VisionTensor(f"{r}.proj.weight", (e, e), f"{r}.proj", (e, e), transpose=True))
    return tensors
