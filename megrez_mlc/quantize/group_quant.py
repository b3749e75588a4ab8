"""MLC's symmetric int4 group quantization (`q4f16_1` / `q4f32_1`) in numpy.

Layout of one [N, K] weight (N outputs, K inputs, groups along K):
  q_scale  [N, ceil(K/32)]          float16 or float32, scale = max|w| / 7 over each group of 32 inputs
  q_weight [N, ceil(K/32) * 4]      uint32; input k of a row is nibble k % 8 of word k // 8 (low nibble first)
  stored value q = clip(round(w / scale) + 7, 0, 14); dequantized w = (q - 7) * scale
K is zero-padded to a multiple of 32, so padded inputs store q = 7 (zero).
"""

from __future__ import annotations

import numpy as np

GROUP_SIZE = 32
MAX_INT = 7  # 2**(4-1) - 1: symmetric int4 around the offset 7
NIBBLES_PER_WORD = 8


def padded_k(k: int) -> int:
    return -(-k // GROUP_SIZE) * GROUP_SIZE


def quantized_shapes(n: int, k: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (q_weight, q_scale) for an [n, k] weight."""
    groups = padded_k(k) // GROUP_SIZE
    return (n, groups * GROUP_SIZE // NIBBLES_PER_WORD), (n, groups)


def quantize_int4(weight: np.ndarray, scale_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Quantize an [N, K] float weight; returns (q_weight uint32, q_scale of scale_dtype)."""
    n, k = weight.shape
    w = np.zeros((n, padded_k(k)), dtype=np.float32)
    w[:, :k] = weight
    groups = w.reshape(n, -1, GROUP_SIZE)
    # The stored (rounded) scale is the one used to quantize, so dequantization is exact to half a step.
    scale = (np.abs(groups).max(axis=2) / MAX_INT).astype(scale_dtype)
    scale32 = scale.astype(np.float32)[:, :, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where(scale32 > 0, np.round(groups / scale32), 0.0)
    q = np.clip(steps + MAX_INT, 0, 2 * MAX_INT).astype(np.uint32).reshape(n, -1)
    return pack_int4_nk(q), scale


def pack_int4_nk(q: np.ndarray) -> np.ndarray:
    """Pack [N, K] values in 0..15 (K a multiple of 8) into [N, K/8] uint32, first value in the low nibble."""
    n, k = q.shape
    nibbles = q.astype(np.uint32).reshape(n, k // NIBBLES_PER_WORD, NIBBLES_PER_WORD)
    shifts = np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * 4
    return np.bitwise_or.reduce(nibbles << shifts, axis=2)


def unpack_int4_nk(words: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4_nk: [N, W] uint32 -> [N, 8W] uint8 values in 0..15."""
    shifts = np.arange(NIBBLES_PER_WORD, dtype=np.uint32) * 4
    nibbles = (words[:, :, None] >> shifts) & 0xF
    return nibbles.reshape(words.shape[0], -1).astype(np.uint8)


def dequantize_int4(q_weight: np.ndarray, q_scale: np.ndarray, k: int) -> np.ndarray:
    """Float32 [N, k] weight from its packed form (padding dropped)."""
    q = unpack_int4_nk(q_weight).astype(np.float32) - MAX_INT
    scale = np.repeat(q_scale.astype(np.float32), GROUP_SIZE, axis=1)
    return (q * scale)[:, :k]
