"""Input-sparse matrix-vector products for decode: out = W @ x' where x' is x with every entry below a
threshold in magnitude set to zero, reading only the weight columns of the entries kept (TEAL's
training-free activation sparsity; the planner chooses the thresholds).

The Q4C layout (kernels/layouts.md) holds a Q4 weight's own nibbles and scales, moved so that a column
(an input channel) is contiguous:
  qc  (cols, rows/2) uint8   column c's nibbles, in sub-blocks of 128 rows: byte b of sub-block s holds
                             row 128s + b in its low nibble and row 128s + 64 + b in its high one (a last
                             sub-block of 64 rows: rows +b and +32+b in 32 bytes);
  dc  (cols/32, rows)        the scale of each (block of 32 columns, row): f32 or f16 bits, as the Q4 d;
  mc  (cols/32, rows or 0)   the offset likewise; empty for Q4_0, whose value is d*(q-8).
Nothing is requantized, so the products are the dense kernel's: x' is rounded to int8 per block of 32
exactly as the dense matvec rounds it (kernels/intdot.py), and each (block, row) integer sum is the
same, so a threshold of 0 gives the dense matvec's result up to the order of float additions.

How it runs (numba): `select` drops, rounds and lists the kept entries, those whose rounded value is not
zero, per block of 32 (`idx`, `start`). The threads then split the blocks, balanced by kept count; a
thread walks each block's kept columns in address order, each a contiguous run of rows/2 bytes,
accumulating q * x'_c for every row in 16-bit integers (the Q4 offset trick below keeps them exact),
then adds the block's scaled sums into its own float32 partial. The partials are summed at the end.
Why the threads split the input, not the rows: a thread then reads whole columns (runs the hardware
prefetchers follow), and the work divides evenly whatever the number of rows.

16-bit sums: a block's sum of (q - 8) * x' over at most 32 columns is at most 8 * 127 * 32 = 32512 in
magnitude, so it fits an int16. The kernel adds q * x' (up to 60960) with wrapping adds and subtracts
8 * sum(x') at the end, also wrapping: the result is the exact centred sum. A Q4_1 row adds back
8 * d * sum(x') in float with its offset term m * sum(x').
"""

import numpy as np

from kernels import intdot
from kernels.backend import NUMBA, jit, pick
from kernels.dequant import nibble_bytes_numpy, nibble_values_numpy, scales_f32_numpy

SUB = 128     # rows per sub-block of a column (64 bytes of nibbles)


# ---------------------------------------------------------------- layout

def fits(rows: int, cols: int) -> bool:
    """Whether a (rows, cols) weight can take the Q4C layout."""
    return rows % 64 == 0 and cols % 32 == 0


def check_shape(rows: int, cols: int) -> None:
    """ValueError unless a (rows, cols) weight can take the Q4C layout."""
    if not fits(rows, cols):
        raise ValueError(f"the Q4C layout needs rows a multiple of 64 and columns of 32, got {rows}x{cols}")


def pack_q4c(qs: np.ndarray, d: np.ndarray, m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A Q4 weight's (qs (rows, cols/2) uint8, d and m (rows, cols/32 or 0)) -> (qc, dc, mc), see above."""
    rows = qs.shape[0]
    check_shape(rows, 2 * qs.shape[1])
    qt = nibble_values_numpy(qs.reshape(rows, -1, 16)).reshape(rows, -1).T   # (cols, rows) uint8 nibble values
    qc = np.empty((qt.shape[0], rows // 2), np.uint8)            # (cols, rows/2) uint8
    for s in range(0, rows, SUB):
        h = min(SUB, rows - s) // 2
        qc[:, s // 2:s // 2 + h] = qt[:, s:s + h] | (qt[:, s + h:s + 2 * h] << 4)
    mc = np.ascontiguousarray(m.T) if m.shape[1] else np.empty((d.shape[1], 0), d.dtype)
    return qc, np.ascontiguousarray(d.T), mc


def column_values(qc: np.ndarray) -> np.ndarray:
    """qc (k, rows/2) uint8 (some columns of the Q4C layout) -> (k, rows) uint8 nibble values."""
    k, half = qc.shape
    q = np.empty((k, 2 * half), np.uint8)
    for s in range(0, 2 * half, SUB):
        h = min(SUB, 2 * half - s) // 2
        part = qc[:, s // 2:s // 2 + h]
        q[:, s:s + h] = part & 15
        q[:, s + h:s + 2 * h] = part >> 4
    return q


def unpack_q4c(qc, dc, mc):
    """The inverse of pack_q4c: (qs, d, m) in the Q4 layout."""
    qt = column_values(qc).T                                     # (rows, cols) uint8
    qs = nibble_bytes_numpy(qt.reshape(qt.shape[0], -1, 32)).reshape(qt.shape[0], -1)
    m = np.ascontiguousarray(mc.T) if mc.shape[1] else np.empty((dc.shape[1], 0), dc.dtype)
    return np.ascontiguousarray(qs), np.ascontiguousarray(dc.T), m


def dequant_q4c_numpy(qc, dc, mc, b0: int, b1: int, out: np.ndarray) -> np.ndarray:
    """Blocks b0..b1-1 of columns as float32 values: out (32*(b1-b0), rows) f32 = W[:, 32*b0:32*b1].T."""
    q = column_values(qc[32 * b0:32 * b1]).reshape(b1 - b0, 32, -1)
    v = out.reshape(b1 - b0, 32, -1)
    d = scales_f32_numpy(dc[b0:b1])[:, None, :]                  # (blocks, 1, rows) f32
    if mc.shape[1]:
        np.multiply(q, d, out=v)
        v += scales_f32_numpy(mc[b0:b1])[:, None, :]
    else:
        np.subtract(q, np.float32(8.0), out=v)
        v *= d
    return out


# ---------------------------------------------------------------- the kept entries

def select_numpy(x, thr, xq, dx, xsum, ssum, idx, start) -> int:
    """x (cols,) f32, thr a float -> the number k of kept entries, and in place: xq (cols,) int8 and dx
    (cols/32,) f32, x with |x| < thr zeroed, rounded per block as intdot.quantize_q8; ssum (cols/32,)
    int32 and xsum (cols/32,) f32 the blocks' integer sums and those times dx; idx[:k] (int32) the kept
    columns (xq != 0) in order, and start (cols/32 + 1,) int32 where each block's kept columns begin."""
    xm = np.where(np.abs(x) >= thr, x, np.float32(0.0)).astype(np.float32)
    intdot.quantize_q8_numpy(xm, xq, dx)
    ssum[:] = xq.reshape(-1, 32).sum(axis=1, dtype=np.int32)
    xsum[:] = ssum.astype(np.float32) * dx
    kept = np.flatnonzero(xq).astype(np.int32)
    k = kept.shape[0]
    idx[:k] = kept
    start[:] = np.searchsorted(kept, np.arange(0, x.shape[0] + 1, 32)).astype(np.int32)
    return k


@jit()
def _select_numba(x, thr, xm, xq, dx, xsum, ssum, idx, start):
    """select_numpy, with xm (cols,) f32 scratch for the zeroed x."""
    n = x.shape[0]
    for j in range(n):
        v = x[j]
        xm[j] = v if abs(v) >= thr else np.float32(0.0)
    intdot.quantize_q8(xm, xq, dx)
    k = 0
    for b in range(n // 32):
        start[b] = k
        s = np.int32(0)
        for j in range(b * 32, b * 32 + 32):
            q = np.int32(xq[j])
            s += q
            idx[k] = j                      # written always, kept only when q != 0: no branch
            k += q != 0
        ssum[b] = s
        xsum[b] = np.float32(s) * dx[b]
    start[n // 32] = k
    return k


# ---------------------------------------------------------------- the product

def matvec_q4c_numpy(qc, dc, mc, x, thr, out):
    """qc, dc, mc the Q4C layout of a (rows, cols) weight, x (cols,) f32, thr >= 0 -> out (rows,) f32 =
    W @ x' (module docstring), x' rounded to int8 per block as the numba kernel rounds it."""
    cols, rows = qc.shape[0], out.shape[0]
    nb = cols // 32
    xq, dx = np.empty(cols, np.int8), np.empty(nb, np.float32)
    xsum, ssum = np.empty(nb, np.float32), np.empty(nb, np.int32)
    idx, start = np.empty(cols, np.int32), np.empty(nb + 1, np.int32)
    select_numpy(x, np.float32(thr), xq, dx, xsum, ssum, idx, start)
    acc = np.zeros(rows, np.float64)
    for b in range(nb):
        kept = idx[start[b]:start[b + 1]]
        if kept.shape[0] == 0:
            continue
        c = xq[kept].astype(np.int64) @ column_values(qc[kept]).astype(np.int64)    # (rows,) integer sums
        d = scales_f32_numpy(dc[b]).astype(np.float64)
        if mc.shape[1]:
            acc += d * float(dx[b]) * c + scales_f32_numpy(mc[b]) * float(xsum[b])
        else:
            acc += d * float(dx[b]) * (c - 8 * int(ssum[b]))
    out[:] = acc
    return out


if NUMBA:
    from llvmlite import ir
    from numba import prange, types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import (F32, I8, I16, I32, broadcast as _broadcast, c_array, const64, counted_loop,
                                 half_to_f32, prefetch, splat, to_i64 as _i64, vec)

    G = 4         # kept columns summed per pass over a block's rows: one load and store of the sums per G

    def _load(builder, p, t, align):
        return builder.load(builder.bitcast(p, t.as_pointer()), align=align)

    def _store(builder, v, p, align):
        builder.store(v, builder.bitcast(p, v.type.as_pointer()), align=align)

    def _is_scales(dc, mc):
        return c_array(dc, 2, types.float32, types.uint16) and c_array(mc, 2, dc.dtype)

    @intrinsic
    def _block_sums(typingctx, qc, idx, xq, s0, s1, p0, p1, dc, mc, b, acc):
        """acc (rows,) int16 = the sums of nibble * x' over one block's kept columns idx[s0:s1] (s0 < s1),
        wrapping. G columns per pass over the rows, 128 rows (64 bytes of each column) per step.

        Each column piece read prefetches the same piece of a column of the next block (idx[p0:p1],
        matched by position; none past p1), and the first pass prefetches the next block's scales (block
        b + 1's rows of dc and mc): one prefetch per line the next block will read, spread over this
        block's work. Without them a block's reads wait on memory."""
        if not (c_array(qc, 2, types.uint8) and c_array(idx, 1, types.int32) and c_array(xq, 1, types.int8)
                and c_array(acc, 1, types.int16) and _is_scales(dc, mc)):
            return None
        sig = types.void(qc, idx, xq, s0, s1, p0, p1, dc, mc, b, acc)
        item = 2 if dc.dtype == types.uint16 else 4

        def codegen(context, builder, sig, args):
            qa, ia, xa = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:3], args[:3]))
            s0_, s1_, p0_, p1_ = (_i64(builder, a) for a in args[3:7])
            da, ma = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args[7:9], args[7:9]))
            b_ = _i64(builder, args[9])
            acc = context.make_array(sig.args[10])(context, builder, args[10]).data
            half = builder.extract_value(qa.shape, 1)                     # rows/2: bytes per column
            rows = builder.mul(half, const64(2))
            has_m = builder.icmp_signed("!=", builder.extract_value(ma.shape, 1), const64(0))
            nxt = builder.icmp_signed(">", p1_, p0_)                       # a next block to prefetch
            bn = builder.select(nxt, builder.add(b_, const64(1)), b_)
            i8p = I8.as_pointer()
            drow = builder.bitcast(builder.gep(da.data, [builder.mul(bn, rows)]), i8p)
            mrow = builder.bitcast(builder.gep(ma.data, [builder.mul(builder.select(has_m, bn, const64(0)),
                                                                     builder.select(has_m, rows, const64(0)))]), i8p)
            counted_loop(builder, builder.ashr(rows, const64(5)), [], lambda i: _store(
                builder, ir.Constant(vec(I16, 32), [0] * 32), builder.gep(acc, [builder.mul(i, const64(32))]), 2),
                "q4c.zero")

            def one_pass(k):
                first = builder.icmp_signed("==", k, const64(0))
                t0 = builder.add(s0_, builder.mul(k, const64(G)))
                cols = []                  # (column pointer, x' as i16, next block's column pointer)
                for g in range(G):
                    t = builder.add(t0, const64(g))
                    ok = builder.icmp_signed("<", t, s1_)
                    tt = builder.select(ok, t, s0_)                    # past the last: column s0 times 0
                    j = _i64(builder, builder.load(builder.gep(ia.data, [tt])))
                    xj = builder.select(ok, builder.sext(builder.load(builder.gep(xa.data, [j])), I16),
                                        ir.Constant(I16, 0))
                    tp = builder.add(p0_, builder.sub(t, s0_))
                    tp = builder.select(builder.icmp_signed("<", tp, p1_), tp, tt)
                    jp = _i64(builder, builder.load(builder.gep(ia.data, [tp])))
                    cols.append((builder.gep(qa.data, [builder.mul(j, half)]), xj,
                                 builder.gep(qa.data, [builder.mul(jp, half)])))

                def step(off, n):
                    """rows 2*off .. 2*off + 2n: n bytes of each column (low nibbles first n rows)."""
                    with builder.if_then(builder.and_(first, nxt)):
                        for q in range(0, 2 * n * item, 64):              # the next block's scales of these rows
                            so = builder.add(builder.mul(off, const64(2 * item)), const64(q))
                            prefetch(builder, builder.gep(drow, [so]))
                            with builder.if_then(has_m):
                                prefetch(builder, builder.gep(mrow, [so]))
                    lp = builder.gep(acc, [builder.mul(off, const64(2))])
                    hp = builder.gep(lp, [const64(n)])
                    lo, hi = _load(builder, lp, vec(I16, n), 2), _load(builder, hp, vec(I16, n), 2)
                    for cp, xj, pp in cols:
                        prefetch(builder, builder.gep(pp, [off]))
                        w = builder.zext(_load(builder, builder.gep(cp, [off]), vec(I8, n), 1), vec(I16, n))
                        xs = _broadcast(builder, xj, n)
                        lo = builder.add(lo, builder.mul(builder.and_(w, splat(I16, n, 15)), xs))
                        hi = builder.add(hi, builder.mul(builder.lshr(w, splat(I16, n, 4)), xs))
                    _store(builder, lo, lp, 2)
                    _store(builder, hi, hp, 2)

                full = builder.ashr(half, const64(6))
                counted_loop(builder, full, [], lambda i: step(builder.mul(i, const64(64)), 64), "q4c.step")
                with builder.if_then(builder.icmp_signed("!=", builder.and_(half, const64(63)), const64(0))):
                    step(builder.mul(full, const64(64)), 32)

            npass = builder.sdiv(builder.add(builder.sub(s1_, s0_), const64(G - 1)), const64(G))
            counted_loop(builder, npass, [], one_pass, "q4c.pass")
            return context.get_dummy_value()

        return sig, codegen

    @intrinsic
    def _add_block(typingctx, acc, dc, mc, b, dxb, xsb, sb, part):
        """part (rows,) f32 += block b's share from its integer sums acc (rows,) int16 (of q * x', wrapped),
        32 rows per step: d * dx * (acc - 8 s) for Q4_0 (mc empty); for Q4_1 8 s * d * dx more, and
        m * xsum; s = sb the block's integer sum of x', xsum = xsb = s * dx."""
        if not (c_array(acc, 1, types.int16) and c_array(part, 1, types.float32) and sb == types.int32
                and _is_scales(dc, mc)):
            return None
        sig = types.void(acc, dc, mc, b, dxb, xsb, sb, part)
        half_scales = dc.dtype == types.uint16

        def codegen(context, builder, sig, args):
            aa, da, ma = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:3], args[:3]))
            b_, dxb, xsb, s = _i64(builder, args[3]), args[4], args[5], args[6]
            part = context.make_array(sig.args[7])(context, builder, args[7]).data
            rows = builder.extract_value(da.shape, 1)
            has_m = builder.icmp_signed("!=", builder.extract_value(ma.shape, 1), const64(0))
            fast = ("fast",)
            eight_s = builder.mul(s, ir.Constant(I32, 8))
            centre = _broadcast(builder, builder.trunc(eight_s, I16), 32)
            back = _broadcast(builder, builder.select(has_m, builder.sitofp(eight_s, F32), ir.Constant(F32, 0.0)), 32)
            dxv = _broadcast(builder, dxb, 32)
            xsv = _broadcast(builder, xsb, 32)

            def scales(arr, r0):
                p = builder.gep(arr.data, [builder.add(builder.mul(b_, rows), r0)])
                if half_scales:
                    return half_to_f32(builder, _load(builder, p, vec(I16, 32), 2))
                return _load(builder, p, vec(F32, 32), 4)

            def step(i):
                r0 = builder.mul(i, const64(32))
                c = builder.sub(_load(builder, builder.gep(aa.data, [r0]), vec(I16, 32), 2), centre)
                c = builder.fadd(builder.sitofp(c, vec(F32, 32)), back, flags=fast)
                pp = builder.gep(part, [r0])
                v = builder.fadd(_load(builder, pp, vec(F32, 32), 4),
                                 builder.fmul(scales(da, r0), builder.fmul(c, dxv, flags=fast), flags=fast), flags=fast)
                _store(builder, v, pp, 4)
                with builder.if_then(has_m):
                    _store(builder, builder.fadd(v, builder.fmul(scales(ma, r0), xsv, flags=fast), flags=fast), pp, 4)

            counted_loop(builder, builder.ashr(rows, const64(5)), [], step, "q4c.add")
            return context.get_dummy_value()

        return sig, codegen

    @jit(parallel=True)
    def _matvec_q4c_numba(qc, dc, mc, x, thr, out):
        cols, rows = x.shape[0], out.shape[0]
        nb = cols // 32
        parts = 2 if nb > 1 else 1
        xm = np.empty(cols, np.float32)              # (cols,) x with the dropped entries zeroed
        xq = np.empty(cols, np.int8)                 # (cols,) x' rounded per block of 32
        dx = np.empty(nb, np.float32)                # (cols/32,) its block scales
        xsum = np.empty(nb, np.float32)              # (cols/32,) block sums of x' as rounded
        ssum = np.empty(nb, np.int32)                # (cols/32,) the same in integers
        idx = np.empty(cols, np.int32)               # (cols,) the kept columns, first k
        start = np.empty(nb + 1, np.int32)           # (cols/32 + 1,) each block's first in idx
        k = _select_numba(x, np.float32(thr), xm, xq, dx, xsum, ssum, idx, start)
        # the parts' block ranges, balanced by kept columns plus two columns' worth per block (_add_block)
        bounds = np.empty(parts + 1, np.int64)
        bounds[0], bounds[parts] = 0, nb
        b = 0
        for p in range(1, parts):
            goal = (k + 2 * nb) * p // parts
            while b < nb and start[b] + 2 * b < goal:
                b += 1
            bounds[p] = b
        partial = np.zeros((parts, rows), np.float32)    # (parts, rows) f32 each part's sum
        acc = np.empty((parts, rows), np.int16)          # (parts, rows) int16 a block's integer sums
        for p in prange(parts):
            a, pp, b1 = acc[p], partial[p], bounds[p + 1]
            for b in range(bounds[p], b1):
                if start[b + 1] > start[b]:
                    last = b + 1 >= b1
                    _block_sums(qc, idx, xq, start[b], start[b + 1], 0 if last else start[b + 1],
                                0 if last else start[b + 2], dc, mc, b, a)
                    _add_block(a, dc, mc, b, dx[b], xsum[b], ssum[b], pp)
        for r in range(rows):
            s = np.float32(0.0)
            for p in range(parts):
                s += partial[p, r]
            out[r] = s
        return out

    @jit()
    def _select_entry(x, thr, xq, dx, xsum, ssum, idx, start):
        return _select_numba(x, np.float32(thr), np.empty(x.shape[0], np.float32), xq, dx, xsum, ssum, idx, start)
else:
    _matvec_q4c_numba = _select_entry = None

matvec_q4c = pick(_matvec_q4c_numba, matvec_q4c_numpy)
select = pick(_select_entry, select_numpy)
