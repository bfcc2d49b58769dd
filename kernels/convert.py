"""Half-precision helpers shared by kernels. numba has no float16 arrays, so halves travel as uint16."""

import numpy as np

# (65536,) float32: the value of every IEEE half bit pattern. 256 KiB, built once; a table lookup is
# exact for subnormals, infinities and NaNs alike, where bit tricks need special cases.
F16_TO_F32 = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)


def f16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 IEEE-half patterns (any shape) -> float32 of the same shape."""
    return bits.view(np.float16).astype(np.float32)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 patterns (any shape) -> float32: a bfloat16 is the top half of a float32."""
    return (bits.astype(np.uint32) << 16).view(np.float32)
