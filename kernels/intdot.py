"""Integer dot products for 4-bit weights: activations quantized to int8 per block of 32, as ggml does.

Why: a float kernel spends ~10 vector instructions per 32 weights unpacking nibbles, converting them
to float and multiplying, which makes a Q4 matvec compute-bound, not memory-bound. With x in int8,
the products of one block are two instructions on x86 (pmaddubsw: u8 x s8 -> pairwise i16 sums;
pmaddwd by ones -> i32), then one convert and one fused multiply-add with the block's scale d_w * d_x.

numba cannot express SIMD integer multiply-adds, so `q4_row_dot` is an LLVM intrinsic that builds the
row loop in IR with explicit vector types:
- x86 with AVX2: llvm.x86.avx2.pmadd.ub.sw and llvm.x86.avx2.pmadd.wd (what ggml's AVX2 path uses);
- x86 with AVX-512 VNNI, Q4 only: one vpdpbusd over 64 bytes covers two blocks (I8 stays on AVX2,
  whose sign trick has no 512-bit form);
- any other target (ARM64, x86 without AVX2): the same arithmetic in generic vector IR (zext/sext,
  mul, add), which LLVM lowers for the target. Both are exact in integers, so they agree bit for bit
  on the integer block sums; only the float accumulation order differs.
f16 block scales convert through kernels/llvm_ir.half_to_f32: one instruction where the target has
it, integer operations elsewhere.

Numerics: as llama.cpp's own Q8 rounding (d_x = max|x|/127 per block, nearest integer), including the
min term of Q4_1/Q4_K/Q5_1/Q5_K and Q4_0's -8 offset, which use the block sums of the rounded x. Using
float sums there looks more exact but is worse: the rounding errors then multiply d*q (all >= 0)
instead of the centred weight, which costs SmolLM2 ~2% decode perplexity. The numpy twins round x the
same way.
"""

import numpy as np

from kernels import target
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
def _quantize_q8_numba(x, xq, dx):
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


# ---------------------------------------------------------------- the row dot product

def q4_row_dot_numpy(qs, d, r, xq, dx):
    """sum over blocks b of scale(d[r, b]) * dx[b] * sum_j q_j * xq[32b + j], q the unsigned nibbles of
    row r of qs in the Q4 layout's order (kernels/layouts.md). float32."""
    half = qs.shape[1]
    row = qs[r].reshape(-1, 16).astype(np.int32)
    x = xq.reshape(-1, 32).astype(np.int32)
    isum = ((row & 15) * x[:, :16]).sum(axis=1) + ((row >> 4) * x[:, 16:]).sum(axis=1)   # (nb,) int32
    dr = d[r].view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d[r]
    assert isum.shape[0] * 16 == half
    return np.float32((isum.astype(np.float32) * (dr * dx)).sum(dtype=np.float32))


def i8_row_dot_numpy(q, d, r, xq, dx):
    """sum over blocks b of scale(d[r, b]) * dx[b] * sum_j q[r, 32b + j] * xq[32b + j], q int8 in
    blocks of 32 (the I8 layout with B = 32: Q8_0, Q5_0, Q5_1, Q5_K). float32."""
    row = q[r].reshape(-1, 32).astype(np.int32)
    isum = (row * xq.reshape(-1, 32).astype(np.int32)).sum(axis=1)                       # (nb,) int32
    dr = d[r].view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d[r]
    return np.float32((isum.astype(np.float32) * (dr * dx)).sum(dtype=np.float32))


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import F32 as _F32, I8 as _I8, I16 as _I16, I32 as _I32, I64 as _I64
    from kernels.llvm_ir import half_to_f32 as _half_to_f32, lanes as _lanes, row_ptr as _row_ptr, rows_array as _rows_array, splat as _splat, vec as _vec

    def _block_isum(builder, nib, xv):
        """nib <32 x i8> unsigned 0..15, xv <32 x i8> signed -> <8 x i32> partial sums of nib*xv."""
        if target.AVX2:
            mod = builder.module
            ub = mod.declare_intrinsic("llvm.x86.avx2.pmadd.ub.sw",
                                       fnty=ir.FunctionType(_vec(_I16, 16), [_vec(_I8, 32), _vec(_I8, 32)]))
            wd = mod.declare_intrinsic("llvm.x86.avx2.pmadd.wd",
                                       fnty=ir.FunctionType(_vec(_I32, 8), [_vec(_I16, 16), _vec(_I16, 16)]))
            # |q*x| <= 15*127, so pmaddubsw's saturating i16 pair sums never saturate.
            return builder.call(wd, [builder.call(ub, [nib, xv]), _splat(_I16, 16, 1)])
        p = builder.mul(builder.zext(nib, _vec(_I32, 32)), builder.sext(xv, _vec(_I32, 32)))
        s = builder.add(builder.shuffle_vector(p, p, _lanes(*range(16))),
                        builder.shuffle_vector(p, p, _lanes(*range(16, 32))))
        return builder.add(builder.shuffle_vector(s, s, _lanes(*range(8))),
                           builder.shuffle_vector(s, s, _lanes(*range(8, 16))))

    def _block_isum_i8(builder, w, xv):
        """w, xv <32 x i8> signed -> <8 x i32> partial sums of w*xv."""
        if target.AVX2:
            # pmaddubsw wants one unsigned operand: |w| times x with w's sign (ggml's trick). |w| <= 128
            # and |x| <= 127, so the i16 pair sums (<= 32512) never saturate.
            mod = builder.module
            sign = mod.declare_intrinsic("llvm.x86.avx2.psign.b",
                                         fnty=ir.FunctionType(_vec(_I8, 32), [_vec(_I8, 32), _vec(_I8, 32)]))
            return _block_isum(builder, builder.call(sign, [w, w]), builder.call(sign, [xv, w]))
        p = builder.mul(builder.sext(w, _vec(_I32, 32)), builder.sext(xv, _vec(_I32, 32)))
        s = builder.add(builder.shuffle_vector(p, p, _lanes(*range(16))),
                        builder.shuffle_vector(p, p, _lanes(*range(16, 32))))
        return builder.add(builder.shuffle_vector(s, s, _lanes(*range(8))),
                           builder.shuffle_vector(s, s, _lanes(*range(8, 16))))

    def _scale(builder, drow, dx, b, f16):
        """d[r, b] * dx[b] as a float."""
        draw = builder.load(builder.gep(drow, [b]))
        dsc = _half_to_f32(builder, draw) if f16 else draw
        return builder.fmul(dsc, builder.load(builder.gep(dx, [b])))

    def _pair_term_vnni(builder, qrow, drow, xq, dx, i, f16):
        """Q4 blocks 2i and 2i+1 with one AVX-512 VNNI vpdpbusd over 64 bytes: <16 x float>, lanes 0-7
        block 2i's partial sums times its d*dx, lanes 8-15 block 2i+1's."""
        qp = builder.bitcast(builder.gep(qrow, [builder.mul(i, ir.Constant(_I64, 32))]), _vec(_I8, 32).as_pointer())
        q = builder.load(qp, align=1)                        # 16 bytes of each block
        lo = builder.and_(q, _splat(_I8, 32, 15))
        hi = builder.lshr(q, _splat(_I8, 32, 4))
        # [lo0, hi0, lo1, hi1]: the order of the 64 x values of the two blocks
        nib = builder.shuffle_vector(lo, hi, _lanes(*range(16), *range(32, 48), *range(16, 32), *range(48, 64)))
        xp = builder.bitcast(builder.gep(xq, [builder.mul(i, ir.Constant(_I64, 64))]), _vec(_I8, 64).as_pointer())
        xv = builder.load(xp, align=1)
        v16 = _vec(_I32, 16)
        dp = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(v16, [v16, v16, v16]))
        # unsigned nibbles times signed x, four products per i32 lane; |sum| <= 4*15*127, no overflow
        isum = builder.call(dp, [ir.Constant(v16, [0] * 16), builder.bitcast(nib, v16), builder.bitcast(xv, v16)])
        b0 = builder.shl(i, ir.Constant(_I64, 1))
        s0 = _scale(builder, drow, dx, b0, f16)
        s1 = _scale(builder, drow, dx, builder.add(b0, ir.Constant(_I64, 1)), f16)
        two = builder.insert_element(ir.Constant(_vec(_F32, 2), ir.Undefined), s0, ir.Constant(_I32, 0))
        two = builder.insert_element(two, s1, ir.Constant(_I32, 1))
        scv = builder.shuffle_vector(two, two, _lanes(*[0] * 8, *[1] * 8))
        return builder.fmul(builder.sitofp(isum, _vec(_F32, 16)), scv, flags=("fast",))

    def _block_term(builder, qrow, drow, xq, dx, b, f16, nibbles):
        """The float contribution of block b: <8 x float> partial sums times d[b] * dx[b]. nibbles:
        the Q4 layout (16 bytes per block); else the I8 layout with B = 32 (32 bytes per block)."""
        xp = builder.bitcast(builder.gep(xq, [builder.mul(b, ir.Constant(_I64, 32))]), _vec(_I8, 32).as_pointer())
        if nibbles:
            qp = builder.bitcast(builder.gep(qrow, [builder.mul(b, ir.Constant(_I64, 16))]),
                                 _vec(_I8, 16).as_pointer())
            q = builder.load(qp, align=1)
            lo = builder.and_(q, _splat(_I8, 16, 15))           # elements 0-15 of the block
            hi = builder.lshr(q, _splat(_I8, 16, 4))            # elements 16-31
            nib = builder.shuffle_vector(lo, hi, _lanes(*range(32)))
            isum = _block_isum(builder, nib, builder.load(xp, align=1))
        else:
            qp = builder.bitcast(builder.gep(qrow, [builder.mul(b, ir.Constant(_I64, 32))]),
                                 _vec(_I8, 32).as_pointer())
            isum = _block_isum_i8(builder, builder.load(qp, align=1), builder.load(xp, align=1))
        sc = _scale(builder, drow, dx, b, f16)
        scv = builder.insert_element(ir.Constant(_vec(_F32, 8), ir.Undefined), sc, ir.Constant(_I32, 0))
        scv = builder.shuffle_vector(scv, scv, _lanes(*[0] * 8))
        return builder.fmul(builder.sitofp(isum, _vec(_F32, 8)), scv, flags=("fast",))

    def _row_dot_intrinsic(nibbles):
        """The row dot product over the Q4 layout (nibbles) or the I8 layout with blocks of 32."""

        def row_dot(typingctx, qs, d, r, xq, dx):
            # Rows through llvm_ir.row_ptr: C-contiguous arrays, or rows of neuron records.
            wdtype = types.uint8 if nibbles else types.int8
            if not (_rows_array(qs, wdtype) and _rows_array(d, types.float32, types.uint16)
                    and isinstance(r, types.Integer)
                    and isinstance(xq, types.Array) and xq.dtype == types.int8 and xq.layout == "C"
                    and isinstance(dx, types.Array) and dx.dtype == types.float32 and dx.layout == "C"):
                return None
            f16 = d.dtype == types.uint16

            def codegen(context, builder, sig, args):
                qs_v, d_v, r_v, xq_v, dx_v = args
                xq_a = context.make_array(sig.args[3])(context, builder, xq_v)
                dx_a = context.make_array(sig.args[4])(context, builder, dx_v)
                qrow, _ = _row_ptr(context, builder, sig.args[0], qs_v, r_v)
                drow, nb = _row_ptr(context, builder, sig.args[1], d_v, r_v)
                zero = ir.Constant(_vec(_F32, 8), [0.0] * 8)
                entry = builder.block
                loop = builder.function.append_basic_block("q4dot.loop")
                tail = builder.function.append_basic_block("q4dot.tail")
                done = builder.function.append_basic_block("q4dot.done")
                pairs = builder.ashr(nb, ir.Constant(_I64, 1))
                builder.cbranch(builder.icmp_signed(">", pairs, ir.Constant(_I64, 0)), loop, tail)
                # Two blocks per iteration into two accumulators: one chain of dependent adds would bound
                # the loop by the add latency rather than by throughput.
                builder.position_at_end(loop)
                i = builder.phi(_I64)
                acc0 = builder.phi(_vec(_F32, 8))
                acc1 = builder.phi(_vec(_F32, 8))
                b0 = builder.shl(i, ir.Constant(_I64, 1))
                b1 = builder.add(b0, ir.Constant(_I64, 1))
                if nibbles and target.VNNI512:
                    t = _pair_term_vnni(builder, qrow, drow, xq_a.data, dx_a.data, i, f16)
                    t0_ = builder.shuffle_vector(t, t, _lanes(*range(8)))
                    t1_ = builder.shuffle_vector(t, t, _lanes(*range(8, 16)))
                else:
                    t0_ = _block_term(builder, qrow, drow, xq_a.data, dx_a.data, b0, f16, nibbles)
                    t1_ = _block_term(builder, qrow, drow, xq_a.data, dx_a.data, b1, f16, nibbles)
                n0 = builder.fadd(acc0, t0_, flags=("fast",))
                n1 = builder.fadd(acc1, t1_, flags=("fast",))
                i2 = builder.add(i, ir.Constant(_I64, 1))
                for phi, start, nxt in ((i, ir.Constant(_I64, 0), i2), (acc0, zero, n0), (acc1, zero, n1)):
                    phi.add_incoming(start, entry)
                    phi.add_incoming(nxt, loop)
                builder.cbranch(builder.icmp_signed("<", i2, pairs), loop, tail)
                # An odd block count leaves one block.
                builder.position_at_end(tail)
                t0 = builder.phi(_vec(_F32, 8))
                t1 = builder.phi(_vec(_F32, 8))
                t0.add_incoming(zero, entry)
                t0.add_incoming(n0, loop)
                t1.add_incoming(zero, entry)
                t1.add_incoming(n1, loop)
                acc = builder.fadd(t0, t1, flags=("fast",))
                odd = builder.icmp_signed("!=", builder.and_(nb, ir.Constant(_I64, 1)), ir.Constant(_I64, 0))
                last = builder.sub(nb, ir.Constant(_I64, 1))
                with builder.if_then(odd):
                    extra = builder.fadd(acc, _block_term(builder, qrow, drow, xq_a.data, dx_a.data, last, f16, nibbles),
                                         flags=("fast",))
                    odd_block = builder.block
                merged = builder.phi(_vec(_F32, 8))
                merged.add_incoming(acc, tail)
                merged.add_incoming(extra, odd_block)
                builder.branch(done)
                builder.position_at_end(done)
                total = builder.extract_element(merged, ir.Constant(_I32, 0))
                for k in range(1, 8):
                    total = builder.fadd(total, builder.extract_element(merged, ir.Constant(_I32, k)), flags=("fast",))
                return total

            return types.float32(qs, d, r, xq, dx), codegen
        # Distinct names: numba keys intrinsics and their cached callers partly by name.
        row_dot.__name__ = row_dot.__qualname__ = "q4_row_dot" if nibbles else "i8_row_dot"
        return intrinsic(row_dot)

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

    @intrinsic
    def _min_term_ir(typingctx, d, m, r, xsum):
        """The min term of row r of a Q4 or I8 weight: sum_b m[r, b] * xsum[b], or -8 sum_b d[r, b] *
        xsum[b] when m is empty (Q4_0). An intrinsic rather than a numba function with a branch: passing
        arrays into a branchy jitted helper per row leaves numba's reference counting in the loop (atomic
        increments on the arrays' shared counters), which costs more than the row's arithmetic."""
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
                                          ir.Constant(_F32, -8.0))
                    else_block = builder.block
            res = builder.phi(_F32)
            res.add_incoming(with_m, then_block)
            res.add_incoming(with_d, else_block)
            return res

        return types.float32(d, m, r, xsum), codegen

    # q4_row_dot(qs, d, r, xq, dx): see q4_row_dot_numpy. qs (rows, cols/2) uint8, d (rows, cols/32) f32
    # or uint16 f16 bits, r a row index, xq (cols,) int8, dx (cols/32,) f32; all C-contiguous.
    q4_row_dot = _row_dot_intrinsic(nibbles=True)
    # i8_row_dot(q, d, r, xq, dx): see i8_row_dot_numpy. q (rows, cols) int8, d (rows, cols/32); as above.
    i8_row_dot = _row_dot_intrinsic(nibbles=False)

quantize_q8 = _quantize_q8_numba if NUMBA else quantize_q8_numpy


# ---------------------------------------------------------------- whole rows, min term included
# What the dense matvecs (kernels/matvec.py) and the sparse FFN kernels (kernels/sparse_ffn.py) share;
# their numpy twins are those files' twins.

@jit()
def rounded_block_sums(xq, dx, out):
    """xq (32*nb,) int8, dx (nb,) f32 -> out (nb,) f32: the block sums of the rounded x. The min term (m,
    or Q4_0's -8d) multiplies these, not the float sums of x: then the whole weight meets the same
    rounded x and the rounding errors meet the centred weights, not d*q >= 0 alone. Float sums cost
    SmolLM2 ~2% decode perplexity."""
    for b in range(out.shape[0]):
        t = np.int32(0)
        for j in range(32):
            t += np.int32(xq[b * 32 + j])
        out[b] = np.float32(t) * dx[b]
    return out


def scale_dot_numpy(s, r, v):
    """s (rows, nb) f32 or uint16 f16 bits, r a row, v (nb,) f32 -> float32 sum_b scale(s[r, b]) * v[b]."""
    return np.float32((scales_f32_numpy(s[r]) * v).sum(dtype=np.float32))


def min_term_numpy(d, m, r, xsum):
    """The min term of row r: scale_dot(m, r, xsum), or -8 scale_dot(d, r, xsum) when m is empty (Q4_0)."""
    if m.shape[1]:
        return scale_dot_numpy(m, r, xsum)
    return np.float32(-8.0) * scale_dot_numpy(d, r, xsum)


# scale_dot(s, r, v) and min_term(d, m, r, xsum): see the numpy twins above.
scale_dot = _scale_dot_ir if NUMBA else None
min_term = _min_term_ir if NUMBA else None


@jit(inline=True)
def q4_row(qs, d, m, r, xq, dx, xsum):
    """Row r of a Q4 weight times the rounded x, min term included (m, or -8d when m is empty)."""
    return q4_row_dot(qs, d, r, xq, dx) + min_term(d, m, r, xsum)


@jit(inline=True)
def i8_row(q, d, m, r, xq, dx, xsum):
    """Row r of an I8 weight with blocks of 32 times the rounded x, min term included when m has one
    (an empty m adds nothing: Q8_0 and Q5_0 have no min, unlike Q4_0's -8d)."""
    acc = i8_row_dot(q, d, r, xq, dx)
    if m.shape[1]:
        acc += scale_dot(m, r, xsum)
    return acc
