"""Which MLC parameters the encoders of an Omni checkpoint become, and from which of its tensors.

The names are the checkpoint's own (`vision.vpm.*` for the SigLIP tower, `vision.resampler.*`,
`audio.audio.*` for the Whisper encoder), except where a tensor is reshaped for the graph: the patch
convolution becomes a [hidden, 3*14*14] matrix and the audio convolutions [n_state, in*3] matrices (the
graph multiplies them with each frame's 3-frame window); the resampler's packed
`attn.in_proj_weight`/`in_proj_bias` become `attn.{q,k,v}_proj`; `proj`, which the checkpoint multiplies
as `x @ proj`, is stored transposed as a linear layer's [out, in] weight; and the audio MLP's `mlp.0`/`mlp.2`
(a torch Sequential's indices) are named `mlp.fc1`/`mlp.fc2`.

The encoder weights stay in the scheme's float type under every quantization (see the README for the
measurement behind it): they run over ~1000 patches or 1500 audio frames at a time, which is
compute-bound, so int4 weights would save memory but no time, and would cost accuracy on every media token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import AudioConfig, VisionConfig

TOWER = "vision.vpm"
RESAMPLER = "vision.resampler"
AUDIO = "audio.audio"
# Prefix of the audio encoder's tensors, skipped with one info line when config.json has no audio_config.
AUDIO_PREFIXES = ("audio.",)
# The LLM's tensors in an Omni checkpoint: Megrez-3B's names under this prefix.
LLM_PREFIX = "llm."


@dataclass(frozen=True)
class EncoderTensor:
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


def _same(name: str, *shape: int) -> EncoderTensor:
    return EncoderTensor(name, shape, name, shape)


def _linear(name: str, out_features: int, in_features: int, bias: bool = True) -> list[EncoderTensor]:
    weight = _same(f"{name}.weight", out_features, in_features)
    return [weight, _same(f"{name}.bias", out_features)] if bias else [weight]


def _norm(name: str, width: int) -> list[EncoderTensor]:
    return [_same(f"{name}.weight", width), _same(f"{name}.bias", width)]


def vision_tensors(vision: VisionConfig, llm_hidden: int) -> list[EncoderTensor]:
    """Every vision parameter, in the order compile/vision.py declares them."""
    h, inter, p = vision.hidden_size, vision.intermediate_size, vision.patch_size
    e = llm_hidden
    embeddings = f"{TOWER}.embeddings"
    tensors = [
        EncoderTensor(
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
            EncoderTensor(f"{r}.attn.{proj}.weight", (e, e), f"{r}.attn.in_proj_weight", (3 * e, e), rows),
            EncoderTensor(f"{r}.attn.{proj}.bias", (e,), f"{r}.attn.in_proj_bias", (3 * e,), rows),
        ]
    tensors += _linear(f"{r}.attn.out_proj", e, e)
    tensors += _norm(f"{r}.ln_q", e) + _norm(f"{r}.ln_kv", e) + _norm(f"{r}.ln_post", e)
    tensors.append(EncoderTensor(f"{r}.proj.weight", (e, e), f"{r}.proj", (e, e), transpose=True))
    return tensors


def audio_tensors(audio: AudioConfig) -> list[EncoderTensor]:
    """Every audio parameter, in the order compile/audio.py declares them."""
    w, m = audio.n_state, audio.n_mels
    tensors = []
    for conv, width in (("conv1", m), ("conv2", w)):
        name = f"{AUDIO}.{conv}.weight"
        tensors.append(EncoderTensor(name, (w, width * 3), name, (w, width, 3)))
        tensors.append(_same(f"{AUDIO}.{conv}.bias", w))
    tensors.append(_same(f"{AUDIO}.positional_embedding", audio.n_ctx, w))
    for i in range(audio.n_layer):
        block = f"{AUDIO}.blocks.{i}"
        tensors += _norm(f"{block}.attn_ln", w)
        tensors += _linear(f"{block}.attn.query", w, w) + _linear(f"{block}.attn.key", w, w, bias=False)
        tensors += _linear(f"{block}.attn.value", w, w) + _linear(f"{block}.attn.out", w, w)
        tensors += _norm(f"{block}.mlp_ln", w)
        for mlp, index, (rows, cols) in (("fc1", 0, (4 * w, w)), ("fc2", 2, (w, 4 * w))):
            source = f"{block}.mlp.{index}"
            tensors += [
                EncoderTensor(f"{block}.mlp.{mlp}.weight", (rows, cols), f"{source}.weight", (rows, cols)),
                EncoderTensor(f"{block}.mlp.{mlp}.bias", (rows,), f"{source}.bias", (rows,)),
            ]
    tensors += _norm(f"{AUDIO}.ln_post", w) + _linear(f"{AUDIO}.proj", audio.output_dim, w)
    tensors.append(_same(f"{AUDIO}.audio_bos_eos_token.weight", 2, audio.output_dim))
    return tensors


def encoder_tensors(config) -> list[EncoderTensor]:
    """The encoders' parameters of a ModelConfig (none for Megrez-3B): vision, then audio."""
    tensors = vision_tensors(config.vision, config.hidden_size) if config.vision else []
    return tensors + (audio_tensors(config.audio) if config.audio else [])
