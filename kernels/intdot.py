"""x rounded to int8 per block of 32, as ggml does, for the integer row dots (kernels/rowdot.py), and the
min terms that the rows add from the block sums of the rounded x.

Why int8: a float kernel spends ~10 vector instructions per 32 weights unpacking nibbles, converting them
to float and multiplying, which makes a Q4 matvec compute-bound, not memory-bound. With x in int8 the
products of a block are integer SIMD multiply-adds (kernels/rowdot.py), then one conversion and one
multiply by the block's scale d_w * d_x.

  quantize_q8         x -> xq (int8), dx (block scales): d_x = max|x|/127 per block, nearest integer,
                      llama.cpp's own Q8 rounding
  rounded_block_sums  the block sums of the rounded x
  scale_dot           sum over blocks of a row's scales times a vector (LLVM IR, 8 blocks per step)
  min_term            the min term of a Q4 or I8 row: m, or Q4_0's -8d, times the rounded block sums
  min_term16          the same for a Q5 row: m, or Q5_0's -16d

f16 scales convert through kernels/llvm_ir.half_to_f32: one instruction where the target has it,
integer operations elsewhere.

Numerics: the min term of Q4_1/Q4_K/Q5_1/Q5_K and the -8 and -16 offsets of Q4_0 and Q5_0 use the block sums of the rounded x.
Using float sums there looks more exact but is worse: the rounding errors then multiply d*q (all >= 0)
instead of the centred weight, which costs SmolLM2 ~2% decode perplexity. The numpy twins round x the
same way.
"""

import numpy as np

from kernels.backend import NUMBA, jit
from kernels.dequant import scales_f32_numpy


# ---------------------------------------------------------------- activation quantization

def quantize_q8_numpy(x, xq, dx):
    """x (32*nb,) f32 -> xq (32*nb,) int8, dx (nb,) f32 with x ~ xq * dx per block of 32."""
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    dx[:] = amax / np.float32(127.0)
    inv = np.zeros_like(amax)
    np.divide(np.float32(127.0), amax, out=inv, where=amax > 0)
    xq.reshape(-1, 32)[:] = np.rint(blocks * inv[:, None])
    return xq


@jit()
def _quantize_q8_loops(x, xq, dx):
    """Numba loops for arrays that are not C-contiguous (the intrinsic below takes C arrays only). Its
    32-step loops are unrolled and left scalar by LLVM: ~1 ns per value."""
    nb = dx.shape[0]
    for b in range(nb):
        blk = x[b * 32 : b * 32 + 32]
        amax = np.float32(0.0)
        for j in range(32):
            amax = max(amax, abs(blk[j]))
        dx[b] = amax / np.float32(127.0)
        inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
        for j in range(32):
            xq[b * 32 + j] = np.int8(np.int32(np.rint(blk[j] * inv)))
    return xq


def _q8_blocks(x, xq, dx):
    """x -> xq, dx as quantize_q8_numpy, inside numba: the IR intrinsic for C arrays, else the loops."""


@jit()
def _quantize_q8_numba(x, xq, dx):
    _q8_blocks(x, xq, dx)
    return xq


quantize_q8 = _quantize_q8_numba if NUMBA else quantize_q8_numpy


# ---------------------------------------------------------------- block sums and min terms

@jit()
def rounded_block_sums(xq, dx, out):
    """xq (32*nb,) int8, dx (nb,) f32 -> out (nb,) f32: the block sums of the rounded x; or, for out of
    (2*nb,), the sums of its halves of 16 (the Q6 layout's scale blocks). The min term (m, or Q4_0's -8d)
    multiplies these, not the float sums of x: then the whole weight meets the same rounded x and the
    rounding errors meet the centred weights, not d*q >= 0 alone. Float sums cost SmolLM2 ~2% decode
    perplexity."""
    sub = xq.shape[0] // out.shape[0]                # 32, or 16
    for b in range(out.shape[0]):
        t = np.int32(0)
        for j in range(sub):
            t += np.int32(xq[b * sub + j])
        out[b] = np.float32(t) * dx[(b * sub) >> 5]
    return out


def scale_dot_numpy(s, r, v):
    """s (rows, nb) f32 or uint16 f16 bits, r a row, v (nb,) f32 -> float32 sum_b scale(s[r, b]) * v[b]."""
    return np.float32((scales_f32_numpy(s[r]) * v).sum(dtype=np.float32))


def min_term_numpy(d, m, r, xsum, offset=-8.0):
    """The min term of row r: scale_dot(m, r, xsum), or offset * scale_dot(d, r, xsum) when m is empty:
    Q4_0's -8, Q5_0's -16 (min_term16)."""
    if m.shape[1]:
        return scale_dot_numpy(m, r, xsum)
    return np.float32(offset) * scale_dot_numpy(d, r, xsum)


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import F32 as _F32, I16 as _I16, I32 as _I32, I64 as _I64
    from kernels.llvm_ir import half_to_f32 as _half_to_f32, row_ptr as _row_ptr, rows_array as _rows_array, vec as _vec

    def _emit_scale_dot(builder, srow, nb, vp, f16):
        """IR for sum_b scale(srow[b]) * vp[b], b < nb: 8 blocks per vector step, then the last nb % 8
        one at a time. srow points at f32 or (f16) i16 scales, vp at f32 values. Returns a float."""
        zero8 = ir.Constant(_vec(_F32, 8), [0.0] * 8)
        eight = ir.Constant(_I64, 8)
        entry = builder.block
        fn = builder.function
        loop, tail = fn.append_basic_block("sdot.loop"), fn.append_basic_block("sdot.tail")
        tloop, done = fn.append_basic_block("sdot.tloop"), fn.append_basic_block("sdot.done")
        steps = builder.ashr(nb, ir.Constant(_I64, 3))
        builder.cbranch(builder.icmp_signed(">", steps, ir.Constant(_I64, 0)), loop, tail)

        builder.position_at_end(loop)
        i = builder.phi(_I64)
        acc = builder.phi(_vec(_F32, 8))
        off = builder.mul(i, eight)
        if f16:
            raw = builder.load(builder.bitcast(builder.gep(srow, [off]), _vec(_I16, 8).as_pointer()), align=2)
            sv = _half_to_f32(builder, raw)
        else:
            sv = builder.load(builder.bitcast(builder.gep(srow, [off]), _vec(_F32, 8).as_pointer()), align=4)
        xv = builder.load(builder.bitcast(builder.gep(vp, [off]), _vec(_F32, 8).as_pointer()), align=4)
        nacc = builder.fadd(acc, builder.fmul(sv, xv, flags=("fast",)), flags=("fast",))
        i2 = builder.add(i, ir.Constant(_I64, 1))
        i.add_incoming(ir.Constant(_I64, 0), entry)
        i.add_incoming(i2, loop)
        acc.add_incoming(zero8, entry)
        acc.add_incoming(nacc, loop)
        builder.cbranch(builder.icmp_signed("<", i2, steps), loop, tail)

        builder.position_at_end(tail)
        vacc = builder.phi(_vec(_F32, 8))
        vacc.add_incoming(zero8, entry)
        vacc.add_incoming(nacc, loop)
        total = builder.extract_element(vacc, ir.Constant(_I32, 0))
        for k in range(1, 8):
            total = builder.fadd(total, builder.extract_element(vacc, ir.Constant(_I32, k)), flags=("fast",))
        start = builder.mul(steps, eight)
        builder.cbranch(builder.icmp_signed("<", start, nb), tloop, done)

        builder.position_at_end(tloop)
        j = builder.phi(_I64)
        t = builder.phi(_F32)
        raw = builder.load(builder.gep(srow, [j]))
        sc = _half_to_f32(builder, raw) if f16 else raw
        nt = builder.fadd(t, builder.fmul(sc, builder.load(builder.gep(vp, [j])), flags=("fast",)), flags=("fast",))
        j2 = builder.add(j, ir.Constant(_I64, 1))
        j.add_incoming(start, tail)
        j.add_incoming(j2, tloop)
        t.add_incoming(total, tail)
        t.add_incoming(nt, tloop)
        builder.cbranch(builder.icmp_signed("<", j2, nb), tloop, done)

        builder.position_at_end(done)
        res = builder.phi(_F32)
        res.add_incoming(total, tail)
        res.add_incoming(nt, tloop)
        return res

    def _is_scales(s):
        return _rows_array(s, types.float32, types.uint16)

    def _is_vec(v):
        return isinstance(v, types.Array) and v.dtype == types.float32 and v.layout == "C"

    @intrinsic
    def _scale_dot_ir(typingctx, s, r, v):
        """sum_b scale(s[r, b]) * v[b]: see scale_dot_numpy."""
        if not (_is_scales(s) and isinstance(r, types.Integer) and _is_vec(v)):
            return None

        def codegen(context, builder, sig, args):
            srow, nb = _row_ptr(context, builder, sig.args[0], args[0], args[1])
            vp = context.make_array(sig.args[2])(context, builder, args[2]).data
            return _emit_scale_dot(builder, srow, nb, vp, s.dtype == types.uint16)

        return types.float32(s, r, v), codegen

    def _min_term_intrinsic(offset):
        """min_term(d, m, r, xsum): the min term of row r of a Q4 or Q5 weight, sum_b m[r, b] * xsum[b],
        or offset * sum_b d[r, b] * xsum[b] when m is empty (Q4_0: -8, Q5_0: -16). An intrinsic rather
        than a numba function with a branch: passing arrays into a branchy jitted helper per row leaves
        numba's reference counting in the loop (atomic increments on the arrays' shared counters), which
        costs more than the row's arithmetic."""
        def min_term(typingctx, d, m, r, xsum):
            return _min_term_typer(offset, d, m, r, xsum)

        min_term.__name__ = min_term.__qualname__ = f"min_term{-int(offset)}"
        return intrinsic(min_term)

    def _min_term_typer(offset, d, m, r, xsum):
        if not (_is_scales(d) and _is_scales(m) and isinstance(r, types.Integer) and _is_vec(xsum)):
            return None

        def codegen(context, builder, sig, args):
            d_v, m_v, r_v, x_v = args
            drow, nbd = _row_ptr(context, builder, sig.args[0], d_v, r_v)
            mrow, nbm = _row_ptr(context, builder, sig.args[1], m_v, r_v)
            vp = context.make_array(sig.args[3])(context, builder, x_v).data
            has_min = builder.icmp_signed("!=", nbm, ir.Constant(_I64, 0))
            with builder.if_else(has_min) as (then, otherwise):
                with then:
                    with_m = _emit_scale_dot(builder, mrow, nbm, vp, m.dtype == types.uint16)
                    then_block = builder.block
                with otherwise:
                    with_d = builder.fmul(_emit_scale_dot(builder, drow, nbd, vp, d.dtype == types.uint16),
                                          ir.Constant(_F32, offset))
                    else_block = builder.block
            res = builder.phi(_F32)
            res.add_incoming(with_m, then_block)
            res.add_incoming(with_d, else_block)
            return res

        return types.float32(d, m, r, xsum), codegen


    @intrinsic
    def _quantize_q8_ir(typingctx, x, xq, dx):
        """quantize_q8_numpy in vector IR, a block of 32 per step: |x| as a bit mask, the block's max by
        halving, then y = x * (127 / max) rounded to the nearest integer, ties to even (np.rint), with
        integer operations: truncate, then step away from zero where the dropped fraction is above one
        half, or exactly one half and the truncated value odd. That is exact on every target, with no
        libm call and no x86-only instruction, and fast-math cannot fold it away (numba compiles with
        fast math, which cancels the usual y + 1.5*2**23 - 1.5*2**23). The loops it replaces were
        unrolled by LLVM and left scalar."""
        from kernels.llvm_ir import I8 as _I8, broadcast as _broadcast, c_array as _c_array, lanes as _lanes, splat as _splat
        if not (_c_array(x, 1, types.float32) and _c_array(xq, 1, types.int8) and _c_array(dx, 1, types.float32)):
            return None

        def codegen(context, builder, sig, args):
            xp, qp, dp = (context.make_array(t)(context, builder, a) for t, a in zip(sig.args, args))
            nb = builder.extract_value(dp.shape, 0)
            v32 = _vec(_F32, 32)
            entry = builder.block
            fn = builder.function
            loop, done = fn.append_basic_block("q8.loop"), fn.append_basic_block("q8.done")
            builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(_I64, 0)), loop, done)
            builder.position_at_end(loop)
            b = builder.phi(_I64)
            off = builder.mul(b, ir.Constant(_I64, 32))
            v = builder.load(builder.bitcast(builder.gep(xp.data, [off]), v32.as_pointer()), align=4)
            a = builder.bitcast(builder.and_(builder.bitcast(v, _vec(_I32, 32)), _splat(_I32, 32, 0x7FFFFFFF)), v32)
            n = 32
            while n > 1:
                n //= 2
                lo = builder.shuffle_vector(a, a, _lanes(*range(n)))
                hi = builder.shuffle_vector(a, a, _lanes(*range(n, 2 * n)))
                a = builder.select(builder.fcmp_ordered(">", hi, lo), hi, lo)
            amax = builder.extract_element(a, ir.Constant(_I32, 0))
            builder.store(builder.fdiv(amax, ir.Constant(_F32, 127.0)), builder.gep(dp.data, [b]))
            pos = builder.fcmp_ordered(">", amax, ir.Constant(_F32, 0.0))
            inv = builder.select(pos, builder.fdiv(ir.Constant(_F32, 127.0), amax), ir.Constant(_F32, 0.0))
            invv = _broadcast(builder, inv, 32)
            y = builder.fmul(v, invv)
            v32i = _vec(_I32, 32)
            t = builder.fptosi(y, v32i)                                  # toward zero, |t| <= 127
            f = builder.fsub(y, builder.sitofp(t, v32))                  # the dropped fraction, exact
            af = builder.bitcast(builder.and_(builder.bitcast(f, v32i), _splat(_I32, 32, 0x7FFFFFFF)), v32)
            half = _splat(_F32, 32, 0.5)
            odd = builder.icmp_signed("!=", builder.and_(t, _splat(_I32, 32, 1)), _splat(_I32, 32, 0))
            up = builder.or_(builder.fcmp_ordered(">", af, half),
                             builder.and_(builder.fcmp_ordered("==", af, half), odd))
            step = builder.select(builder.fcmp_ordered("<", y, _splat(_F32, 32, 0.0)),
                                  _splat(_I32, 32, -1), _splat(_I32, 32, 1))
            q = builder.trunc(builder.add(t, builder.select(up, step, _splat(_I32, 32, 0))), _vec(_I8, 32))
            builder.store(q, builder.bitcast(builder.gep(qp.data, [off]), _vec(_I8, 32).as_pointer()), align=1)
            b2 = builder.add(b, ir.Constant(_I64, 1))
            b.add_incoming(ir.Constant(_I64, 0), entry)
            b.add_incoming(b2, loop)
            builder.cbranch(builder.icmp_signed("<", b2, nb), loop, done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return types.void(x, xq, dx), codegen

    from numba.core.extending import overload as _overload

    @_overload(_q8_blocks, inline="always")
    def _q8_blocks_ov(x, xq, dx):
        if all(isinstance(a, types.Array) and a.layout == "C" for a in (x, xq, dx)):
            return lambda x, xq, dx: _quantize_q8_ir(x, xq, dx)
        return lambda x, xq, dx: _quantize_q8_loops(x, xq, dx)


# scale_dot(s, r, v), min_term(d, m, r, xsum) and min_term16 (Q5's offset): see the numpy twins above.
scale_dot = _scale_dot_ir if NUMBA else None
min_term = _min_term_intrinsic(-8.0) if NUMBA else None
min_term16 = _min_term_intrinsic(-16.0) if NUMBA else None

