"""2:4 structured-sparse weights: the compressed layouts S8 (int8 values) and S4 (4-bit values), how they are
packed from a pruned float matrix, and unpacked by the numpy twins (kernels/layouts.md has the byte layout).

In 2:4 sparsity every group of 4 consecutive weights along a row keeps at most 2 nonzeros. A block of 64
columns then holds 32 kept values, and its row bytes are an 8-byte mask (bit c: column c of the block is
kept, exactly two bits per group of four) followed by the 32 values in column order, quantized
symmetrically with one f16 scale per block, like Q8_0 and Q4_0 blocks of 32:
  S8  8 + 32 bytes per 64 weights, against 68 for Q8_0 (0.62x); rows as int16, 20 per block. The values
      are stored with the sign bit flipped (v + 128 as a byte): the unsigned operand vpdpbusd takes, with
      pruned lanes filled with 128 (zero) as they are expanded
  S4  8 + 16 bytes per 64 weights, against 36 for Q4_0 (0.72x) and 40 for Q4_1; rows as int32, 6 per
      block. Nibble byte j holds kept value j in its low nibble and kept value j + 16 in its high one,
      the Q4 order.
The row dtypes name the layouts to numba (int16 S8, int32 S4), as uint8/int8/uint32/uint64 name Q4, I8,
Q5 and Q6: the row dots (kernels/rowdot.py, forms in kernels/rowdot24.py) pick their formula by it.

The numba row dots (kernels/rowdot24.py) expand S8 values or compress x by each block's mask in registers
(one vpexpandb or vpcompressb on AVX-512 VBMI2): they read 0.62x/0.72x the bytes of the dense rows, with
no decompressed weights in memory. The kernels' numpy twins (kernels/matvec.py, gemm.py) expand to float
through dequant_numpy and use BLAS.

Why a mask of 64 bits rather than two 2-bit indices per group: both take 4 bits per group, and the mask
is what the expand and compress instructions take, with no unpacking.
"""

import numpy as np

from kernels.dequant import scales_f32_numpy

BLOCK = 64                      # columns per block; 32 kept values
MASK_BYTES = 8
ROW_DTYPES = {"s8": np.int16, "s4": np.int32}
BLOCK_BYTES = {"s8": MASK_BYTES + 32, "s4": MASK_BYTES + 16}


class Sparse24Error(ValueError):
    """A matrix that cannot be packed as 2:4 (shape, or more than two nonzeros in a group of four)."""


def form_of(qs) -> str | None:
    """"s8" or "s4" for a packed 2:4 row array (by dtype), else None."""
    for form, dt in ROW_DTYPES.items():
        if qs.dtype == dt:
            return form
    return None


def mask_24(w, score=None):
    """w (rows, cols) float -> bool (rows, cols): in each group of 4 consecutive columns the 2 with the
    largest score (|w| when score is None), ties to the lower column. Deterministic: a stable sort."""
    rows, cols = w.shape
    if cols % 4:
        raise Sparse24Error(f"2:4 needs columns in groups of 4, got {cols}")
    s = np.abs(w) if score is None else score
    g = s.reshape(rows, cols // 4, 4)
    order = np.argsort(-g, axis=2, kind="stable")
    keep = np.zeros(g.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :, :2], True, axis=2)
    return keep.reshape(rows, cols)


def _kept(w, keep):
    """w (rows, cols) f32 with exactly two of each four kept -> (rows, cols/2) the kept values in column
    order, and the mask bytes (rows, cols/8) uint8 (bit c of byte c // 8)."""
    rows, cols = w.shape
    g = keep.reshape(rows, cols // 4, 4)
    if not np.all(g.sum(axis=2) == 2):
        raise Sparse24Error("2:4 mask must keep exactly two of every four columns")
    vals = w[keep].reshape(rows, cols // 2)
    bits = np.packbits(keep.reshape(rows, cols // 8, 8), axis=2, bitorder="little").reshape(rows, cols // 8)
    return vals.astype(np.float32), bits


def pack(w, keep, form):
    """w (rows, cols) float32 and keep (rows, cols) bool (two of each four, mask_24) -> (qs, d): qs (rows,
    blocks * block bytes) as ROW_DTYPES[form], d (rows, cols/64) uint16 f16 scale bits. The kept values are
    quantized per block of 32 as Q8_0 (int8, d = max|v|/127, stored as v + 128) or Q4_0 (d = v_max/-8, q = v/d + 8 in 0..15)."""
    if form not in ROW_DTYPES:
        raise Sparse24Error(f"unknown 2:4 form {form!r}: one of {sorted(ROW_DTYPES)}")
    rows, cols = w.shape
    if cols % BLOCK:
        raise Sparse24Error(f"2:4 layouts need columns in blocks of {BLOCK}, got {cols}")
    nb = cols // BLOCK
    vals, bits = _kept(np.asarray(w, dtype=np.float32), keep)
    v = vals.reshape(rows, nb, 32)
    if form == "s8":
        amax = np.abs(v).max(axis=2)
        d = (amax / np.float32(127.0)).astype(np.float16)
        inv = np.zeros_like(amax)
        df = d.astype(np.float32)
        np.divide(np.float32(1.0), df, out=inv, where=df > 0)
        q = np.clip(np.rint(v * inv[:, :, None]), -127, 127).astype(np.int8).view(np.uint8) ^ np.uint8(0x80)
    else:
        idx = np.abs(v).argmax(axis=2)
        vmax = np.take_along_axis(v, idx[:, :, None], axis=2)[:, :, 0]
        d = (vmax / np.float32(-8.0)).astype(np.float16)
        df = d.astype(np.float32)
        inv = np.zeros_like(df)
        np.divide(np.float32(1.0), df, out=inv, where=df != 0)
        q = np.clip(np.rint(v * inv[:, :, None]) + 8, 0, 15).astype(np.uint8)
        q = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)
    blocks = np.concatenate([bits.reshape(rows, nb, MASK_BYTES), q], axis=2)
    qs = np.ascontiguousarray(blocks.reshape(rows, -1)).view(ROW_DTYPES[form])
    return qs, d.view(np.uint16)


def dense_bytes_numpy(qs, d):
    """A packed 2:4 weight -> (rows, cols) uint8, the unsigned bytes the prefill GEMM's lane tile reads
    (kernels/lanetile.py): S8 values + 128 as stored (pruned: 128), S4 nibbles (pruned: 8, meaning zero)."""
    form = form_of(qs)
    if form is None:
        raise Sparse24Error(f"not a 2:4 row array: dtype {qs.dtype}")
    rows, nb = d.shape
    raw = qs.view(np.uint8).reshape(rows, nb, BLOCK_BYTES[form])
    keep = np.unpackbits(raw[:, :, :MASK_BYTES], axis=2, bitorder="little").astype(bool)  # (rows, nb, 64)
    if form == "s8":
        vals = raw[:, :, MASK_BYTES:]
        out = np.full((rows, nb, BLOCK), 0x80, dtype=np.uint8)
    else:
        nib = raw[:, :, MASK_BYTES:]
        vals = np.concatenate([nib & 15, nib >> 4], axis=2)
        out = np.full((rows, nb, BLOCK), 8, dtype=np.uint8)
    out[keep] = vals.reshape(-1)
    return out.reshape(rows, nb * BLOCK)


def unpack(qs, d):
    """A packed 2:4 weight -> (rows, cols) float32, zeros where pruned: what the kernels multiply."""
    u = dense_bytes_numpy(qs, d)
    rows, nb = d.shape
    q = (u ^ np.uint8(0x80)).view(np.int8) if form_of(qs) == "s8" else u.astype(np.int8) - np.int8(8)
    return (q.reshape(rows, nb, BLOCK) * scales_f32_numpy(d)[:, :, None]).reshape(rows, nb * BLOCK)


def dequant_numpy(qs, d, m, out):
    """Rows of a 2:4 weight (m (rows, 0)) into out (rows, cols) f32: the dequantize of every other layout."""
    out[:] = unpack(qs, d)
    return out


def row_bytes(form: str, cols: int) -> int:
    """Bytes per row of a packed weight, scales included."""
    return (cols // BLOCK) * (BLOCK_BYTES[form] + 2)
