"""Sparse FFN for one token: only the chosen neurons' gate rows, up rows and down columns are read.

    out (hidden,) = sum over j in idx of act(gate[j] . x, up[j] . x) * downT[j]

with gate, up (ffn, hidden) in any layout of kernels/layouts.md and downT (ffn, hidden) the down
projection stored neuron-major (row j = column j of down), so that one neuron's down weights are one
contiguous row (DESIGN.md, "Flash layout"). `idx` (n,) int32 lists the neurons to compute in ascending
order; the executor (engine/executors/sparse.py) builds it from whole clusters, so consecutive entries are mostly
adjacent rows in memory and the hardware prefetchers see long runs.

Layouts, by the dtype of the first array of each weight (the other two are the layout's scales and mins;
pass empty (rows, 0) float32 arrays where a layout has none):
  float32 w               F32
  uint16 bits             F16 (bits16=0) or BF16 (bits16=1): numba has no float16 arrays
  uint8 qs (rows, cols/2) Q4, GGUF Q4_0 nibble order, block-32 scales, m empty for Q4_0
  uint32 qs (rows, 5*cols/32) Q5 (gate and up only), block-32 scales, m empty for Q5_0
  uint64 qs (rows, 3*cols/32) Q6 (gate and up only), uint32 scales (two f16 per block), m empty
  int8 q                  I8, block-B scales (B = cols / d.shape[1]), optional mins
Scales are float32 or f16 bits (uint16) everywhere: read through dequant.scale_f32.
Any 2-D array may also be a field of neuron records (kernels/neuron_records.py): a view whose rows are
contiguous but a record apart, numba layout "A". The Q4 and 32-block I8 row products and axpys address
its rows through the stride (kernels/llvm_ir.row_ptr) and give the same bits as on separate arrays;
the kernels raise ValueError on a 2-D array whose rows are not contiguous
(neuron_records.check_weight_rows).

`dscale` (hidden,) f32 multiplies the output element-wise: a quantized downT is stored divided by the
largest |value| of each hidden dimension (SmoothQuant-style, arXiv 2211.10438), because its blocks of 32
run along hidden and a few outlier dimensions would otherwise set the scale of every block they are in
(ones for exact formats).
`gate` (ffn,) f32: the pre-activation gate values when the caller already has them (relu-exact mode
computes gate for every neuron first), else an empty array and the kernel computes gate[j] itself.
`acts` (n,) f32 receives act(g, u) of each listed neuron (the executor counts the non-zero ones).
`threads` is numba.get_num_threads() from the caller: inside a kernel that call makes numba refuse to
cache the compiled code (it reads a ctypes global), which would cost seconds at every start.

The same FFN split in two, for the flash executor (engine/executors/flash_ffn.py), whose neurons arrive from
flash in an order that depends on what its cache holds, but whose output must not:
  sparse_acts  acts (n,) = act(gate[idx[t]] . x, up[idx[t]] . x): each neuron on its own, so any split
               of the neurons into calls gives the same bits;
  sparse_down  parts (c, hidden) = per chunk k, sum over t in [bounds[k], bounds[k+1]) of
               acts[t] * downT[idx[t]], in list order (no dscale): each chunk on its own, so any split
               of the chunks into calls gives the same bits. The caller sums the chunks in order.

How the numba kernel runs: ONE prange launch per call (each launch costs ~3 us). The listed
neurons are split into one contiguous share per thread with equal neuron counts (every neuron costs
the same: up to two row dot products and one row axpy), each thread accumulates into its own partial
(hidden,) row, and the partials are summed after the parallel loop. Row dot products round as the
dense matvec's: Q4, Q5 and 32-block I8 rows take kernels/rowdot.py's integer SIMD product with x rounded
to int8 per block (so sparse and dense round alike), in the form that reads a neuron's gate and up
rows in one pass and software-prefetches the rows of the neuron PREFETCH_AHEAD places on: the rows
are scattered, where the hardware prefetchers find no stream (kernels/gather.py); the other layouts
take 1-D long float loops. The down axpy takes four neurons per pass, so that the (hidden,) accumulator is read
and written once per four rows: the int8 downT with 32-blocks (engine/executors/sparse.py's) and Q4 downT
through gather's vector IR, which also prefetches the down rows of the next four listed neurons; the
other layouts through numba loops per scale block (scale hoisted, run-time trip count: the form that
vectorizes for stores, see kernels/dequant.py). tools/bench_sparse.py measures the kernel against the
dense FFN, on separate arrays and on neuron records (BENCHMARKS.md).
"""

import numpy as np

from kernels import dequant, gather, intdot, rowdot
from kernels.activation import act_scalar, glu_numpy
from kernels.backend import NUMBA, jit, pick
from kernels.dequant import scales_f32_numpy
from kernels.neuron_records import check_weight_rows

if NUMBA:
    from numba import prange, types
    from numba.extending import overload

    from kernels.dequant import bf16_to_f32, f16_to_f32, scale_f32
    from kernels.matvec import i8_row_f32


# Below this many listed neurons per thread, fewer threads are used: waking a thread to compute a
# handful of rows costs more than the rows.
MIN_NEURONS_PER_THREAD = 8


# ---------------------------------------------------------------- numpy twins

def _rows_f32(w, d, m, bits16, rows):
    """The listed rows of one weight as (len(rows), cols) f32."""
    n = len(rows)
    if w.dtype == np.float32:
        return np.ascontiguousarray(w[rows])
    cols = w.shape[1] * 2 if w.dtype == np.uint8 else (32 * d.shape[1] if w.dtype in (np.uint32, np.uint64) else w.shape[1])
    out = np.empty((n, cols), dtype=np.float32)
    if w.dtype == np.uint16:
        fn = dequant.dequant_bf16_numpy if bits16 else dequant.dequant_f16_numpy
        return fn(w[rows], out)
    if w.dtype == np.uint8:
        return dequant.dequant_q4_numpy(w[rows], d[rows], m[rows], out)
    if w.dtype == np.int8:
        return dequant.dequant_i8_numpy(w[rows], d[rows], m[rows], out)
    if w.dtype == np.uint32:
        return dequant.dequant_q5_numpy(w[rows], d[rows], m[rows], out)
    if w.dtype == np.uint64:
        return dequant.dequant_q6_numpy(w[rows], d[rows], m[rows], out)
    raise TypeError(f"no sparse FFN layout for weight dtype {w.dtype}")


def _dots_numpy(w, d, m, bits16, rows, x):
    """(len(rows),) f32: the listed rows of one weight dot x, rounded like the numba kernel: Q4, Q5 and
    32-block I8 multiply x rounded to int8 per block (kernels/intdot.py) and add the min term (Q4_0's
    -8*d, Q5_0's -16*d) from block sums of the rounded x; Q6 multiplies the rounded x too (its offset is
    in the products); the other layouts use x as is."""
    if w.dtype in (np.uint8, np.uint32, np.uint64) or (w.dtype == np.int8 and w.shape[1] == 32 * d.shape[1]):
        n, nb = len(rows), d.shape[1]
        xq = np.empty(x.shape[0], np.int8)
        dx = np.empty(nb, np.float32)
        intdot.quantize_q8_numpy(x, xq, dx)
        xr = (xq.reshape(-1, 32) * dx[:, None]).reshape(-1)                 # (cols,) f32
        xsum = xr.reshape(-1, 32).sum(axis=1, dtype=np.float32)             # (cols/32,) f32, as matvec
        if w.dtype == np.uint64:
            return _rowdot(_rows_f32(w, d, m, bits16, rows), xr)
        zero = np.zeros((n, nb), np.float32)
        if w.dtype in (np.uint8, np.uint32):
            fn, offset = (dequant.dequant_q4_numpy, -8.0) if w.dtype == np.uint8 else (dequant.dequant_q5_numpy, -16.0)
            scaled = fn(w[rows], d[rows], zero, np.empty((n, x.shape[0]), np.float32))
            mins = scales_f32_numpy(m[rows]) if m.shape[1] else scales_f32_numpy(d[rows]) * np.float32(offset)
        else:
            scaled = dequant.dequant_i8_numpy(w[rows], d[rows], zero[:, :0], np.empty((n, x.shape[0]), np.float32))
            mins = scales_f32_numpy(m[rows]) if m.shape[1] else zero
        return _rowdot(scaled, xr) + _rowdot(mins, xsum)
    return _rowdot(_rows_f32(w, d, m, bits16, rows), x)


def _rowdot(a, x):
    """(n, k) f32 rows dot (k,) f32 -> (n,) f32, each row summed on its own: a BLAS matrix-vector product
    may round a row differently with the number of rows beside it, and the flash executor computes a
    neuron with whichever others its cache state groups it with (engine/executors/flash_ffn.py)."""
    return (a * x).sum(axis=1, dtype=np.float32)


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


def sparse_acts_numpy(gw, gd, gm, uw, ud, um, bits16, x, idx, act, threads, acts):
    """acts (n,) f32 = act(gate[idx[t]] . x, up[idx[t]] . x) for idx (n,) int32 rows; returns acts."""
    n = idx.shape[0]
    if n == 0:
        return acts
    rows = idx.astype(np.int64)
    g = _dots_numpy(gw, gd, gm, bits16, rows, x)                                      # (n,) f32
    u = _dots_numpy(uw, ud, um, bits16, rows, x)                                      # (n,) f32
    acts[:] = glu_numpy(g[None, :].astype(np.float32), u[None, :].astype(np.float32), act,
                        np.empty((1, n), np.float32))[0]
    return acts


def sparse_down_numpy(dw, dd, dm, bits16, idx, acts, bounds, parts):
    """parts (c, hidden) f32: row k = sum over t in [bounds[k], bounds[k+1]) of acts[t] * downT[idx[t]],
    for idx (n,) int32 rows, acts (n,) f32, bounds (c+1,) int64; returns parts."""
    for k in range(bounds.shape[0] - 1):
        t0, t1 = int(bounds[k]), int(bounds[k + 1])
        down = _rows_f32(dw, dd, dm, bits16, idx[t0:t1].astype(np.int64))               # (t1-t0, hidden) f32
        # Summed down the rows in list order (a reduction over axis 0 adds row after row), as one chunk
        # alone: the same bits whichever chunks share the call.
        np.sum(acts[t0:t1, None] * down, axis=0, dtype=np.float32, out=parts[k])
    return parts


def predict_numpy(w1, s1, b1, w2, s2, b2, h, threshold, threads, scores, idx):
    """Low-rank predictor (engine/executors/predictor.py): scores (ffn,) = relu((h * s1) @ w1 + b1) @ w2 * s2 + b2
    for h (hidden,) f32, w1 (hidden, rank) int8 with row scales s1 (hidden,) f32, b1 (rank,) f32,
    w2 (rank, ffn) int8 with column scales s2 (ffn,) f32, b2 (ffn,) f32. Writes the neurons with
    scores > threshold, ascending, into idx (ffn,) int32 and returns their count."""
    z = np.maximum((h * s1) @ w1.astype(np.float32) + b1, 0.0, dtype=np.float32)     # (rank,) f32
    scores[:] = (z @ w2.astype(np.float32)) * s2 + b2
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

def _dot(w, d, m, j, x, xq, xp, xc, dx, xsum, bits16):
    """Row j of a weight dot x (f32); numba picks the layout from w's dtype (stub for the overload)."""


def _axpy(w, d, m, j, a, acc, bits16):
    """acc (cols,) f32 += a * row j of a weight; numba picks the layout from w's dtype."""


def _axpy4(w, d, m, j, a, acc, bits16):
    """acc (cols,) f32 += sum over t < 4 of a[t] * row j[t]: four rows per pass over acc, which then
    is loaded and stored once per four rows, not once per row; numba picks the layout from w's dtype."""


if NUMBA:
    @jit()
    def _dot_f32(w, d, m, j, x, xq, xp, xc, dx, xsum, bits16):
        row = w[j]
        acc = np.float32(0.0)
        for k in range(row.shape[0]):
            acc += row[k] * x[k]
        return acc

    @jit()
    def _dot_bits16(w, d, m, j, x, xq, xp, xc, dx, xsum, bits16):
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
    def _dot_q4(w, d, m, j, x, xq, xp, xc, dx, xsum, bits16):
        # The dense matvec's row product (kernels/rowdot.py, x rounded to int8 per block), so that both
        # paths round alike: relu-exact's gate comes from the dense kernel and its up from this one.
        # Q4 and Q5 rows (by w's dtype).
        return rowdot.row(w, d, m, j, xq, xp, xc, dx, xsum)

    @jit()
    def _dot_i8(w, d, m, j, x, xq, xp, xc, dx, xsum, bits16):
        block = w.shape[1] // d.shape[1]
        if block == 32:
            return rowdot.row(w, d, m, j, xq, xp, xc, dx, xsum)      # as the dense matvec (see _dot_q4)
        # Float x for other block sizes (Q6_K's 16), as the dense matvec.
        dr = d[j]
        acc = i8_row_f32(w[j], dr, x, block)
        if m.shape[1]:
            mr = m[j]
            for b in range(mr.shape[0]):
                t = np.float32(0.0)
                for k in range(b * block, b * block + block):
                    t += x[k]
                acc += scale_f32(mr[b]) * t
        return acc

    @overload(_dot, inline="always", jit_options={"fastmath": True})
    def _dot_ov(w, d, m, j, x, xq, xp, xc, dx, xsum, bits16):
        dt = w.dtype
        if dt == types.float32:
            return _dot_f32.py_func
        if dt == types.uint16:
            return _dot_bits16.py_func
        if dt in (types.uint8, types.uint32, types.uint64):
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

    @jit(inline=True)          # also called from _axpy4_i8_ir: inlined, no per-call reference counting
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
    def _axpy4_i8_ir(w, d, m, j, a, acc, bits16):
        if w.shape[1] == 32 * d.shape[1] and m.shape[1] == 0:
            gather.axpy4_i8(w, d, j, a, acc)
        else:
            _axpy4_i8(w, d, m, j, a, acc, bits16)

    @jit()
    def _axpy4_q4_ir(w, d, m, j, a, acc, bits16):
        gather.axpy4_q4(w, d, m, j, a, acc)

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
            return _axpy4_i8_ir.py_func if _rows_layout(w, d, j, a, acc) else _axpy4_i8.py_func
        if dt == types.uint8 and _rows_layout(w, d, m, j, a, acc):
            return _axpy4_q4_ir.py_func
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


def _rows_layout(*arrays):
    """Whether the intrinsics can take these numba array types: 1-D ones C-contiguous, 2-D ones with
    contiguous rows (C, or the "A" fields of neuron records: kernels/llvm_ir.rows_array)."""
    return all(a.layout == "C" or (a.ndim == 2 and a.layout == "A") for a in arrays)


def _gu(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16):
    """(gate, up) pre-activations of neuron j (gate[j] when gate is given), prefetching the gate and up
    rows of neuron jp (< 0: none) where kernels/gather.py has the layout; numba picks by dtype."""


def _axpy4p(w, d, m, j, a, pf, acc, bits16):
    """_axpy4, prefetching rows pf (4,) int64 (< 0: none) of w and d where kernels/gather.py has the
    layout; numba picks by dtype."""


if NUMBA:
    def _gu_nibbles(row1p, gu, min_term):
        """_gu for the Q4 layout (rowdot.q4_row1p, q4_gu, intdot.min_term), the Q5 one (q5_*, min_term16) or
        the Q6 one (q6_*, no min term)."""
        @jit()
        def gu_rows(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16):
            if gate.shape[0]:
                return gate[j], row1p(uw, ud, j, jp, xq, xp, xc, dx) + min_term(ud, um, j, xsum)
            g, u = gu(gw, gd, uw, ud, j, jp, xq, xp, xc, dx)
            return g + min_term(gd, gm, j, xsum), u + min_term(ud, um, j, xsum)
        return gu_rows

    _gu_q4 = _gu_nibbles(rowdot.q4_row1p, rowdot.q4_gu, intdot.min_term)
    _gu_q5 = _gu_nibbles(rowdot.q5_row1p, rowdot.q5_gu, intdot.min_term16)

    @jit(inline=True)
    def _no_min_term(d, m, j, xsum):
        return np.float32(0.0)

    _gu_q6 = _gu_nibbles(rowdot.q6_row1p, rowdot.q6_gu, _no_min_term)     # Q6's offset is in its products

    @jit()
    def _gu_i8(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16):
        if uw.shape[1] != 32 * ud.shape[1] or (gate.shape[0] == 0 and gw.shape[1] != 32 * gd.shape[1]):
            return _gu_rows(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16)
        if gate.shape[0]:
            g = gate[j]
            u = rowdot.i8_row1p(uw, ud, j, jp, xq, xp, xc, dx)
        else:
            g, u = rowdot.i8_gu(gw, gd, uw, ud, j, jp, xq, xp, xc, dx)
            if gm.shape[1]:
                g += intdot.scale_dot(gm, j, xsum)
        if um.shape[1]:
            u += intdot.scale_dot(um, j, xsum)
        return g, u

    @jit(inline=True)          # also called from _gu_i8
    def _gu_rows(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16):
        g = gate[j] if gate.shape[0] else _dot(gw, gd, gm, j, x, xq, xp, xc, dx, xsum, bits16)
        return g, _dot(uw, ud, um, j, x, xq, xp, xc, dx, xsum, bits16)

    @overload(_gu, inline="always", jit_options={"fastmath": True})
    def _gu_ov(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16):
        if gw.dtype == uw.dtype and gd.dtype == ud.dtype and _rows_layout(gw, gd, gm, uw, ud, um):
            if gw.dtype == types.uint8:
                return _gu_q4.py_func
            if gw.dtype == types.uint32:
                return _gu_q5.py_func
            if gw.dtype == types.uint64:
                return _gu_q6.py_func
            if gw.dtype == types.int8:
                return _gu_i8.py_func
        return _gu_rows.py_func

    @jit()
    def _axpy4p_i8(w, d, m, j, a, pf, acc, bits16):
        if w.shape[1] == 32 * d.shape[1] and m.shape[1] == 0:
            gather.axpy4_i8_pf(w, d, j, a, pf, acc)
        else:
            _axpy4(w, d, m, j, a, acc, bits16)

    @jit()
    def _axpy4p_q4(w, d, m, j, a, pf, acc, bits16):
        gather.axpy4_q4_pf(w, d, m, j, a, pf, acc)

    @jit()
    def _axpy4p_rows(w, d, m, j, a, pf, acc, bits16):
        _axpy4(w, d, m, j, a, acc, bits16)

    @overload(_axpy4p, inline="always", jit_options={"fastmath": True})
    def _axpy4p_ov(w, d, m, j, a, pf, acc, bits16):
        if w.dtype == types.int8 and _rows_layout(w, d, j, a, pf, acc):
            return _axpy4p_i8.py_func
        if w.dtype == types.uint8 and _rows_layout(w, d, m, j, a, pf, acc):
            return _axpy4p_q4.py_func
        return _axpy4p_rows.py_func


_act = act_scalar   # act(g) * u per neuron, shared with the dense GLU (kernels/activation.py)


# Neurons ahead of the one computed whose gate and up rows the row dots prefetch (any distance from
# 1 to 4 serves alike; kernels/gather.py).
PREFETCH_AHEAD = 2


@jit(parallel=True)
def _sparse_ffn_numba(gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, bits16, x, idx, gate, act, threads, acts, out):
    check_weight_rows(gw, gd, gm)
    check_weight_rows(uw, ud, um)
    check_weight_rows(dw, dd, dm)
    hidden = out.shape[0]
    n = idx.shape[0]
    # x rounded to int8 per 32-block with its block scales, and its float32 block sums (the min
    # terms): what the Q4 and I8 row products read (built for every layout: hidden values, negligible).
    nb = hidden // 32 if hidden % 32 == 0 else 0
    xq = np.zeros(hidden, dtype=np.int8)             # (hidden,) int8
    xp = np.zeros(hidden, dtype=np.int8)             # (hidden,) int8 the same in rowdot's Q4 step order
    xc = np.zeros(hidden // 4, dtype=np.int32)       # (hidden/4,) int32 its lane corrections (I8 on VNNI)
    dx = np.zeros(nb, dtype=np.float32)              # (hidden/32,) f32
    xsum = np.zeros(nb, dtype=np.float32)            # (hidden/32,) f32
    if nb:
        rowdot.round_x(x, xq, xp, xc, dx, xsum)            # like kernels/matvec.py
    shares = max(1, min(threads, n // MIN_NEURONS_PER_THREAD))
    parts = np.zeros((shares, hidden), dtype=np.float32)    # (shares, hidden) f32 per-thread partials
    for s in prange(shares):
        acc = parts[s]
        pj = np.empty(4, dtype=np.int64)             # neurons waiting for their down rows
        pa = np.empty(4, dtype=np.float32)           # and their activations
        pf = np.empty(4, dtype=np.int64)             # down rows to prefetch meanwhile
        npend = 0
        t1 = (s + 1) * n // shares
        for t in range(s * n // shares, t1):
            j = idx[t]
            jp = idx[t + PREFETCH_AHEAD] if t + PREFETCH_AHEAD < t1 else -1
            g, u = _gu(gw, gd, gm, uw, ud, um, j, jp, x, xq, xp, xc, dx, xsum, gate, bits16)
            a = _act(g, u, act)
            acts[t] = a
            if a != 0.0:
                pj[npend] = j
                pa[npend] = a
                npend += 1
                if npend == 4:
                    for q in range(4):                  # the next listed neurons: the next four rows
                        pf[q] = idx[t + 1 + q] if t + 1 + q < t1 else -1
                    _axpy4p(dw, dd, dm, pj, pa, pf, acc, bits16)
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
def _sparse_acts_numba(gw, gd, gm, uw, ud, um, bits16, x, idx, act, threads, acts):
    check_weight_rows(gw, gd, gm)
    check_weight_rows(uw, ud, um)
    n = idx.shape[0]
    hidden = x.shape[0]
    nb = hidden // 32 if hidden % 32 == 0 else 0
    xq = np.zeros(hidden, dtype=np.int8)             # (hidden,) int8 x rounded per 32-block, as sparse_ffn
    xp = np.zeros(hidden, dtype=np.int8)             # (hidden,) int8
    xc = np.zeros(hidden // 4, dtype=np.int32)       # (hidden/4,) int32
    dx = np.zeros(nb, dtype=np.float32)              # (hidden/32,) f32
    xsum = np.zeros(nb, dtype=np.float32)            # (hidden/32,) f32
    if nb:
        rowdot.round_x(x, xq, xp, xc, dx, xsum)
    shares = max(1, min(threads, n // MIN_NEURONS_PER_THREAD))
    for s in prange(shares):
        for t in range(s * n // shares, (s + 1) * n // shares):
            j = idx[t]
            acts[t] = _act(_dot(gw, gd, gm, j, x, xq, xp, xc, dx, xsum, bits16), _dot(uw, ud, um, j, x, xq, xp, xc, dx, xsum, bits16),
                           act)
    return acts


@jit(parallel=True)
def _sparse_down_numba(dw, dd, dm, bits16, idx, acts, bounds, parts):
    check_weight_rows(dw, dd, dm)
    # One chunk per prange iteration, its rows accumulated in list order four at a time as in
    # _sparse_ffn_numba (zeros skipped): a chunk's bits depend on its own neurons only.
    for k in prange(bounds.shape[0] - 1):
        acc = parts[k]
        acc[:] = 0.0
        pj = np.empty(4, dtype=np.int64)
        pa = np.empty(4, dtype=np.float32)
        npend = 0
        for t in range(bounds[k], bounds[k + 1]):
            a = acts[t]
            if a != 0.0:
                pj[npend] = idx[t]
                pa[npend] = a
                npend += 1
                if npend == 4:
                    _axpy4(dw, dd, dm, pj, pa, acc, bits16)
                    npend = 0
        for t in range(npend):
            _axpy(dw, dd, dm, pj[t], pa[t], acc, bits16)
    return parts


@jit(parallel=True)
def _predict_numba(w1, s1, b1, w2, s2, b2, h, threshold, threads, scores, idx):
    hidden, rank = w1.shape
    ffn = w2.shape[1]
    z = np.zeros(rank, dtype=np.float32)           # (rank,) f32; rank-long rows of w1 vectorize
    # Four rows of w1 per pass, so z is loaded and stored once per four, not once per row: this part
    # runs on one thread, before the threads split the work.
    k = 0
    while k + 4 <= hidden:
        h0, h1, h2, h3 = h[k] * s1[k], h[k + 1] * s1[k + 1], h[k + 2] * s1[k + 2], h[k + 3] * s1[k + 3]
        q0, q1, q2, q3 = w1[k], w1[k + 1], w1[k + 2], w1[k + 3]
        for r in range(rank):
            z[r] += ((h0 * np.float32(q0[r]) + h1 * np.float32(q1[r]))
                     + (h2 * np.float32(q2[r]) + h3 * np.float32(q3[r])))
        k += 4
    for k in range(k, hidden):
        hk = h[k] * s1[k]
        row = w1[k]
        for r in range(rank):
            z[r] += hk * np.float32(row[r])
    live = np.empty(rank, dtype=np.int64)          # the ranks with relu(z) > 0: only their w2 rows count
    zl = np.empty(rank, dtype=np.float32)          # (rank,) f32 their values
    nlive = 0
    for r in range(rank):
        v = z[r] + b1[r]
        if v > 0.0:
            live[nlive] = r
            zl[nlive] = v
            nlive += 1
    # Columns of w2 in one share per thread, each walked as axpys over its slice, four rows per pass:
    # four streams in flight and the scores read and written once per four rows, not once per row;
    # the column scales and b2 at the end.
    shares = max(1, min(threads, ffn // 256))
    for s in prange(shares):
        c0 = s * ffn // shares
        c1 = (s + 1) * ffn // shares
        dst = scores[c0:c1]
        dst[:] = 0.0
        i = 0
        while i + 4 <= nlive:
            z0, z1, z2, z3 = zl[i], zl[i + 1], zl[i + 2], zl[i + 3]
            q0, q1 = w2[live[i], c0:c1], w2[live[i + 1], c0:c1]
            q2, q3 = w2[live[i + 2], c0:c1], w2[live[i + 3], c0:c1]
            for c in range(c1 - c0):
                dst[c] += ((z0 * np.float32(q0[c]) + z1 * np.float32(q1[c]))
                           + (z2 * np.float32(q2[c]) + z3 * np.float32(q3[c])))
            i += 4
        for k in range(i, nlive):
            zr = zl[k]
            src = w2[live[k], c0:c1]
            for c in range(c1 - c0):
                dst[c] += zr * np.float32(src[c])
        sc = s2[c0:c1]
        bias = b2[c0:c1]
        for c in range(c1 - c0):
            dst[c] = dst[c] * sc[c] + bias[c]
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
sparse_acts = pick(_sparse_acts_numba, sparse_acts_numpy)
sparse_down = pick(_sparse_down_numba, sparse_down_numpy)
predict = pick(_predict_numba, predict_numpy)
select = pick(_select_numba, select_numpy)
