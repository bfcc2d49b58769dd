"""Matrix-vector products for one token (decode): out (rows,) = W (rows, cols) @ x (cols,).

One function per weight layout (kernels/layouts.md). Each numba kernel has a numpy twin named *_numpy
with the same signature; `matvec_*` is whichever backend.py picked. All write into `out` and return it.
"""

import numpy as np

from kernels.backend import NUMBA, jit, pick
from kernels.convert import F16_TO_F32

if NUMBA:
    from numba import prange


# ---------------------------------------------------------------- F32: BLAS already runs at bandwidth

def matvec_f32(w, x, out):
    """w (rows, cols) float32, x (cols,) float32 -> out (rows,) float32."""
    np.dot(w, x, out=out)
    return out


# ---------------------------------------------------------------- F16 / BF16 (uint16 bit patterns)

def matvec_f16_numpy(bits, x, out):
    """bits (rows, cols) uint16 IEEE-half patterns, x (cols,) f32 -> out (rows,) f32."""
    np.dot(bits.view(np.float16).astype(np.float32), x, out=out)
    return out


def matvec_bf16_numpy(bits, x, out):
    """bits (rows, cols) uint16 bfloat16 patterns, x (cols,) f32 -> out (rows,) f32."""
    w = (bits.astype(np.uint32) << 16).view(np.float32)
    np.dot(w, x, out=out)
    return out


@jit(parallel=True)
def _matvec_f16_numba(bits, x, out):
    rows, cols = bits.shape
    table = F16_TO_F32
    for r in prange(rows):
        row = bits[r]
        acc = np.float32(0.0)
        for k in range(cols):
            acc += table[row[k]] * x[k]
        out[r] = acc
    return out


@jit(parallel=True)
def _matvec_bf16_numba(bits, x, out):
    rows, cols = bits.shape
    for r in prange(rows):
        # A bf16 is the top half of a float32: widen each row into scratch, then a vectorizable dot.
        w = np.empty(cols, dtype=np.uint32)
        row = bits[r]
        for k in range(cols):
            w[k] = np.uint32(row[k]) << 16
        wf = w.view(np.float32)
        acc = np.float32(0.0)
        for k in range(cols):
            acc += wf[k] * x[k]
        out[r] = acc
    return out


# ---------------------------------------------------------------- Q4: 4-bit nibbles, block-32 scale and min

def _block_sums(x, block):
    return x.reshape(-1, block).sum(axis=1, dtype=np.float32)


def matvec_q4_numpy(qs, d, m, x, out):
    """qs (rows, cols/2) uint8, d and m (rows, cols/32) f32, x (cols,) f32 -> out (rows,) f32."""
    rows, half = qs.shape
    xb = x.reshape(-1, 2, 16)                      # (blocks, lo/hi half, 16)
    lo = (qs & 15).reshape(rows, -1, 16).astype(np.float32)
    hi = (qs >> 4).reshape(rows, -1, 16).astype(np.float32)
    per_block = np.einsum("rbj,bj->rb", lo, xb[:, 0]) + np.einsum("rbj,bj->rb", hi, xb[:, 1])
    out[:] = (per_block * d).sum(axis=1) + m @ _block_sums(x, 32)
    return out


@jit(parallel=True)
def _matvec_q4_numba(qs, d, m, x, out):
    rows, half = qs.shape
    nb = d.shape[1]
    # Split x per block into the halves that pair with low and high nibbles, so the inner loop is one
    # long unit-stride walk that LLVM vectorizes (DESIGN.md).
    xlo = np.empty(half, dtype=np.float32)
    xhi = np.empty(half, dtype=np.float32)
    xsum = np.zeros(nb, dtype=np.float32)
    for b in range(nb):
        for j in range(16):
            xlo[b * 16 + j] = x[b * 32 + j]
            xhi[b * 16 + j] = x[b * 32 + 16 + j]
            xsum[b] += x[b * 32 + j] + x[b * 32 + 16 + j]
    for r in prange(rows):
        row = qs[r]
        dr = d[r]
        acc = np.float32(0.0)
        for k in range(half):
            # Nibbles as int32: numba computes q & 15 in int64, and int64->float32 vector conversion
            # needs AVX-512DQ (scalar code elsewhere); int32->float32 is one instruction on AVX2/NEON.
            q = np.int32(row[k])
            acc += dr[k >> 4] * (np.float32(np.int32(q & 15)) * xlo[k] + np.float32(np.int32(q >> 4)) * xhi[k])
        mr = m[r]
        for b in range(nb):
            acc += mr[b] * xsum[b]
        out[r] = acc
    return out


# ---------------------------------------------------------------- I8: int8 values, block-B scale, optional min

def matvec_i8_numpy(q, d, m, x, out):
    """q (rows, cols) int8, d (rows, cols/B) f32, m (rows, cols/B) or (rows, 0) f32 -> out (rows,) f32."""
    rows, cols = q.shape
    block = cols // d.shape[1]
    xb = x.reshape(-1, block)
    per_block = np.einsum("rbj,bj->rb", q.reshape(rows, -1, block).astype(np.float32), xb)
    out[:] = (per_block * d).sum(axis=1)
    if m.shape[1]:
        out += m @ _block_sums(x, block)
    return out


@jit(parallel=True)
def _matvec_i8_numba(q, d, m, x, out):
    rows, cols = q.shape
    nb = d.shape[1]
    block = cols // nb
    has_min = m.shape[1] > 0
    xsum = np.zeros(nb, dtype=np.float32)
    if has_min:
        for k in range(cols):
            xsum[k // block] += x[k]
    for r in prange(rows):
        row = q[r]
        dr = d[r]
        acc = np.float32(0.0)
        # The scale index must be a shift by a constant: with a run-time shift LLVM gathers d[...]
        # per element and the loop runs ~6x slower.
        if block == 32:
            for k in range(cols):
                acc += dr[k >> 5] * (np.float32(row[k]) * x[k])
        elif block == 16:
            for k in range(cols):
                acc += dr[k >> 4] * (np.float32(row[k]) * x[k])
        else:
            for k in range(cols):
                acc += dr[k // block] * (np.float32(row[k]) * x[k])
        if has_min:
            mr = m[r]
            for b in range(nb):
                acc += mr[b] * xsum[b]
        out[r] = acc
    return out


matvec_f16 = pick(_matvec_f16_numba, matvec_f16_numpy)
matvec_bf16 = pick(_matvec_bf16_numba, matvec_bf16_numpy)
matvec_q4 = pick(_matvec_q4_numba, matvec_q4_numpy)
matvec_i8 = pick(_matvec_i8_numba, matvec_i8_numpy)
