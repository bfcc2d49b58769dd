"""2:4 structured-sparse weights: the compressed layouts S8 (int8 values) and S4 (4-bit values), how they are
packed from a pruned float matrix, and unpacked by the numpy twins (kernels/layouts.md has the byte layout).

In 2:4 sparsity every group of 4 consecutive weights along a row keeps at most 2 nonzeros. A block of 64
columns then holds 32 kept values, quantized symmetrically with one f16 scale per block, like Q8_0 and
Q4_0 blocks of 32, and 8 bytes that say where they sit:
  S8  an 8-byte mask (bit c: column c of the block is kept, exactly two bits per group of four), then
      the 32 values in column order: 40 bytes per 64 weights, against 68 for Q8_0 (0.62x); rows as
      int16, 20 per block. The values are stored with the sign bit flipped (v + 128 as a byte): the
      unsigned operand vpdpbusd takes, with pruned lanes filled with 128 (zero) as they are expanded
  S4  8 bytes of codes (2 bits per kept value, in order: its column within its group of four, so bits
      2r of the little-endian uint64 belong to kept value r), then 16 nibble bytes (byte t: kept value t
      in its low nibble, t + 16 in its high one, the Q4 order): 24 bytes per 64 weights, against 36 for
      Q4_0 (0.72x) and 40 for Q4_1; rows as int32, 6 per block. A row is stored in pairs of blocks (and
      a last single block when their count is odd): the pair's two code words, then its nibble bytes
      in runs of 8, first block's 0..7, second's 0..7, first's 8..15, second's 8..15 (s4_order), so that
      one 16-byte and one 32-byte load give the row dot all of a pair.
The row dtypes name the layouts to numba (int16 S8, int32 S4), as uint8/int8/uint32/uint64 name Q4, I8,
Q5 and Q6: the row dots (kernels/rowdot.py, forms in kernels/rowdot24.py) pick their formula by it.

The numba row dots (kernels/rowdot24.py) put each block back together in registers, with no decompressed
weights in memory: S8 expands its values into the 64 lanes by the mask (vpexpandb, which takes the mask
as it is); S4 gathers the 32 x values a block keeps by their columns (vpermt2b, whose indices the codes
are once their group's base is added). The kernels' numpy twins (kernels/matvec.py, gemm.py) expand to
float through dequant_numpy and use BLAS.
"""

import numpy as np

from kernels.dequant import scales_f32_numpy

LAYOUT = 2                      # the byte layouts' version, in a deploy's plan.json (S4 in pairs of blocks: 2)
BLOCK = 64                      # columns per block; 32 kept values
MASK_BYTES = 8                  # an S8 block's mask, an S4 block's codes
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
    order, the mask bytes (rows, cols/8) uint8 (bit c of byte c // 8) and the code bytes (rows, cols/8)
    uint8 (kept value r's column within its group in bits 2(r % 4) of byte r // 4)."""
    rows, cols = w.shape
    g = keep.reshape(rows, cols // 4, 4)
    if not np.all(g.sum(axis=2) == 2):
        raise Sparse24Error("2:4 mask must keep exactly two of every four columns")
    vals = w[keep].reshape(rows, cols // 2)
    bits = np.packbits(keep.reshape(rows, cols // 8, 8), axis=2, bitorder="little").reshape(rows, cols // 8)
    where = np.nonzero(g)[2].astype(np.uint8).reshape(rows, cols // 8, 4)   # column within the group, per kept value
    codes = (where << np.array([0, 2, 4, 6], dtype=np.uint8)).sum(axis=2, dtype=np.uint8)
    return vals.astype(np.float32), bits, codes


def s4_order(nb: int):
    """(24 * nb,) int: byte i of a stored S4 row is byte s4_order(nb)[i] of the row in block order (each
    block's 8 code bytes, then its 16 nibble bytes): pairs of blocks, the codes of both, then the nibble
    bytes in runs of 8 alternating between the two; a last odd block as it is."""
    size, run = BLOCK_BYTES["s4"], MASK_BYTES          # a run: a code word, or 8 nibble bytes
    order = []
    for a in range(0, size * (nb - nb % 2), 2 * size):
        for start in range(0, size, run):               # run k of the first block, then of the second
            order += [*range(a + start, a + start + run), *range(a + size + start, a + size + start + run)]
    order += range(size * (nb - nb % 2), size * nb)
    return np.array(order, dtype=np.int64)


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
    vals, bits, codes = _kept(np.asarray(w, dtype=np.float32), keep)
    v = vals.reshape(rows, nb, 32)
    if form == "s8":
        amax = np.abs(v).max(axis=2)
        d = (amax / np.float32(127.0)).astype(np.float16)
        inv = np.zeros_like(amax)
        df = d.astype(np.float32)
        np.divide(np.float32(1.0), df, out=inv, where=df > 0)
        q = np.clip(np.rint(v * inv[:, :, None]), -127, 127).astype(np.int8).view(np.uint8) ^ np.uint8(0x80)
        blocks = np.concatenate([bits.reshape(rows, nb, MASK_BYTES), q], axis=2).reshape(rows, -1)
    else:
        idx = np.abs(v).argmax(axis=2)
        vmax = np.take_along_axis(v, idx[:, :, None], axis=2)[:, :, 0]
        d = (vmax / np.float32(-8.0)).astype(np.float16)
        df = d.astype(np.float32)
        inv = np.zeros_like(df)
        np.divide(np.float32(1.0), df, out=inv, where=df != 0)
        q = np.clip(np.rint(v * inv[:, :, None]) + 8, 0, 15).astype(np.uint8)
        q = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)
        blocks = np.concatenate([codes.reshape(rows, nb, MASK_BYTES), q], axis=2).reshape(rows, -1)
        blocks = blocks[:, s4_order(nb)]
    qs = np.ascontiguousarray(blocks).view(ROW_DTYPES[form])
    return qs, d.view(np.uint16)


def dense_bytes_numpy(qs, d):
    """A packed 2:4 weight -> (rows, cols) uint8, the unsigned bytes the prefill GEMM's lane tile reads
    (kernels/lanetile.py): S8 values + 128 as stored (pruned: 128), S4 nibbles (pruned: 8, meaning zero)."""
    form = form_of(qs)
    if form is None:
        raise Sparse24Error(f"not a 2:4 row array: dtype {qs.dtype}")
    rows, nb = d.shape
    raw = qs.view(np.uint8).reshape(rows, -1)
    if form == "s8":
        raw = raw.reshape(rows, nb, BLOCK_BYTES[form])
        keep = np.unpackbits(raw[:, :, :MASK_BYTES], axis=2, bitorder="little").astype(bool)  # (rows, nb, 64)
        out = np.full((rows, nb, BLOCK), 0x80, dtype=np.uint8)
        out[keep] = raw[:, :, MASK_BYTES:].reshape(-1)
        return out.reshape(rows, nb * BLOCK)
    blocks = np.empty_like(raw)
    blocks[:, s4_order(nb)] = raw
    blocks = blocks.reshape(rows, nb, BLOCK_BYTES[form])
    crumbs = np.unpackbits(blocks[:, :, :MASK_BYTES], axis=2, bitorder="little").reshape(rows, nb, 32, 2)
    column = 4 * (np.arange(32) // 2) + crumbs[..., 0] + 2 * crumbs[..., 1]        # (rows, nb, 32) kept columns
    nib = blocks[:, :, MASK_BYTES:]
    out = np.full((rows, nb, BLOCK), 8, dtype=np.uint8)
    np.put_along_axis(out, column, np.concatenate([nib & 15, nib >> 4], axis=2), axis=2)
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
