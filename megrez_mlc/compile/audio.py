"""Megrez-3B-Omni's audio encoder as a graph, behind `audio_embed`.

`audio_embed(mel [encoder_frames, 2, n_mels])` encodes one clip of at most 30 seconds (the host computes its
log-mel frames, time-major, in pairs: omni/audio.py) into `encoder_frames // 2 + 2` embeddings of the LLM's
width: the learned begin embedding, one per pair of encoder frames, the learned end embedding. The runtime
writes them over the clip's placeholder. The frames come in pairs so that every shape in the graph is the
symbolic `encoder_frames` or a multiple of it: DLight's GPU GEMM schedule cannot size its tiles for a row
count like `(frames - 1) // 2 + 1`. For the same reason the pooled rows stay in an `encoder_frames`-row
tensor (its second half zero) through `ln_post` and `proj`, and only the output drops the unused rows.
Parameter names are the checkpoint's (omni/weights.py lists the same ones in the same order). The
convolutions are matrix products over each output frame's 3-frame window, so they reuse the GEMM schedules
of every target.
"""

from __future__ import annotations

import math

from tvm import te, tirx
from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from ..omni.config import AUDIO_LAYER_NORM_EPS, AudioConfig
from . import ops
from .layers import compiling_for_cpu
from .vision import FloatLinear, LayerNorm, attention

CONV_KERNEL = 3

# erf by Abramowitz & Stegun 7.1.26 (absolute error below 1.5e-7, float32's own rounding at 1): WGSL has no
# erf, and libm's is a scalar call per element on CPUs.
_ERF_P = 0.3275911
_ERF_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


def gelu_erf(x: te.Tensor, cpu: bool) -> te.Tensor:
    """x / 2 (1 + erf(x / sqrt 2)), torch's exact GELU."""

    def value(*idx):
        v = x[idx].astype("float32")
        z = tirx.abs(v) * tirx.const(1 / math.sqrt(2), "float32")
        t = tirx.const(1.0, "float32") / (tirx.const(1.0, "float32") + tirx.const(_ERF_P, "float32") * z)
        poly = tirx.const(_ERF_A[-1], "float32")
        for a in reversed(_ERF_A[:-1]):
            poly = poly * t + tirx.const(a, "float32")
        if cpu:
            gauss = ops.fast_exp2(tirx.max(-z * z * tirx.const(ops.LOG2_E, "float32"), -126.0))
        else:
            gauss = tirx.exp(-z * z)
        erf_abs = tirx.const(1.0, "float32") - poly * t * gauss
        erf = tirx.Select(v < tirx.const(0.0, "float32"), -erf_abs, erf_abs)
        return (0.5 * v * (1.0 + erf)).astype(x.dtype)

    return te.compute(x.shape, value, name="gelu_erf")


def conv_windows(x: te.Tensor, stride: int, out_frames: tirx.PrimExpr) -> te.Tensor:
    """[frames, channels] -> [out_frames, channels * 3]: column c*3+k holds x[t*stride + k - 1, c] (zero
    outside the clip), the layout of a Conv1d weight [out, channels, 3] read as a matrix."""
    frames, channels = x.shape

    def value(t, j):
        src = t * stride + j % CONV_KERNEL - 1
        inside = tirx.all(src >= 0, src < frames)
        row = tirx.max(tirx.min(src, frames - 1), 0)
        return tirx.if_then_else(inside, x[row, j // CONV_KERNEL], tirx.const(0, x.dtype))

    return te.compute((out_frames, channels * CONV_KERNEL), value, name="conv_windows")


def _gelu(x: Tensor) -> Tensor:
    cpu = compiling_for_cpu()
    return op.tensor_expr_op(lambda t: gelu_erf(t, cpu), "gelu_erf", [x])


class Conv(FloatLinear):
    """Conv1d(kernel 3, padding 1) over x [frames, channels]: windows @ weight^T + bias, [1, frames', out]."""

    def __init__(self, channels: int, width: int, stride: int) -> None:
        super().__init__(channels * CONV_KERNEL, width, bias=True)
        self.stride = stride

    def forward(self, x: Tensor, out_frames: tirx.PrimExpr) -> Tensor:
        windows = op.tensor_expr_op(lambda t: conv_windows(t, self.stride, out_frames), "conv_windows", [x])
        return super().forward(op.reshape(windows, (1, *windows.shape)))


class AudioAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        self.heads = heads
        self.query = FloatLinear(width, width, bias=True)
        self.key = FloatLinear(width, width)  # Whisper's keys have no bias
        self.value = FloatLinear(width, width, bias=True)
        self.out = FloatLinear(width, width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(attention(self.query(x), self.key(x), self.value(x), self.heads))


class AudioMLP(nn.Module):
    def __init__(self, width: int) -> None:
        self.fc1 = FloatLinear(width, 4 * width, bias=True)
        self.fc2 = FloatLinear(4 * width, width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(_gelu(self.fc1(x)))


class AudioBlock(nn.Module):
    def __init__(self, config: AudioConfig) -> None:
        self.attn_ln = LayerNorm(config.n_state, AUDIO_LAYER_NORM_EPS)
        self.attn = AudioAttention(config.n_state, config.n_head)
        self.mlp_ln = LayerNorm(config.n_state, AUDIO_LAYER_NORM_EPS)
        self.mlp = AudioMLP(config.n_state)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


def _first_rows(table: te.Tensor, like: te.Tensor) -> te.Tensor:
    return te.compute(like.shape[1:], lambda t, c: table[t, c], name="first_rows")


def _average_pairs(x: te.Tensor) -> te.Tensor:
    """AvgPool1d(2) over the frames of x [1, frames, width], in rows [0, frames // 2) of a tensor as tall as
    x (the rest zero)."""
    frames = x.shape[1]

    def value(b, t, c):
        pair = x[b, tirx.min(2 * t, frames - 1), c] + x[b, tirx.min(2 * t + 1, frames - 1), c]
        pair = pair * tirx.const(0.5, x.dtype)
        return tirx.if_then_else(t < frames // 2, pair, tirx.const(0, x.dtype))

    return te.compute(x.shape, value, name="average_pairs")


def _between(begin_end: te.Tensor, x: te.Tensor) -> te.Tensor:
    """[begin; the first frames // 2 rows of x; end] for x [1, frames, width], begin_end [2, width]."""
    _, frames, width = x.shape
    n = frames // 2

    def value(t, c):
        inner = x[0, tirx.max(tirx.min(t - 1, n - 1), 0), c]
        return tirx.Select(t == 0, begin_end[0, c], tirx.Select(t == n + 1, begin_end[1, c], inner))

    return te.compute((n + 2, width), value, name="between")


class WhisperEncoder(nn.Module):
    def __init__(self, config: AudioConfig) -> None:
        self.conv1 = Conv(config.n_mels, config.n_state, stride=1)
        self.conv2 = Conv(config.n_state, config.n_state, stride=2)
        self.positional_embedding = nn.Parameter((config.n_ctx, config.n_state))
        self.blocks = nn.ModuleList([AudioBlock(config) for _ in range(config.n_layer)])
        self.ln_post = LayerNorm(config.n_state, AUDIO_LAYER_NORM_EPS)
        self.proj = FloatLinear(config.n_state, config.output_dim, bias=True)
        self.audio_bos_eos_token = nn.Module()
        self.audio_bos_eos_token.weight = nn.Parameter((2, config.output_dim))

    def forward(self, mel: Tensor) -> Tensor:
        encoder_frames, _, n_mels = mel.shape
        x = _gelu(self.conv1(op.reshape(mel, (2 * encoder_frames, n_mels)), 2 * encoder_frames))
        x = _gelu(self.conv2(op.reshape(x, x.shape[1:]), encoder_frames))
        x = x + op.tensor_expr_op(_first_rows, "positions", [self.positional_embedding, x])
        for block in self.blocks:
            x = block(x)
        x = self.proj(self.ln_post(op.tensor_expr_op(_average_pairs, "average_pairs", [x])))
        return op.tensor_expr_op(_between, "between", [self.audio_bos_eos_token.weight, x])


class OmniAudio(nn.Module):
    def __init__(self, config: AudioConfig) -> None:
        self.audio = WhisperEncoder(config)

    def forward(self, mel: Tensor) -> Tensor:
        return self.audio(mel)
