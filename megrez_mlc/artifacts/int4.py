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
    if padded_k(k) == k:
        w = np.asarray(weight, dtype=np.float32)
    else:
        w = np.zeros((n, padded_k(k)), dtype=np.float32)
        w[:, :k] = weight
    groups = w.reshape(n, -1, GROUP_SIZE)
    # The stored (rounded) scale is the one used to quantize, so dequantization is exact to half a step.
    scale = (np.abs(groups).max(axis=2) / MAX_INT).astype(scale_dtype)
    # A group whose scale is 0 holds only values too small for the scale type: dividing them by 1 rounds
    # them to 0 all the same, without a division by zero.
    divisor = scale.astype(np.float32)
    divisor[divisor == 0] = 1
    steps = groups / divisor[:, :, None]  # the one full-size temporary; the rest works in place
    np.rint(steps, out=steps)
    steps += MAX_INT
    np.clip(steps, 0, 2 * MAX_INT, out=steps)
    return pack_int4_nk(steps.reshape(n, -1).astype(np.uint8)), scale


def pack_int4_nk(q: np.ndarray) -> np.ndarray:
    """Pack [N, K] values in 0..15 (K a multiple of 8) into [N, K/8] uint32, first value in the low nibble."""
    n, k = q.shape
    pairs = q.astype(np.uint8).reshape(n, k // 2, 2)
    # Two values per byte, the first in the low nibble; four such bytes read as a little-endian uint32 put
    # value j of the word at bits 4*j. Byte arithmetic is several times faster than shifting uint32 words.
    packed = pairs[:, :, 0] | (pairs[:, :, 1] << 4)
    return packed.view("<u4")


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
