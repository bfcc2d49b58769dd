"""Matrix-vector products for one token (decode): out (rows,) = W (rows, cols) @ x (cols,).

One function per weight layout (kernels/layouts.md). Each numba kernel has a numpy twin named *_numpy
with the same signature; `matvec_*` is whichever backend.py picked. All write into `out` and return it.

How the numba kernels are written (tools/bench_kernels.py measures them; DESIGN.md has the background):
- one `prange` launch per call, over rows, each row one long unit-stride loop over 1-D views;
- block scales are looked up as `d[k >> 5]` / `d[k >> 4]`: a shift by a constant lets LLVM broadcast
  one scale per vector (a run-time shift or division makes it gather per element, several times
  slower); the min term sum_b m[r,b] * sum(x in block b) is added per row from block sums of x made
  once per call;
- integer -> float32 conversions go through int32 (int64 -> float32 vector conversion needs
  AVX-512DQ); 16-bit floats convert in registers (dequant.f16_to_f32 / bf16_to_f32: no table
  gathers, no scratch);
- wide rows (cols > WIDE_COLS) are walked 4 at a time, so that each load of x serves 4 rows: one row
  at a time reads 4 bytes of x per int8 weight (8 per byte of nibbles), and once x no longer stays in
  L1 next to the weight stream that traffic, not DRAM, is the limit. Narrower rows stay one at a
  time: 4 interleaved streams are served worse by the hardware prefetchers;
- Q4, Q5 and 32-block I8 multiply x rounded to int8 per block (kernels/intdot.py) with integer SIMD, four
  blocks per step (kernels/rowdot.py): a float loop over nibbles is compute-bound, well below what
  memory delivers.
Left out, for no gain here: software prefetch of the next rows, 2-row groups, 4-row groups for narrow
rows, and building nibble floats from bits (1 + q/16) instead of int->float conversion.
"""

import numpy as np

from kernels import dequant, intdot, rowdot, sparse24
from kernels.dequant import scales_f32_numpy
from kernels.backend import NUMBA, jit, pick
from kernels.neuron_records import check_weight_rows

if NUMBA:
    from numba import prange

    from kernels.dequant import bf16_to_f32, f16_to_f32, scale_f32

# The numpy twins dequantize this many elements at a time (1 MiB of float32, reused) and hand each
# chunk of rows to BLAS: a whole 7B FFN matrix in float32 would be ~180 MB per call (phones).
CHUNK_ELEMS = 1 << 18

GROUP = 4           # rows walked together when x is wide (the loops below are written for exactly 4)
WIDE_COLS = 8192    # x of 32 KiB: the crossover lies between 5632 (rows one by one win) and 11008 columns


def _chunked(dequant_fn, arrays, cols, x, out):
    """out[r0:r1] = dequant_fn(rows r0:r1 of arrays) @ x, a chunk of rows at a time."""
    rows = out.shape[0]
    step = max(1, min(rows, CHUNK_ELEMS // cols))
    w = np.empty((step, cols), dtype=np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wc = dequant_fn(*[a[r0:r1] for a in arrays], w[: r1 - r0])
        np.dot(wc, x, out=out[r0:r1])
    return out


@jit()
def _group(cols):
    """Rows per prange iteration."""
    return GROUP if cols > WIDE_COLS else 1


# ---------------------------------------------------------------- F32: BLAS already runs at bandwidth

def matvec_f32(w, x, out):
    """w (rows, cols) float32, x (cols,) float32 -> out (rows,) float32."""
    np.dot(w, x, out=out)
    return out


# ---------------------------------------------------------------- F16 / BF16 (uint16 bit patterns)

def matvec_f16_numpy(bits, x, out):
    """bits (rows, cols) uint16 IEEE-half patterns, x (cols,) f32 -> out (rows,) f32."""
    return _chunked(dequant.dequant_f16_numpy, (bits,), bits.shape[1], x, out)


def matvec_bf16_numpy(bits, x, out):
    """bits (rows, cols) uint16 bfloat16 patterns, x (cols,) f32 -> out (rows,) f32."""
    return _chunked(dequant.dequant_bf16_numpy, (bits,), bits.shape[1], x, out)


@jit(parallel=True)
def _matvec_f16_numba(bits, x, out):
    rows, cols = bits.shape
    G = _group(cols)
    for g in prange((rows + G - 1) // G):
        r = g * G
        if G == GROUP and r + GROUP <= rows:
            w0, w1, w2, w3 = bits[r], bits[r + 1], bits[r + 2], bits[r + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(cols):
                xk = x[k]
                a0 += f16_to_f32(w0[k]) * xk
                a1 += f16_to_f32(w1[k]) * xk
                a2 += f16_to_f32(w2[k]) * xk
                a3 += f16_to_f32(w3[k]) * xk
            out[r], out[r + 1], out[r + 2], out[r + 3] = a0, a1, a2, a3
        else:
            for r in range(g * G, min(rows, g * G + G)):
                row = bits[r]
                acc = np.float32(0.0)
                for k in range(cols):
                    acc += f16_to_f32(row[k]) * x[k]
                out[r] = acc
    return out


@jit(parallel=True)
def _matvec_bf16_numba(bits, x, out):
    rows, cols = bits.shape
    G = _group(cols)
    for g in prange((rows + G - 1) // G):
        r = g * G
        if G == GROUP and r + GROUP <= rows:
            w0, w1, w2, w3 = bits[r], bits[r + 1], bits[r + 2], bits[r + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(cols):
                xk = x[k]
                a0 += bf16_to_f32(w0[k]) * xk
                a1 += bf16_to_f32(w1[k]) * xk
                a2 += bf16_to_f32(w2[k]) * xk
                a3 += bf16_to_f32(w3[k]) * xk
            out[r], out[r + 1], out[r + 2], out[r + 3] = a0, a1, a2, a3
        else:
            for r in range(g * G, min(rows, g * G + G)):
                row = bits[r]
                acc = np.float32(0.0)
                for k in range(cols):
                    acc += bf16_to_f32(row[k]) * x[k]
                out[r] = acc
    return out


# ---------------------------------------------------------------- Q4: 4-bit nibbles, block-32 scale and min

def _q4_scaled_numpy(qs, d, out):
    """out (rows, cols) = d * q for the rows given (the min term is added after the dot product)."""
    rows = qs.shape[0]
    q = qs.reshape(rows, -1, 16)
    blocks = out.reshape(rows, -1, 2, 16)          # (rows, blocks, lo/hi, 16)
    np.bitwise_and(q, 15, out=blocks[:, :, 0], casting="unsafe")
    np.right_shift(q, 4, out=blocks[:, :, 1], casting="unsafe")
    out.reshape(rows, -1, 32)[:] *= scales_f32_numpy(d)[:, :, None]
    return out


def _block_sums(x, block):
    return x.reshape(-1, block).sum(axis=1, dtype=np.float32)


def matvec_q4_numpy(qs, d, m, x, out):
    """qs (rows, cols/2) uint8, d (rows, cols/32) and m (rows, cols/32 or 0) f32 or f16 bits, x (cols,) f32
    -> out (rows,) f32. An empty m means value = d*(q-8) (Q4_0): the min is then -8*d.
    Like the numba kernel, it multiplies x rounded to int8 per block (kernels/intdot.py), min part too."""
    cols = qs.shape[1] * 2
    xq = np.empty(cols, dtype=np.int8)
    dx = np.empty(cols // 32, dtype=np.float32)
    intdot.quantize_q8_numpy(x, xq, dx)
    xr = (xq.reshape(-1, 32) * dx[:, None]).reshape(-1)          # (cols,) f32: x as the kernel sees it
    _chunked(_q4_scaled_numpy, (qs, d), cols, xr, out)
    dm = scales_f32_numpy(m) if m.shape[1] else scales_f32_numpy(d) * np.float32(-8.0)
    out += dm @ _block_sums(xr, 32)
    return out


def matvec_q5_numpy(qs, d, m, x, out):
    """qs (rows, 5*cols/32) uint32 (the Q5 layout), d (rows, cols/32) and m (rows, cols/32 or 0) f32 or
    f16 bits, x (cols,) f32 -> out (rows,) f32. An empty m means value = d*(q-16) (Q5_0). Like the numba
    kernel, it multiplies x rounded to int8 per block, min part too."""
    cols = 32 * d.shape[1]
    xr = _int8_rounded(x)
    _chunked(dequant.dequant_q5_numpy, (qs, d, m), cols, xr, out)
    return out


def matvec_q6_numpy(qs, d, m, x, out):
    """qs (rows, 3*cols/32) uint64 (the Q6 layout), d (rows, cols/32) uint32 (two f16 scales per block), m
    (rows, 0), x (cols,) f32 -> out (rows,) f32: value = the element's scale * (q - 32). Like the numba
    kernel, it multiplies x rounded to int8 per block."""
    cols = 32 * d.shape[1]
    _chunked(dequant.dequant_q6_numpy, (qs, d, m), cols, _int8_rounded(x), out)
    return out


@jit(parallel=True)
def _matvec_q4_numba(qs, d, m, x, out):
    """x rounded once per call as kernels/rowdot.py's row dots read it, then one row dot per row: the Q4
    layout (qs uint8), the Q5 layout (qs uint32), the Q6 layout (qs uint64) or a 2:4 layout (qs int16 or
    int32, kernels/sparse24.py), by qs's dtype. qs, d, m with contiguous rows (the weights' own arrays, or
    neuron-record fields: kernels/neuron_records.py; the row dots walk raw rows). The buffers are sized by
    x, not by d: a 2:4 scale covers 64 columns."""
    check_weight_rows(qs, d, m)
    rows = qs.shape[0]
    cols = x.shape[0]
    xq = np.empty(cols, dtype=np.int8)           # (cols,) x rounded per block of 32
    xp = np.empty(cols, dtype=np.int8)           # (cols,) the same in rowdot's step order
    dx = np.empty(cols // 32, dtype=np.float32)  # (cols/32,) its block scales
    xc = np.empty(cols // 4, dtype=np.int32)     # (cols/4,) its lane corrections (round_x makes them; Q4/Q5 rows skip them)
    xsum = np.empty(cols // 32, dtype=np.float32)    # (cols/32,) its block sums, for the min term
    rowdot.round_x(x, xq, xp, xc, dx, xsum)
    ahead = rowdot.rows_ahead(qs.shape[1] * qs.itemsize)
    for r in prange(rows):
        out[r] = rowdot.row_ahead(qs, d, m, r, ahead, xq, xp, xc, dx, xsum)
    return out


def matvec_s24_numpy(qs, d, m, x, out):
    """qs (rows, 20*cols/64) int16 (S8) or (rows, 6*cols/64) int32 (S4), d (rows, cols/64) f16 bits, m (rows,
    0) (kernels/sparse24.py), x (cols,) f32 -> out (rows,) f32, multiplying x rounded to int8 per block of 32
    as the numba row dots do."""
    return _chunked(sparse24.dequant_numpy, (qs, d, m), x.shape[0], _int8_rounded(x), out)


# ---------------------------------------------------------------- I8: int8 values, block-B scale, optional min

def _i8_scaled_numpy(q, d, out):
    rows, cols = q.shape
    blocks = out.reshape(rows, d.shape[1], -1)
    blocks[:] = q.reshape(blocks.shape)
    blocks *= scales_f32_numpy(d)[:, :, None]
    return out


def _int8_rounded(x):
    """x (cols,) f32 as the integer kernels see it: rounded to int8 per block of 32 (kernels/intdot.py)."""
    xq = np.empty(x.shape[0], dtype=np.int8)
    dx = np.empty(x.shape[0] // 32, dtype=np.float32)
    intdot.quantize_q8_numpy(x, xq, dx)
    return (xq.reshape(-1, 32) * dx[:, None]).reshape(-1)


def matvec_i8_numpy(q, d, m, x, out):
    """q (rows, cols) int8, d (rows, cols/B) and m (rows, cols/B or 0) f32 or f16 bits, x (cols,) f32
    -> out (rows,) f32. With B = 32 (Q8_0, Q5_*), like the numba kernel, it multiplies x rounded to int8
    per block."""
    xr = _int8_rounded(x) if q.shape[1] == 32 * d.shape[1] else x
    _chunked(_i8_scaled_numpy, (q, d), q.shape[1], xr, out)
    if m.shape[1]:
        out += scales_f32_numpy(m) @ _block_sums(xr, q.shape[1] // m.shape[1])
    return out


@jit(inline=True)
def i8_row_f32(row, dr, x, block):
    """One I8 row times float x, without its min term: block sizes other than 32 (Q6_K's 16). The scale
    index must be a shift by a constant to vectorize, so B = 16 has its own loop."""
    acc = np.float32(0.0)
    if block == 16:
        for k in range(row.shape[0]):
            acc += scale_f32(dr[k >> 4]) * (np.float32(row[k]) * x[k])
    else:
        for k in range(row.shape[0]):
            acc += scale_f32(dr[k // block]) * (np.float32(row[k]) * x[k])
    return acc


@jit(parallel=True)
def _matvec_i8x32_numba(q, d, m, x, out):
    """Blocks of 32 with x rounded to int8 per block: kernels/rowdot.py's row dots; rows contiguous, as
    _matvec_q4_numba's."""
    check_weight_rows(q, d, m)
    rows, cols = q.shape
    nb = d.shape[1]
    xq = np.empty(cols, dtype=np.int8)           # (cols,) x rounded per block of 32
    dx = np.empty(nb, dtype=np.float32)          # (cols/32,) its block scales
    intdot.quantize_q8(x, xq, dx)
    xc = rowdot.lane_corrections(xq, np.empty(cols // 4, dtype=np.int32))     # (cols/4,) for VNNI's bias
    # rowdot.row's I8 formula with its min-term test hoisted out of the row loop, and only what I8
    # rows read (not all of round_x): on narrow rows both are measurable costs. xq stands in for the
    # Q4 step order, which I8 rows never read. Each row prefetches one `ahead` rows on (rowdot.row_ahead).
    ahead = rowdot.rows_ahead(cols)
    if m.shape[1]:
        xsum = intdot.rounded_block_sums(xq, dx, np.empty(nb, dtype=np.float32))
        for r in prange(rows):
            out[r] = (rowdot.i8_row1p(q, d, r, rowdot.ahead_row(r, ahead, rows), xq, xq, xc, dx)
                      + intdot.scale_dot(m, r, xsum))
    else:
        for r in prange(rows):
            out[r] = rowdot.i8_row1p(q, d, r, rowdot.ahead_row(r, ahead, rows), xq, xq, xc, dx)
    return out


@jit(parallel=True)
def _matvec_i8_numba(q, d, m, x, out):
    rows, cols = q.shape
    nb = d.shape[1]
    block = cols // nb
    if block == 32:
        return _matvec_i8x32_numba(q, d, m, x, out)
    # Float x for the other block sizes (Q6_K's 16). The scale index must be a shift by a constant:
    # with a run-time shift or division LLVM gathers d[...] per element, several times slower,
    # so B = 16 has its own loop and other block sizes take the slow general loop (no GGUF format
    # produces them).
    has_min = m.shape[1] > 0
    xsum = np.zeros(nb, dtype=np.float32)
    if has_min:
        for b in range(nb):
            acc = np.float32(0.0)
            for k in range(b * block, b * block + block):
                acc += x[k]
            xsum[b] = acc
    G = _group(cols) if block == 16 else 1
    for g in prange((rows + G - 1) // G):
        r = g * G
        if G == GROUP and r + GROUP <= rows:
            q0, q1, q2, q3 = q[r], q[r + 1], q[r + 2], q[r + 3]
            d0, d1, d2, d3 = d[r], d[r + 1], d[r + 2], d[r + 3]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for k in range(cols):
                xk = x[k]
                a0 += scale_f32(d0[k >> 4]) * (np.float32(q0[k]) * xk)
                a1 += scale_f32(d1[k >> 4]) * (np.float32(q1[k]) * xk)
                a2 += scale_f32(d2[k >> 4]) * (np.float32(q2[k]) * xk)
                a3 += scale_f32(d3[k >> 4]) * (np.float32(q3[k]) * xk)
            out[r], out[r + 1], out[r + 2], out[r + 3] = a0, a1, a2, a3
        else:
            for r in range(g * G, min(rows, g * G + G)):
                out[r] = i8_row_f32(q[r], d[r], x, block)
        if has_min:
            for r in range(g * G, min(rows, g * G + G)):
                mr = m[r]
                acc = out[r]
                for b in range(nb):
                    acc += scale_f32(mr[b]) * xsum[b]
                out[r] = acc
    return out


matvec_f16 = pick(_matvec_f16_numba, matvec_f16_numpy)
matvec_bf16 = pick(_matvec_bf16_numba, matvec_bf16_numpy)
matvec_q4 = pick(_matvec_q4_numba, matvec_q4_numpy)
matvec_q5 = pick(_matvec_q4_numba, matvec_q5_numpy)
matvec_q6 = pick(_matvec_q4_numba, matvec_q6_numpy)
matvec_s24 = pick(_matvec_q4_numba, matvec_s24_numpy)
matvec_i8 = pick(_matvec_i8_numba, matvec_i8_numpy)
