"""Gathered rows for the sparse FFN (kernels/sparse_ffn.py): a 4-row axpy in LLVM IR that
software-prefetches the rows of the neurons coming next while it computes.

Why: the sparse FFN reads one 2-4 KiB row per weight per neuron, at scattered addresses. The hardware
prefetchers follow streams within a page and need a few misses to find one, so on a fresh row most
lines arrive one memory latency at a time, and random rows read at a fraction of the speed of the same
bytes in order. Prefetching a whole row ahead in one burst helps little: the prefetches fill the
core's miss buffers and then stall the loop that issued them. One prefetch per line consumed, aimed a
couple of rows ahead, keeps a steady number of misses in flight: so the loop here issues, in each
iteration, one prefetch of the next rows' lines per line it reads
(`llvm.prefetch` into L2, see kernels/llvm_ir.prefetch; only valid rows are prefetched). The gate
and up row dots do the same in kernels/rowdot.py (q4_gu, i8_gu, q4_row1p, i8_row1p).

- axpy4_i8(w, d, j, a, acc): acc (cols,) f32 += sum over r < 4 of a[r] * row j[r] of an I8 weight with
  32-blocks and no mins (the int8 downT of engine/executors/sparse.py), as explicit <16 x float> vectors:
  a numba loop pays per-block scale conversions and a run-time 32-long trip count. axpy4_i8_pf(w, d, j,
  a, pf, acc) also prefetches rows pf[0..3] of w and d (pf[r] < 0: none). The scales are loaded two
  blocks at a time as a vector: a scalar half load compiles to vpinsrw into a register LLVM picks, and
  where that is an accumulator every scale waits for the previous block's sums.
- axpy4_q4(w, d, m, j, a, acc) and axpy4_q4_pf(w, d, m, j, a, pf, acc): the same for a Q4 weight (the
  4-bit downT of engine/executors/sparse.py, GGUF nibble order: byte t of a block holds element t in its low
  nibble and element t + 16 in its high one), with mins m (rows, cols/32) or, m empty, Q4_0's -8 * d.
  Per block and row: one 16-byte load, a mask and a shift, and two 16-lane conversions; the min term
  is one sum over the four rows per block. It reads 2,560 bytes per 4096-wide row where the int8 one
  reads 4,352, but the unpacking costs more time than the bytes save, so the int8 downT stays the
  default (engine/executors/sparse.py).

Numerics: the float operations of the numpy twin happen in the same order except what fastmath
contracts into fused multiply-adds. Generic vector IR, so ARM64 gets the same loop; f16 scales
convert through kernels/llvm_ir.half_to_f32 (one instruction on F16C x86 and ARM64, integer
operations on other targets).
"""

import numpy as np

from kernels.backend import NUMBA
from kernels.dequant import scales_f32_numpy

# ---------------------------------------------------------------- numpy twins


def axpy4_numpy(w, d, j, a, acc, pf=None):
    """acc (cols,) f32 += sum over r < 4 of a[r] * row j[r] of w (rows, cols) int8 with scales d
    (rows, cols/32) f32 or f16 bits, added as ((a0 r0 + a1 r1) + (a2 r2 + a3 r3)) per element. pf: the
    rows axpy4_i8_pf prefetches (no effect on the result)."""
    rows = w[np.asarray(j[:4], dtype=np.int64)].reshape(4, -1, 32).astype(np.float32)   # (4, nb, 32)
    s = scales_f32_numpy(d[np.asarray(j[:4], dtype=np.int64)]) * np.asarray(a[:4], np.float32)[:, None]
    t = (s[:, :, None] * rows).reshape(4, -1)                                           # (4, cols) f32
    acc += (t[0] + t[1]) + (t[2] + t[3])
    return acc


def axpy4_q4_numpy(w, d, m, j, a, acc, pf=None):
    """acc (cols,) f32 += sum over r < 4 of a[r] * row j[r] of w (rows, cols/2) uint8 Q4 nibbles with
    scales d and mins m (rows, cols/32, or (rows, 0): value = d * (q - 8)) f32 or f16 bits, added as
    ((a0 s0 q0 + a1 s1 q1) + (a2 s2 q2 + a3 s3 q3)) + the four rows' a * min per element."""
    jj = np.asarray(j[:4], dtype=np.int64)
    av = np.asarray(a[:4], np.float32)
    b = w[jj].reshape(4, -1, 16)                                                         # (4, nb, 16)
    q = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float32)                      # (4, nb, 32)
    s = scales_f32_numpy(d[jj]) * av[:, None]                                            # (4, nb) f32
    off = (scales_f32_numpy(m[jj]) * av[:, None] if m.shape[1] else np.float32(-8.0) * s)
    off = (off[0] + off[1]) + (off[2] + off[3])                                          # (nb,) f32
    t = (s[:, :, None] * q)                                                              # (4, nb, 32) f32
    acc += (((t[0] + t[1]) + (t[2] + t[3])) + off[:, None]).reshape(-1)
    return acc


# ---------------------------------------------------------------- LLVM IR

if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import F32 as _F32, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64, c_array, const64 as _c64
    from kernels.llvm_ir import half_to_f32 as _half_to_f32
    from kernels.llvm_ir import lanes as _lanes, prefetch_line as _prefetch_line, prefetch_target as _target
    from kernels.llvm_ir import data as _data, row_ptr as _row, rows_array, splat as _const, vec as _vec

    W = 16          # float lanes per vector in the axpy (one AVX-512 register; two AVX2 ones)

    _SCALES = (types.float32, types.uint16)

    def _scales2(builder, drow, b, f16):
        """<4 x float> whose lanes 0 and 1 are the scales of blocks b and b+1 of a row (lanes 2, 3:
        don't care). The halves go through a zero-extending vector load: a scalar half load becomes
        vpinsrw into whatever register LLVM picks, and when that is an accumulator of the loop, every
        scale waits for the previous iteration's sums."""
        if f16:
            raw = builder.load(builder.bitcast(builder.gep(drow, [b]), _I32.as_pointer()), align=2)
            v = builder.insert_element(_const(_I32, 4, 0), raw, ir.Constant(_I32, 0))
            h = builder.bitcast(v, _vec(_I16, 8))
            return _half_to_f32(builder, builder.shuffle_vector(h, h, _lanes(0, 1, 2, 3)))
        v = builder.load(builder.bitcast(builder.gep(drow, [b]), _vec(_F32, 2).as_pointer()), align=4)
        return builder.shuffle_vector(v, v, _lanes(0, 1, 0, 1))

    def _scale1(builder, drow, b, f16):
        """<4 x float> with lane 0 the scale of block b (the odd last block), as _scales2."""
        if f16:
            raw = builder.zext(builder.load(builder.gep(drow, [b])), _I32)
            v = builder.insert_element(_const(_I32, 4, 0), raw, ir.Constant(_I32, 0))
            h = builder.bitcast(v, _vec(_I16, 8))
            return _half_to_f32(builder, builder.shuffle_vector(h, h, _lanes(0, 1, 2, 3)))
        v = builder.insert_element(ir.Constant(_vec(_F32, 4), ir.Undefined), builder.load(builder.gep(drow, [b])),
                                   ir.Constant(_I32, 0))
        return v

    def _splat(builder, v4, lane, n):
        return builder.shuffle_vector(v4, v4, _lanes(*[lane] * n))

    def _axpy4_intrinsic(prefetching, nibbles):
        """axpy4_i8(w, d, j, a, acc) / axpy4_q4(w, d, m, j, a, acc), or with prefetching the _pf forms,
        which take pf before acc."""

        def typer(w, d, m, j, a, pf, acc):
            if not (rows_array(w, types.uint8 if nibbles else types.int8) and rows_array(d, *_SCALES)
                    and (m is None or rows_array(m, *_SCALES)) and c_array(j, 1, types.int64)
                    and c_array(a, 1, types.float32) and (pf is None or c_array(pf, 1, types.int64))
                    and c_array(acc, 1, types.float32)):
                return None
            f16 = (d.dtype == types.uint16, m is not None and m.dtype == types.uint16)
            args = tuple(t for t in (w, d, m, j, a, pf, acc) if t is not None)

            def codegen(context, builder, sig, vals):
                named = iter(zip(sig.args, vals))
                get = (lambda t: next(named) if t is not None else (None, None))
                _emit_axpy4(context, builder, *get(w), *get(d), *get(m), *get(j), *get(a), *get(pf), *get(acc),
                            f16)
                return context.get_dummy_value()

            return types.none(*args), codegen

        # numba's intrinsics take no *args: one explicit signature per form.
        if nibbles and prefetching:
            def axpy4_q4_pf(typingctx, w, d, m, j, a, pf, acc):
                return typer(w, d, m, j, a, pf, acc)
            return intrinsic(axpy4_q4_pf)
        if nibbles:
            def axpy4_q4(typingctx, w, d, m, j, a, acc):
                return typer(w, d, m, j, a, None, acc)
            return intrinsic(axpy4_q4)
        if prefetching:
            def axpy4_i8_pf(typingctx, w, d, j, a, pf, acc):
                return typer(w, d, None, j, a, pf, acc)
            return intrinsic(axpy4_i8_pf)

        def axpy4_i8(typingctx, w, d, j, a, acc):
            return typer(w, d, None, j, a, None, acc)
        return intrinsic(axpy4_i8)

    def _emit_axpy4(context, builder, w_t, w_v, d_t, d_v, m_t, m_v, j_t, j_v, a_t, a_v, pf_t, pf_v, acc_t, acc_v,
                    f16):
        """The IR of axpy4_i8 and axpy4_q4 (see axpy4_numpy, axpy4_q4_numpy): two blocks per loop
        iteration, then an odd last one. m_t None: no mins (I8, or the caller's form without m)."""
        nibbles = w_t.dtype == types.uint8
        jp = _data(context, builder, j_t, j_v)
        ap = _data(context, builder, a_t, a_v)
        accp = _data(context, builder, acc_t, acc_v)
        pfp = _data(context, builder, pf_t, pf_v) if pf_t is not None else None
        has_min = None
        if m_t is not None:                         # Q4 with (rows, 0) mins: Q4_0's -8 * d instead
            has_min = builder.icmp_signed("!=", builder.extract_value(
                context.make_array(m_t)(context, builder, m_v).shape, 1), _c64(0))
        rows, drows, mrows, avals, targets = [], [], [], [], []
        for r in range(4):
            jr = builder.load(builder.gep(jp, [_c64(r)]))
            rows.append(_row(context, builder, w_t, w_v, jr)[0])
            drows.append(_row(context, builder, d_t, d_v, jr)[0])
            if m_t is not None:                     # read only where m has columns (emit(True) below)
                mrows.append(_row(context, builder, m_t, m_v, jr)[0])
            avals.append(builder.load(builder.gep(ap, [_c64(r)])))
            if pf_t is not None:                    # pf[r] < 0: nothing to prefetch
                rp = builder.load(builder.gep(pfp, [_c64(r)]))
                targets.append(_target(context, builder, w_t, w_v, rp))
                targets.append(_target(context, builder, d_t, d_v, rp))
                if m_t is not None:                 # a (rows, 0) m has 0 bytes per row: no prefetch
                    targets.append(_target(context, builder, m_t, m_v, rp))
        nb = builder.extract_value(context.make_array(d_t)(context, builder, d_v).shape, 1)

        def fsum4(t):
            return builder.fadd(builder.fadd(t[0], t[1], flags=("fast",)), builder.fadd(t[2], t[3], flags=("fast",)),
                                flags=("fast",))

        def add_to_acc(off, t):
            cp = builder.bitcast(builder.gep(accp, [off]), _vec(_F32, W).as_pointer())
            builder.store(builder.fadd(builder.load(cp, align=4), t, flags=("fast",)), cp, align=4)

        def blocks(b, two, with_min):
            """acc[32b ..) += the four rows' block b (and b+1 if two) times their a * scale."""
            load = _scales2 if two else _scale1
            scs, mins = [], []
            for r in range(4):
                a4 = _splat(builder, builder.insert_element(ir.Constant(_vec(_F32, 4), ir.Undefined), avals[r],
                                                            ir.Constant(_I32, 0)), 0, 4)
                scs.append(builder.fmul(load(builder, drows[r], b, f16[0]), a4, flags=("fast",)))
                if with_min:
                    mins.append(builder.fmul(load(builder, mrows[r], b, f16[1]), a4, flags=("fast",)))
            if nibbles:
                # the block's additive term, the same for all 32 elements: sum over rows of a * min,
                # or -8 * sum of a * d without mins (only lanes 0 and 1 matter).
                off4 = (fsum4(mins) if with_min
                        else builder.fmul(fsum4(scs), _const(_F32, 4, -8.0), flags=("fast",)))
            for k in range(2 if two else 1):
                splats = [_splat(builder, sc, k, W) for sc in scs]
                base = builder.mul(builder.add(b, _c64(k)), _c64(32))
                if nibbles:                         # W = 16: one vector per half block
                    offk = _splat(builder, off4, k, W)
                    qoff = builder.mul(builder.add(b, _c64(k)), _c64(16))
                    lo, hi = [], []
                    for r in range(4):
                        qp = builder.bitcast(builder.gep(rows[r], [qoff]), _vec(_I8, W).as_pointer())
                        q = builder.load(qp, align=1)
                        for half, nib in ((lo, builder.and_(q, _const(_I8, W, 15))),
                                          (hi, builder.lshr(q, _const(_I8, W, 4)))):
                            half.append(builder.fmul(splats[r], builder.uitofp(nib, _vec(_F32, W)), flags=("fast",)))
                    add_to_acc(base, builder.fadd(fsum4(lo), offk, flags=("fast",)))
                    add_to_acc(builder.add(base, _c64(16)), builder.fadd(fsum4(hi), offk, flags=("fast",)))
                    continue
                for h in range(32 // W):
                    off = builder.add(base, _c64(h * W))
                    terms = []
                    for r in range(4):
                        xp = builder.bitcast(builder.gep(rows[r], [off]), _vec(_I8, W).as_pointer())
                        xv = builder.sitofp(builder.load(xp, align=1), _vec(_F32, W))
                        terms.append(builder.fmul(splats[r], xv, flags=("fast",)))
                    add_to_acc(off, fsum4(terms))

        def emit(with_min):
            entry = builder.block
            fn = builder.function
            loop, tail = fn.append_basic_block("gaxpy.loop"), fn.append_basic_block("gaxpy.tail")
            pairs = builder.ashr(nb, _c64(1))
            builder.cbranch(builder.icmp_signed(">", pairs, _c64(0)), loop, tail)
            # Two blocks (64 bytes of each I8 row, 32 of each Q4 row) per iteration, and one line of
            # each target: Q4 rows are fetched ahead twice as fast as they are read.
            builder.position_at_end(loop)
            i = builder.phi(_I64)
            blocks(builder.shl(i, _c64(1)), True, with_min)
            _prefetch_line(builder, targets, i)
            i2 = builder.add(i, _c64(1))
            i.add_incoming(_c64(0), entry)
            i.add_incoming(i2, builder.block)
            builder.cbranch(builder.icmp_signed("<", i2, pairs), loop, tail)
            builder.position_at_end(tail)
            with builder.if_then(builder.icmp_signed("!=", builder.and_(nb, _c64(1)), _c64(0))):
                blocks(builder.sub(nb, _c64(1)), False, with_min)

        if has_min is None:
            emit(False)
            return
        # Mins or not is known at run time only (the array's column count): one loop for each, so that
        # an empty m is never read.
        with builder.if_else(has_min) as (then, otherwise):
            with then:
                emit(True)
            with otherwise:
                emit(False)

    # axpy4_i8(w, d, j, a, acc): see axpy4_numpy. w (rows, cols) int8, d (rows, cols/32) f32 or f16 bits,
    # j (4,) int64 rows, a (4,) f32, acc (cols,) f32; all C-contiguous. axpy4_i8_pf(w, d, j, a, pf, acc)
    # also prefetches rows pf[0..3] of w and d (pf (4,) int64; entries < 0: none).
    axpy4_i8 = _axpy4_intrinsic(False, False)
    axpy4_i8_pf = _axpy4_intrinsic(True, False)
    # axpy4_q4(w, d, m, j, a, acc): see axpy4_q4_numpy. w (rows, cols/2) uint8, d and m (rows, cols/32)
    # f32 or f16 bits (m (rows, 0): Q4_0's -8 * d); axpy4_q4_pf(w, d, m, j, a, pf, acc) also prefetches
    # rows pf[0..3] of w, d and m.
    axpy4_q4 = _axpy4_intrinsic(False, True)
    axpy4_q4_pf = _axpy4_intrinsic(True, True)
