"""Whole-array half-precision conversions for load time (norm weights, biases). The numba kernels
convert in registers instead (kernels/dequant.py); numba has no float16 arrays, so halves travel as uint16."""

import numpy as np


def f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 IEEE-half patterns (any shape) -> float32 of the same shape."""
    return bits.view(np.float16).astype(np.float32)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 patterns (any shape) -> float32: a bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
