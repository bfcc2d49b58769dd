"""Dequantize a block of rows to float32: for batched prefill (tiles fed to BLAS) and embedding lookups.

Each takes the layout's arrays for the wanted rows (already sliced) and writes out (rows, cols) float32.
"""

import numpy as np

from kernels.backend import NUMBA, jit, pick
from kernels.convert import F16_TO_F32

if NUMBA:
    from numba import prange


def dequant_f16_numpy(bits, out):
    """bits (rows, cols) uint16 -> out (rows, cols) f32."""
    out[:] = bits.view(np.float16)
    return out


def dequant_bf16_numpy(bits, out):
    """bits (rows, cols) uint16 -> out (rows, cols) f32."""
    out.view(np.uint32)[:] = bits.astype(np.uint32) << 16
    return out


def dequant_q4_numpy(qs, d, m, out):
    """qs (rows, cols/2) uint8, d and m (rows, cols/32) f32 -> out (rows, cols) f32."""
    rows = qs.shape[0]
    blocks = out.reshape(rows, -1, 2, 16)          # (rows, blocks, lo/hi, 16)
    q = qs.reshape(rows, -1, 16)
    blocks[:, :, 0] = q & 15
    blocks[:, :, 1] = q >> 4
    flat = out.reshape(rows, -1, 32)
    flat *= d[:, :, None]
    flat += m[:, :, None]
    return out


def dequant_i8_numpy(q, d, m, out):
    """q (rows, cols) int8, d (rows, cols/B) f32, m (rows, cols/B) or (rows, 0) f32 -> out (rows, cols) f32."""
    rows, cols = q.shape
    block = cols // d.shape[1]
    blocks = out.reshape(rows, -1, block)
    blocks[:] = q.reshape(rows, -1, block)
    blocks *= d[:, :, None]
    if m.shape[1]:
        blocks += m[:, :, None]
    return out


@jit(parallel=True)
def _dequant_f16_numba(bits, out):
    rows, cols = bits.shape
    for r in prange(rows):
        for k in range(cols):
            out[r, k] = F16_TO_F32[bits[r, k]]
    return out


@jit(parallel=True)
def _dequant_bf16_numba(bits, out):
    rows, cols = bits.shape
    o = out.view(np.uint32)
    for r in prange(rows):
        for k in range(cols):
            o[r, k] = np.uint32(bits[r, k]) << 16
    return out


@jit(parallel=True)
def _dequant_q4_numba(qs, d, m, out):
    rows, half = qs.shape
    for r in prange(rows):
        row = qs[r]
        o = out[r]
        for k in range(half):
            b = k >> 4
            j = k & 15
            q = row[k]
            o[b * 32 + j] = d[r, b] * np.float32(q & 15) + m[r, b]
            o[b * 32 + 16 + j] = d[r, b] * np.float32(q >> 4) + m[r, b]
    return out


@jit(parallel=True)
def _dequant_i8_numba(q, d, m, out):
    rows, cols = q.shape
    block = cols // d.shape[1]
    has_min = m.shape[1] > 0
    for r in prange(rows):
        for k in range(cols):
            v = d[r, k // block] * np.float32(q[r, k])
            if has_min:
                v += m[r, k // block]
            out[r, k] = v
    return out


dequant_f16 = pick(_dequant_f16_numba, dequant_f16_numpy)
dequant_bf16 = pick(_dequant_bf16_numba, dequant_bf16_numpy)
dequant_q4 = pick(_dequant_q4_numba, dequant_q4_numpy)
dequant_i8 = pick(_dequant_i8_numba, dequant_i8_numpy)
