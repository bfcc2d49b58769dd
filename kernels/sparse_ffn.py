"""Sparse FFN for one token: only the chosen neurons' gate rows, up rows and down columns are read.

    out (hidden,) = sum over j in idx of act(gate[j] . x, up[j] . x) * downT[j]

with gate, up (ffn, hidden) in any layout of kernels/layouts.md and downT (ffn, hidden) the down
projection stored neuron-major (row j = column j of down), so that one neuron's down weights are one
contiguous row (DESIGN.md, "Flash layout"). `idx` (n,) int32 lists the neurons to compute in ascending
order; the executor (engine/sparse.py) builds it from whole clusters, so consecutive entries are mostly
adjacent rows in memory and the hardware prefetchers see long runs.

Layouts, by the dtype of the first array of each weight (the other two are the layout's scales and mins;
pass empty (rows, 0) float32 arrays where a layout has none):
  float32 w               F32
  uint16 bits             F16 (bits16=0) or BF16 (bits16=1): numba has no float16 arrays
  uint8 qs (rows, cols/2) Q4, GGUF Q4_0 nibble order, block-32 scales, m empty for Q4_0
  int8 q                  I8, block-B scales (B = cols / d.shape[1]), optional mins
Scales are float32 or f16 bits (uint16) everywhere: read through dequant.scale_f32.

`dscale` (hidden,) f32 multiplies the output element-wise: a quantized downT is stored divided by the
largest |value| of each hidden dimension (SmoothQuant-style, arXiv 2211.10438), because its blocks of 32
run along hidden and a few outlier dimensions would otherwise set the scale of every block they are in
(ones for exact formats).
`gate` (ffn,) f32: the pre-activation gate values when the caller already has them (relu-exact mode
computes gate for every neuron first), else an empty array and the kernel computes gate[j] itself.
`acts` (n,) f32 receives act(g, u) of each listed neuron (the executor counts the non-zero ones).
`threads` is numba.get_num_threads() from the caller: inside a kernel that call makes numba refuse to
cache the compiled code (it reads a ctypes global), which would cost seconds at every start.

How the numba kernel runs: ONE prange launch per call (each launch costs 3-25 us here). The listed
neurons are split into one contiguous share per thread with equal neuron counts (every neuron costs
the same: up to two row dot products and one row axpy), each thread accumulates into its own partial
(hidden,) row, and the partials are summed after the parallel loop. Row dot products are the dense
matvec's: Q4 and 32-block I8 rows take kernels/intdot.py's integer SIMD product with x rounded to int8
per block (so sparse and dense round alike), the other layouts 1-D long float loops; the down axpy is
written per scale block with the scale hoisted and a run-time trip count, the form that vectorizes
for stores (see kernels/dequant.py), four neurons per pass so that the (hidden,) accumulator is read
and written once per four rows (int8 rows of 4096: 10 against 4 G values/s on one thread).
"""

import numpy as np

from kernels import dequant, intdot
from kernels.activation import act_scalar, glu_numpy
from kernels.backend import NUMBA, jit, pick
from kernels.dequant import scales_f32_numpy

if NUMBA:
    from numba import prange, types
    from numba.extending import overload

    from kernels.dequant import bf16_to_f32, f16_to_f32, scale_f32
    from kernels.matvec import _i8_row_f32


# Below this many listed neurons per thread, fewer threads are used: waking a thread to compute a
# handful of rows costs more than the rows.
MIN_NEURONS_PER_THREAD = 8


# ---------------------------------------------------------------- numpy twins

def _rows_f32(w, d, m, bits16, rows):
    """The listed rows of one weight as (len(rows), cols) f32."""
    n = len(rows)
    if w.dtype == np.float32:
        return np.ascontiguousarray(w[rows])
    cols = w.shape[1] * 2 if w.dtype == np.uint8 else w.shape[1]
    out = np.empty((n, cols), dtype=np.float32)
    if w.dtype == np.uint16:
        fn = dequant.dequant_bf16_numpy if bits16 else dequant.dequant_f16_numpy
        return fn(w[rows], out)
    if w.dtype == np.uint8:
        return dequant.dequant_q4_numpy(w[rows], d[rows], m[rows], out)
    if w.dtype == np.int8:
        return dequant.dequant_i8_numpy(w[rows], d[rows], m[rows], out)
    raise TypeError(f"no sparse FFN layout for weight dtype {w.dtype}")


def _dots_numpy(w, d, m, bits16, rows, x):
    """(len(rows),) f32: the listed rows of one weight dot x, rounded like the numba kernel: Q4 and
    32-block I8 multiply x rounded to int8 per block (kernels/intdot.py) and add the min term (Q4_0's
    -8*d) from block sums of the rounded x; the other layouts use x as is."""
    if w.dtype == np.uint8 or (w.dtype == np.int8 and w.shape[1] == 32 * d.shape[1]):
        n, nb = len(rows), d.shape[1]
        xq = np.empty(x.shape[0], np.int8)
        dx = np.empty(nb, np.float32)
        intdot.quantize_q8_numpy(x, xq, dx)
        xr = (xq.reshape(-1, 32) * dx[:, None]).reshape(-1)                 # (cols,) f32
        xsum = xr.reshape(-1, 32).sum(axis=1, dtype=np.float32)             # (cols/32,) f32, as matvec
        zero = np.zeros((n, nb), np.float32)
        if w.dtype == np.uint8:
            scaled = dequant.dequant_q4_numpy(w[rows], d[rows], zero, np.empty((n, x.shape[0]), np.float32))
            mins = scales_f32_numpy(m[rows]) if m.shape[1] else scales_f32_numpy(d[rows]) * np.float32(-8.0)
        else:
            scaled = dequant.dequant_i8_numpy(w[rows], d[rows], zero[:, :0], np.empty((n, x.shape[0]), np.float32))
            mins = scales_f32_numpy(m[rows]) if m.shape[1] else zero
        return scaled @ xr + mins @ xsum
    return _rows_f32(w, d, m, bits16, rows) @ x


def sparse_ffn_numpy(gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, bits16, x, idx, gate, act, threads, acts, out):
    """See the module docstring. Returns out (hidden,) f32; acts (n,) f32 is filled."""
    n = idx.shape[0]
    out[:] = 0.0
    if n == 0:
        return out
    rows = idx.astype(np.int64)
    g = gate[rows] if gate.shape[0] else _dots_numpy(gw, gd, gm, bits16, rows, x)     # (n,) f32
    u = _dots_numpy(uw, ud, um, bits16, rows, x)                                      # (n,) f32
    a = glu_numpy(g[None, :].astype(np.float32), u[None, :].astype(np.float32), act,
                  np.empty((1, n), np.float32))[0]
    acts[:] = a
    down = _rows_f32(dw, dd, dm, bits16, rows)                       # (n, hidden) f32
    out[:] = (a @ down) * dscale
    return out


def predict_numpy(w1, b1, w2, b2, h, threshold, threads, scores, idx):
    """Low-rank predictor (engine/predictor.py): scores (ffn,) = relu(h @ w1 + b1) @ w2 + b2 for
    h (hidden,) f32, w1 (hidden, rank), b1 (rank,), w2 (rank, ffn), b2 (ffn,) f32. Writes the neurons
    with scores > threshold, ascending, into idx (ffn,) int32 and returns their count."""
    z = np.maximum(h @ w1 + b1, 0.0, dtype=np.float32)
    scores[:] = z @ w2 + b2
    sel = np.flatnonzero(scores > threshold)
    idx[: len(sel)] = sel
    return len(sel)


def select_numpy(values, threshold, idx):
    """values (ffn,) f32 -> the neurons with values > threshold, ascending, into idx (ffn,) int32;
    returns their count."""
    sel = np.flatnonzero(values > threshold)
    idx[: len(sel)] = sel
    return len(sel)


# ---------------------------------------------------------------- numba: per-layout row helpers

def _dot(w, d, m, j, x, xq, dx, xsum, bits16):
    """Row j of a weight dot x (f32); numba picks the layout from w's dtype (stub for the overload)."""


def _axpy(w, d, m, j, a, acc, bits16):
    """acc (cols,) f32 += a * row j of a weight; numba picks the layout from w's dtype."""


def _axpy4(w, d, m, j, a, acc, bits16):
    """acc (cols,) f32 += sum over t < 4 of a[t] * row j[t]: four rows per pass over acc, which then
    is loaded and stored once per four rows (one row at a time: ~2.5x slower, measured on 4096-wide
    int8 rows); numba picks the layout from w's dtype."""


if NUMBA:
    @jit()
    def _dot_f32(w, d, m, j, x, xq, dx, xsum, bits16):
        row = w[j]
        acc = np.float32(0.0)
        for k in range(row.shape[0]):
            acc += row[k] * x[k]
        return acc

    @jit()
    def _dot_bits16(w, d, m, j, x, xq, dx, xsum, bits16):
        row = w[j]
        acc = np.float32(0.0)
        if bits16:
            for k in range(row.shape[0]):
                acc += bf16_to_f32(row[k]) * x[k]
        else:
            for k in range(row.shape[0]):
                acc += f16_to_f32(row[k]) * x[k]
        return acc

    @jit()
    def _dot_q4(w, d, m, j, x, xq, dx, xsum, bits16):
        # The dense matvec's integer row product (x rounded to int8 per block), so that both paths
        # round alike: relu-exact's gate comes from the dense kernel and its up from this one.
        return intdot.q4_row(w, d, m, j, xq, dx, xsum)

    @jit()
    def _dot_i8(w, d, m, j, x, xq, dx, xsum, bits16):
        dr = d[j]
        block = w.shape[1] // dr.shape[0]
        if block == 32:
            return intdot.i8_row(w, d, m, j, xq, dx, xsum)
        # Float x for other block sizes (Q6_K's 16), as the dense matvec.
        acc = _i8_row_f32(w[j], dr, x, block)
        if m.shape[1]:
            mr = m[j]
            for b in range(mr.shape[0]):
                t = np.float32(0.0)
                for k in range(b * block, b * block + block):
                    t += x[k]
                acc += scale_f32(mr[b]) * t
        return acc

    @overload(_dot, inline="always", jit_options={"fastmath": True})
    def _dot_ov(w, d, m, j, x, xq, dx, xsum, bits16):
        dt = w.dtype
        if dt == types.float32:
            return _dot_f32.py_func
        if dt == types.uint16:
            return _dot_bits16.py_func
        if dt == types.uint8:
            return _dot_q4.py_func
        if dt == types.int8:
            return _dot_i8.py_func
        return None

    @jit()
    def _axpy_f32(w, d, m, j, a, acc, bits16):
        row = w[j]
        for k in range(row.shape[0]):
            acc[k] += a * row[k]

    @jit()
    def _axpy_bits16(w, d, m, j, a, acc, bits16):
        row = w[j]
        if bits16:
            for k in range(row.shape[0]):
                acc[k] += a * bf16_to_f32(row[k])
        else:
            for k in range(row.shape[0]):
                acc[k] += a * f16_to_f32(row[k])

    @jit()
    def _axpy_q4(w, d, m, j, a, acc, bits16):
        row = w[j]
        dr = d[j]
        mr = m[j]
        nb = dr.shape[0]
        hb = row.shape[0] // nb                      # 16 bytes per block; a run-time count vectorizes
        sym = mr.shape[0] == 0
        for b in range(nb):
            s = a * scale_f32(dr[b])
            off = np.float32(-8.0) * s if sym else a * scale_f32(mr[b])
            src = row[b * hb: b * hb + hb]
            lo = acc[2 * b * hb: 2 * b * hb + hb]    # elements 0-15 of the block: low nibbles
            hi = acc[2 * b * hb + hb: 2 * b * hb + 2 * hb]
            for t in range(hb):
                q = np.int32(src[t])
                lo[t] += s * np.float32(np.int32(q & 15)) + off
                hi[t] += s * np.float32(np.int32(q >> 4)) + off

    @jit()
    def _axpy_i8(w, d, m, j, a, acc, bits16):
        row = w[j]
        dr = d[j]
        mr = m[j]
        nb = dr.shape[0]
        block = row.shape[0] // nb
        has_min = mr.shape[0] > 0
        for b in range(nb):
            s = a * scale_f32(dr[b])
            src = row[b * block: b * block + block]
            dst = acc[b * block: b * block + block]
            if has_min:
                off = a * scale_f32(mr[b])
                for t in range(block):
                    dst[t] += s * np.float32(src[t]) + off
            else:
                for t in range(block):
                    dst[t] += s * np.float32(src[t])

    @jit()
    def _axpy4_i8(w, d, m, j, a, acc, bits16):
        r0, r1, r2, r3 = w[j[0]], w[j[1]], w[j[2]], w[j[3]]
        d0, d1, d2, d3 = d[j[0]], d[j[1]], d[j[2]], d[j[3]]
        nb = d0.shape[0]
        block = r0.shape[0] // nb
        has_min = m.shape[1] > 0
        for b in range(nb):
            s0 = a[0] * scale_f32(d0[b])
            s1 = a[1] * scale_f32(d1[b])
            s2 = a[2] * scale_f32(d2[b])
            s3 = a[3] * scale_f32(d3[b])
            off = np.float32(0.0)
            if has_min:
                off = (a[0] * scale_f32(m[j[0], b]) + a[1] * scale_f32(m[j[1], b])
                       + a[2] * scale_f32(m[j[2], b]) + a[3] * scale_f32(m[j[3], b]))
            lo = b * block
            hi = lo + block
            x0, x1, x2, x3 = r0[lo:hi], r1[lo:hi], r2[lo:hi], r3[lo:hi]
            dst = acc[lo:hi]
            for t in range(block):
                dst[t] += ((s0 * np.float32(x0[t]) + s1 * np.float32(x1[t]))
                           + (s2 * np.float32(x2[t]) + s3 * np.float32(x3[t]))) + off

    @jit()
    def _axpy4_f32(w, d, m, j, a, acc, bits16):
        r0, r1, r2, r3 = w[j[0]], w[j[1]], w[j[2]], w[j[3]]
        a0, a1, a2, a3 = a[0], a[1], a[2], a[3]
        for k in range(r0.shape[0]):
            acc[k] += (a0 * r0[k] + a1 * r1[k]) + (a2 * r2[k] + a3 * r3[k])

    @jit()
    def _axpy4_rows(w, d, m, j, a, acc, bits16):
        for t in range(4):
            _axpy(w, d, m, j[t], a[t], acc, bits16)

    @overload(_axpy4, inline="always", jit_options={"fastmath": True})
    def _axpy4_ov(w, d, m, j, a, acc, bits16):
        dt = w.dtype
        if dt == types.int8:
            return _axpy4_i8.py_func
        if dt == types.float32:
            return _axpy4_f32.py_func
        if dt in (types.uint16, types.uint8):
            return _axpy4_rows.py_func
        return None

    @overload(_axpy, inline="always", jit_options={"fastmath": True})
    def _axpy_ov(w, d, m, j, a, acc, bits16):
        dt = w.dtype
        if dt == types.float32:
            return _axpy_f32.py_func
        if dt == types.uint16:
            return _axpy_bits16.py_func
        if dt == types.uint8:
            return _axpy_q4.py_func
        if dt == types.int8:
            return _axpy_i8.py_func
        return None


_act = act_scalar   # act(g) * u per neuron, shared with the dense GLU (kernels/activation.py)


@jit(parallel=True)
def _sparse_ffn_numba(gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, bits16, x, idx, gate, act, threads, acts, out):
    hidden = out.shape[0]
    n = idx.shape[0]
    have_gate = gate.shape[0] > 0
    # x rounded to int8 per 32-block with its block scales, and its float32 block sums (the min
    # terms): what the Q4 and I8 row products read (built for every layout: hidden values, negligible).
    nb = hidden // 32 if hidden % 32 == 0 else 0
    xq = np.zeros(hidden, dtype=np.int8)             # (hidden,) int8
    dx = np.zeros(nb, dtype=np.float32)              # (hidden/32,) f32
    xsum = np.zeros(nb, dtype=np.float32)            # (hidden/32,) f32
    if nb:
        intdot.quantize_q8(x, xq, dx)
        intdot.rounded_block_sums(xq, dx, xsum)     # like kernels/matvec.py
    shares = max(1, min(threads, n // MIN_NEURONS_PER_THREAD))
    parts = np.zeros((shares, hidden), dtype=np.float32)    # (shares, hidden) f32 per-thread partials
    for s in prange(shares):
        acc = parts[s]
        pj = np.empty(4, dtype=np.int64)             # neurons waiting for their down rows
        pa = np.empty(4, dtype=np.float32)           # and their activations
        npend = 0
        for t in range(s * n // shares, (s + 1) * n // shares):
            j = idx[t]
            g = gate[j] if have_gate else _dot(gw, gd, gm, j, x, xq, dx, xsum, bits16)
            u = _dot(uw, ud, um, j, x, xq, dx, xsum, bits16)
            a = _act(g, u, act)
            acts[t] = a
            if a != 0.0:
                pj[npend] = j
                pa[npend] = a
                npend += 1
                if npend == 4:
                    _axpy4(dw, dd, dm, pj, pa, acc, bits16)
                    npend = 0
        for t in range(npend):
            _axpy(dw, dd, dm, pj[t], pa[t], acc, bits16)
    for k in range(hidden):
        out[k] = parts[0, k]
    for s in range(1, shares):
        p = parts[s]
        for k in range(hidden):
            out[k] += p[k]
    for k in range(hidden):
        out[k] *= dscale[k]
    return out


@jit(parallel=True)
def _predict_numba(w1, b1, w2, b2, h, threshold, threads, scores, idx):
    hidden, rank = w1.shape
    ffn = w2.shape[1]
    z = b1.copy()                                  # (rank,) f32; rank-long rows of w1 vectorize
    for k in range(hidden):
        hk = h[k]
        row = w1[k]
        for r in range(rank):
            z[r] += hk * row[r]
    for r in range(rank):
        z[r] = max(z[r], np.float32(0.0))
    # Columns of w2 in one share per thread, each walked as rank long axpys over its slice.
    shares = max(1, min(threads, ffn // 256))
    for s in prange(shares):
        c0 = s * ffn // shares
        c1 = (s + 1) * ffn // shares
        dst = scores[c0:c1]
        dst[:] = b2[c0:c1]
        for r in range(rank):
            zr = z[r]
            if zr != 0.0:
                src = w2[r, c0:c1]
                for c in range(c1 - c0):
                    dst[c] += zr * src[c]
    return _select_numba(scores, threshold, idx)


@jit()
def _select_numba(values, threshold, idx):
    n = 0
    for j in range(values.shape[0]):
        if values[j] > threshold:
            idx[n] = j
            n += 1
    return n


sparse_ffn = pick(_sparse_ffn_numba, sparse_ffn_numpy)
predict = pick(_predict_numba, predict_numpy)
select = pick(_select_numba, select_numpy)
