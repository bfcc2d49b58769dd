"""Integer row dot products of the decode matvecs (kernels/matvec.py, decode_token.py, sparse_ffn.py),
four blocks of 32 per step.

Why four blocks: a row dot stepping one or two blocks at a time pays, per block, a scalar scale load,
a conversion, a broadcast and a horizontal split of the partial sums: ~20 vector operations per 64
weights, which leaves a Q4 matvec compute-bound (as fast from cache as from DRAM), below what one core
can stream. Here one step covers four blocks (128 weights):
  - the integer partial sums come out with four i32 lanes per Q4 block (eight per I8 block), each
    lane a sum of four products: AVX-512 VNNI vpdpbusd, or AVX2 pmaddubsw + pmaddwd, or generic
    vector IR; so no lane ever mixes two blocks;
  - the four blocks' scales are one vector load (f16 converted as one vector), multiplied by
    the four activation scales and spread to the lanes by one shuffle; one multiply-add then
    accumulates all 16 lanes in float.
The last nb % 4 blocks take a step of two and/or one block in the same form.

The activations are prepared once per matvec and shared by every row (`prepare_q4_x`,
`lane_corrections`):
  - Q4 (nibbles): a byte holds element j of its block in its low nibble and element j + 16 in its
    high nibble (kernels/layouts.md), so the 64 weight bytes of four blocks meet two x vectors:
    the four blocks' first halves, then their second halves. `xp` is xq (x rounded to int8 per
    block, kernels/intdot.py) rearranged that way: per group of k blocks (k = 4, then 2 and 1 for
    the tail) the k first halves, then the k second halves. Block b's group starts at byte 32*b, and
    a group of one block is the natural order.
  - Q5: the Q4 layout's nibbles, each value's bit 4 taken from its block's 32-bit word of high bits
    (one shuffle, test and masked move per 16k values) before the same products as Q4; values 0..31.
    A step's nibbles and high words are adjacent in the row: kept at the row's end instead, the high
    words form a second short stream per row that the hardware prefetchers miss (2.6x the time).
  - Q6: the Q4 layout's nibbles, then each value's top two bits from the group's crumb bytes (shifts
    and masks, kernels/layouts.md); values 0..63, less 32 inside the integer products (a second
    vpdpbusd of 32 against x, or a pmaddubsw difference), and one f16 scale per 16 values: the low and
    high vectors' lanes are scaled apart.
  - I8 on VNNI: vpdpbusd multiplies unsigned by signed bytes, so the weights go in as w + 128 (a
    sign-bit flip) and each lane's accumulator starts at -128 * (its four x values' sum): `xc`
    (cols/4,) int32, the exact integer correction. AVX2 takes ggml's sign trick instead (no xc).

Numerics: the integer block sums are exact in every form; the float sum runs in lanes, then a
horizontal sum, so results differ from the numpy twins' (q4_dot_numpy, q5_dot_numpy, i8_dot_numpy) in the last bits
only. The twins take x in natural order: the arrangement is a numba-side matter.

Targets: these are the integer row dots of every numba target. The x86 forms above need AVX2 or
AVX-512 VNNI (kernels/target.py); every other target (x86 without AVX2, AArch64, other architectures)
takes the generic vector IR, which LLVM lowers for it. f16 scales convert through
llvm_ir.half_to_f32: one instruction where the target has it (target.NATIVE_HALF), integer operations
elsewhere. tests/conftest.py's simd_code forces each form on one machine, and tests/test_target.py
runs the twin tests again in a process compiled for a CPU with neither F16C nor AVX2.
"""

import numpy as np

from kernels import dequant, intdot, target
from kernels.backend import NUMBA, jit


def _groups(nb: int):
    """(first block, blocks) of each step over nb blocks: fours, then a two and/or a one."""
    b = 0
    while b < nb:
        k = dequant.step_blocks(nb - b)
        yield b, k
        b += k


def q4_dot_numpy(qs, d, r, xq, dx):
    """sum over blocks b of scale(d[r, b]) * dx[b] * sum_j q_j * xq[32b + j], q the unsigned nibbles of
    row r of qs in the Q4 layout's order (kernels/layouts.md), x in natural order. float32."""
    half = qs.shape[1]
    row = qs[r].reshape(-1, 16).astype(np.int32)
    x = xq.reshape(-1, 32).astype(np.int32)
    isum = ((row & 15) * x[:, :16]).sum(axis=1) + ((row >> 4) * x[:, 16:]).sum(axis=1)   # (nb,) int32
    dr = d[r].view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d[r]
    assert isum.shape[0] * 16 == half
    return np.float32((isum.astype(np.float32) * (dr * dx)).sum(dtype=np.float32))


def i8_dot_numpy(q, d, r, xq, dx):
    """sum over blocks b of scale(d[r, b]) * dx[b] * sum_j q[r, 32b + j] * xq[32b + j], q int8 in
    blocks of 32 (the I8 layout with B = 32: Q8_0, Q5_0, Q5_1, Q5_K). float32."""
    row = q[r].reshape(-1, 32).astype(np.int32)
    isum = (row * xq.reshape(-1, 32).astype(np.int32)).sum(axis=1)                       # (nb,) int32
    dr = d[r].view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d[r]
    return np.float32((isum.astype(np.float32) * (dr * dx)).sum(dtype=np.float32))


def q5_dot_numpy(qs, d, r, xq, dx):
    """q4_dot_numpy for row r of a Q5 weight (qs (rows, 5*cols/32) uint32, kernels/layouts.md): the
    values 0..31 in natural order, x in natural order. float32."""
    nb = d.shape[1]
    q = dequant.q5_values_numpy(qs[r : r + 1], nb)[0].astype(np.int32)                # (nb, 32)
    isum = (q * xq.reshape(-1, 32).astype(np.int32)).sum(axis=1)                         # (nb,) int32
    dr = d[r].view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d[r]
    return np.float32((isum.astype(np.float32) * (dr * dx)).sum(dtype=np.float32))


def q6_dot_numpy(qs, d, r, xq, dx):
    """Row r of a Q6 weight (qs (rows, 3*cols/32) uint64, d (rows, cols/32) uint32 two f16 scales per block,
    kernels/layouts.md): sum over halves h of 16 of scale(h) * dx[block] * sum_j (q_j - 32) * xq_j, x in
    natural order. float32."""
    nb = d.shape[1]
    q = dequant.q6_values_numpy(qs[r : r + 1], nb)[0].astype(np.int32) - 32                # (nb, 32)
    isum = (q * xq.reshape(-1, 32).astype(np.int32)).reshape(nb, 2, 16).sum(axis=2)       # (nb, 2) int32
    s = dequant.q6_scales_numpy(d[r : r + 1])[0] * dx[:, None]                             # (nb, 2) f32
    return np.float32((isum.astype(np.float32) * s).sum(dtype=np.float32))


def prepare_q4_x_numpy(xq, xp):
    """xq (cols,) int8 in natural order -> xp (cols,) int8 in the Q4 step order (see the module doc)."""
    for b, k in _groups(xq.shape[0] // 32):
        blocks = xq[32 * b: 32 * (b + k)].reshape(k, 32)
        xp[32 * b: 32 * b + 16 * k] = blocks[:, :16].reshape(-1)
        xp[32 * b + 16 * k: 32 * (b + k)] = blocks[:, 16:].reshape(-1)
    return xp


def lane_corrections_numpy(xq, xc):
    """xq (cols,) int8 -> xc (cols/4,) int32 = -128 * the sum of each four consecutive values."""
    xc[:] = -128 * xq.reshape(-1, 4).astype(np.int32).sum(axis=1)
    return xc


@jit()
def _prepare_q4_x_numba(xq, xp):
    nb = xq.shape[0] // 32
    b = 0
    while b < nb:
        k = dequant.step_blocks(nb - b)
        for i in range(k):
            src = 32 * (b + i)
            lo = 32 * b + 16 * i
            hi = 32 * b + 16 * k + 16 * i
            for j in range(16):
                xp[lo + j] = xq[src + j]
                xp[hi + j] = xq[src + 16 + j]
        b += k
    return xp


@jit()
def _lane_corrections_numba(xq, xc):
    for lane in range(xc.shape[0]):
        t = np.int32(0)
        for j in range(4):
            t += np.int32(xq[4 * lane + j])
        xc[lane] = np.int32(-128) * t
    return xc


prepare_q4_x = _prepare_q4_x_numba if NUMBA else prepare_q4_x_numpy
lane_corrections = _lane_corrections_numba if NUMBA else lane_corrections_numpy


@jit(inline=True)
def round_x(v, xq, xp, xc, dx, xsum):
    """v (cols,) f32 -> xq, xp (cols,) int8 (natural and Q4 step order), xc (cols/4,) int32 (I8 lane
    corrections), dx and xsum (cols/32,) f32: what the row dots over v read, made once and shared by
    every row (and by both threads of kernels/decode_token.py, each into its own buffers)."""
    intdot.quantize_q8(v, xq, dx)
    intdot.rounded_block_sums(xq, dx, xsum)
    prepare_q4_x(xq, xp)
    lane_corrections(xq, xc)


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import F32 as _F32, I8 as _I8, I16 as _I16, I32 as _I32
    from kernels.llvm_ir import c_array as _c_array, const64 as _c, data as _data, half_to_f32 as _half_to_f32
    from kernels.llvm_ir import lanes as _lanes, to_i64 as _to_i64
    from kernels.llvm_ir import rows_array as _rows_array
    from kernels.llvm_ir import prefetch_line as _prefetch_line, prefetch_target as _target, row_ptr as _row_ptr
    from kernels.llvm_ir import counted_loop as _counted_loop, splat as _splat, vec as _vec

    def _load(builder, base, offset, t, n, align=1):
        """<n x t> loaded from base + offset elements of base's type (unaligned)."""
        return builder.load(builder.bitcast(builder.gep(base, [offset]), _vec(t, n).as_pointer()), align=align)

    def _half(builder, v, lo, n):
        """Lanes lo..lo+n-1 of vector v."""
        return builder.shuffle_vector(v, v, _lanes(*range(lo, lo + n)))

    def _concat(builder, a, b):
        n = a.type.count
        return builder.shuffle_vector(a, b, _lanes(*range(2 * n)))

    def _hsum(builder, v):
        """The float sum of the lanes of v, halving the vector each step."""
        n = v.type.count
        while n > 1:
            n //= 2
            v = builder.fadd(_half(builder, v, 0, n), _half(builder, v, n, n), flags=("fast",))
        return builder.extract_element(v, ir.Constant(_I32, 0))

    def _pairs_i16(builder, v):
        """<2n x i16> -> <n x i16>: sums of adjacent lanes (no overflow for the bounds below)."""
        n = v.type.count // 2
        return builder.add(builder.shuffle_vector(v, v, _lanes(*range(0, 2 * n, 2))),
                           builder.shuffle_vector(v, v, _lanes(*range(1, 2 * n, 2))))

    def _quads_i32(builder, v16):
        """<4n x i16> -> <n x i32>: sums of each four adjacent lanes."""
        p = _pairs_i16(builder, v16)
        p32 = builder.sext(p, _vec(_I32, p.type.count))
        n = p.type.count // 2
        return builder.add(builder.shuffle_vector(p32, p32, _lanes(*range(0, 2 * n, 2))),
                           builder.shuffle_vector(p32, p32, _lanes(*range(1, 2 * n, 2))))

    def _x86(builder, name, ret, *args):
        fn = builder.module.declare_intrinsic(name, fnty=ir.FunctionType(ret, [a.type for a in args]))
        return builder.call(fn, list(args))

    def _maddubs(builder, u, s):
        """u (unsigned) x s (signed) bytes -> i16 pair sums: pmaddubsw, 16 or 32 bytes."""
        n = u.type.count
        name = "llvm.x86.avx2.pmadd.ub.sw" if n == 32 else "llvm.x86.ssse3.pmadd.ub.sw.128"
        return _x86(builder, name, _vec(_I16, n // 2), u, s)

    def _madd_ones(builder, v16):
        """<2n x i16> -> <n x i32> pair sums: pmaddwd by ones."""
        n = v16.type.count
        name = "llvm.x86.avx2.pmadd.wd" if n == 16 else "llvm.x86.sse2.pmadd.wd"
        return _x86(builder, name, _vec(_I32, n // 2), v16, _splat(_I16, n, 1))

    def _isum_q4(builder, lo, hi, xl, xh):
        """lo, hi <n x i8> unsigned values (Q4 nibbles 0..15, Q5 values 0..31), xl, xh <n x i8> signed, n in
        16, 32, 64 -> <n/4 x i32>: lane l = the sum over its four bytes of lo*xl + hi*xh (|lane| <=
        8*31*128: no overflow anywhere)."""
        n = lo.type.count
        if target.VNNI512 and n == 64:
            v16 = _vec(_I32, 16)
            acc = _x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, ir.Constant(v16, [0] * 16),
                       builder.bitcast(lo, v16), builder.bitcast(xl, v16))
            return _x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, acc,
                        builder.bitcast(hi, v16), builder.bitcast(xh, v16))
        if target.AVX2:
            if n == 64:
                return _concat(builder, *(_isum_q4(builder, *(_half(builder, v, h, 32) for v in (lo, hi, xl, xh)))
                                          for h in (0, 32)))
            # pair sums of lo*xl plus those of hi*xh: |.| <= 4*31*128, within pmaddubsw's i16
            return _madd_ones(builder, builder.add(_maddubs(builder, lo, xl), _maddubs(builder, hi, xh)))
        t = _vec(_I16, n)
        p = builder.add(builder.mul(builder.zext(lo, t), builder.sext(xl, t)),
                        builder.mul(builder.zext(hi, t), builder.sext(xh, t)))
        return _quads_i32(builder, p)

    def _isum_q6(builder, v, x):
        """v <n x i8> unsigned values 0..63, x <n x i8> signed, n in 16, 32, 64 -> <n/4 x i32>: lane l = the
        sum over its four bytes of (v - 32) * x. VNNI takes v*x less 32*x, two vpdpbusd (the second
        depends on x only, so the rows of a tile share it); AVX2 subtracts the i16 pair sums, which
        stay within |.| <= 2*63*128."""
        n = v.type.count
        if target.VNNI512 and n == 64:
            v16 = _vec(_I32, 16)
            zero = ir.Constant(v16, [0] * 16)
            xv = builder.bitcast(x, v16)
            prod = _x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, zero, builder.bitcast(v, v16), xv)
            off = _x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, zero,
                       builder.bitcast(_splat(_I8, 64, 32), v16), xv)
            return builder.sub(prod, off)
        if target.AVX2:
            if n == 64:
                return _concat(builder, *(_isum_q6(builder, _half(builder, v, h, 32), _half(builder, x, h, 32))
                                          for h in (0, 32)))
            return _madd_ones(builder, builder.sub(_maddubs(builder, v, x), _maddubs(builder, _splat(_I8, n, 32), x)))
        t = _vec(_I16, n)
        p = builder.mul(builder.sub(builder.zext(v, t), _splat(_I16, n, 32)), builder.sext(x, t))
        return _quads_i32(builder, p)

    def _isum_i8(builder, w, x, xc):
        """w, x <n x i8> signed, n in 32, 64 -> <n/4 x i32>: lane l = the sum of its four products.
        xc: the lane corrections (<16 x i32>, VNNI with n = 64 only, else None)."""
        n = w.type.count
        if target.VNNI512 and n == 64:
            v16 = _vec(_I32, 16)
            u = builder.xor(w, _splat(_I8, 64, -128))          # w + 128, as unsigned bytes
            return _x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, xc, builder.bitcast(u, v16),
                        builder.bitcast(x, v16))
        if target.AVX2:
            if n == 64:
                return _concat(builder, *(_isum_i8(builder, _half(builder, w, h, 32), _half(builder, x, h, 32), None)
                                          for h in (0, 32)))
            # ggml's sign trick: |w| (unsigned) times x with w's sign; |w| <= 128, |x| <= 127, so the
            # i16 pair sums (<= 32512) never saturate.
            sign = builder.module.declare_intrinsic("llvm.x86.avx2.psign.b",
                                                    fnty=ir.FunctionType(_vec(_I8, 32), [_vec(_I8, 32)] * 2))
            return _madd_ones(builder, _maddubs(builder, builder.call(sign, [w, w]), builder.call(sign, [x, w])))
        t = _vec(_I16, n)
        prod = builder.mul(builder.sext(w, t), builder.sext(x, t))     # |.| <= 16256
        pairs = builder.sext(_pairs_i16(builder, prod), _vec(_I32, n // 2))
        m = n // 4
        return builder.add(builder.shuffle_vector(pairs, pairs, _lanes(*range(0, 2 * m, 2))),
                           builder.shuffle_vector(pairs, pairs, _lanes(*range(1, 2 * m, 2))))

    def _scales(builder, drow, dx, b, k, f16):
        """<k x float>: scale(d[r, b + i]) * dx[b + i] for i < k."""
        if f16:
            dv = _half_to_f32(builder, _load(builder, drow, b, _I16, k, align=2))
        else:
            dv = _load(builder, drow, b, _F32, k, align=4)
        return builder.fmul(dv, _load(builder, dx, b, _F32, k, align=4), flags=("fast",))

    def _spread(builder, s, lanes_per_block, first, count):
        """<count*lanes_per_block x float>: scales first..first+count-1 of s, each repeated."""
        return builder.shuffle_vector(s, s, _lanes(*[first + i for i in range(count) for _ in range(lanes_per_block)]))

    def _fma(builder, isum, scales, acc):
        return builder.fadd(acc, builder.fmul(builder.sitofp(isum, _vec(_F32, isum.type.count)), scales,
                                              flags=("fast",)), flags=("fast",))

    def _halves_step(builder, lo, hi, xp, drow, dx, b, k, f16):
        """lo, hi <16k x i8> the values (0..31) of blocks b..b+k-1 in the Q4 step order (first halves, then
        second halves) -> <4k x float> scaled partial sums."""
        xoff = builder.mul(b, _c(32))
        xl = _load(builder, xp, xoff, _I8, 16 * k)
        xh = _load(builder, xp, builder.add(xoff, _c(16 * k)), _I8, 16 * k)
        isum = _isum_q4(builder, lo, hi, xl, xh)
        s = _scales(builder, drow, dx, b, k, f16)
        return builder.fmul(builder.sitofp(isum, _vec(_F32, 4 * k)), _spread(builder, s, 4, 0, k), flags=("fast",))

    def _q4_step(builder, qrow, xp, drow, dx, b, k, f16):
        """Blocks b..b+k-1 of a Q4 row (k in 4, 2, 1) -> <4k x float> scaled partial sums."""
        w = _load(builder, qrow, builder.mul(b, _c(16)), _I8, 16 * k)
        lo = builder.and_(w, _splat(_I8, 16 * k, 15))
        hi = builder.lshr(w, _splat(_I8, 16 * k, 4))
        return _halves_step(builder, lo, hi, xp, drow, dx, b, k, f16)

    def _high_bits(builder, h, k, second):
        """<16k x i8>: 16 where element j (or j + 16, second half) of each of k blocks has bit 4 set, else
        0; h <4k x i8> the k blocks' high-bit words as bytes (bit j of word i: byte 4i + j//8, bit j%8)."""
        idx = [4 * i + 2 * second + (j >> 3) for i in range(k) for j in range(16)]
        spread = builder.shuffle_vector(h, h, _lanes(*idx))
        masks = ir.Constant(_vec(_I8, 16 * k), [1 << (j & 7) for _ in range(k) for j in range(16)])
        hit = builder.icmp_unsigned("!=", builder.and_(spread, masks), _splat(_I8, 16 * k, 0))
        return builder.select(hit, _splat(_I8, 16 * k, 16), _splat(_I8, 16 * k, 0))

    def _q5_step(builder, qrow, xp, drow, dx, b, k, f16):
        """Blocks b..b+k-1 of a Q5 row (k in 4, 2, 1; qrow its i8 pointer) -> <4k x float> scaled partial
        sums: the Q4 step with bit 4 of each value from its block's high-bit word. The group's 16k nibble
        bytes and k words sit together at byte 20b (kernels/layouts.md): one stream per row."""
        w = _load(builder, qrow, builder.mul(b, _c(20)), _I8, 16 * k)
        h = _load(builder, qrow, builder.add(builder.mul(b, _c(20)), _c(16 * k)), _I8, 4 * k)
        lo = builder.or_(builder.and_(w, _splat(_I8, 16 * k, 15)), _high_bits(builder, h, k, 0))
        hi = builder.or_(builder.lshr(w, _splat(_I8, 16 * k, 4)), _high_bits(builder, h, k, 1))
        return _halves_step(builder, lo, hi, xp, drow, dx, b, k, f16)

    def _q6_step(builder, qrow, xp, drow, dx, b, k):
        """Blocks b..b+k-1 of a Q6 row (k in 4, 2, 1; qrow its i8 pointer, drow its scales as i16) -> <4k x
        float> scaled partial sums. The group's 16k nibble bytes and 8k crumb bytes sit together at byte
        24b (kernels/layouts.md); the crumbs' bit pairs 0, 1, 2, 3 are bits 4-5 of the low vector's first
        and second 8k values and of the high vector's, so four shifts and masks place them. Each half
        block has its own scale: the low and high vectors' lanes are scaled apart."""
        n = 16 * k
        at = builder.mul(b, _c(24))
        w = _load(builder, qrow, at, _I8, n)
        c = _load(builder, qrow, builder.add(at, _c(n)), _I8, 8 * k)
        top = _splat(_I8, 8 * k, 0x30)

        def bits(shift):
            v = builder.shl(c, _splat(_I8, 8 * k, shift)) if shift > 0 else (
                builder.lshr(c, _splat(_I8, 8 * k, -shift)) if shift < 0 else c)
            return builder.and_(v, top)

        lo = builder.or_(builder.and_(w, _splat(_I8, n, 15)), _concat(builder, bits(4), bits(2)))
        hi = builder.or_(builder.lshr(w, _splat(_I8, n, 4)), _concat(builder, bits(0), bits(-2)))
        xoff = builder.mul(b, _c(32))
        xl = _load(builder, xp, xoff, _I8, n)
        xh = _load(builder, xp, builder.add(xoff, _c(n)), _I8, n)
        dv = _half_to_f32(builder, _load(builder, drow, builder.mul(b, _c(2)), _I16, 2 * k, align=2))
        dxv = _load(builder, dx, b, _F32, k, align=4)
        s = builder.fmul(dv, builder.shuffle_vector(dxv, dxv, _lanes(*[i // 2 for i in range(2 * k)])), flags=("fast",))
        slo = builder.shuffle_vector(s, s, _lanes(*[2 * i for i in range(k) for _ in range(4)]))
        shi = builder.shuffle_vector(s, s, _lanes(*[2 * i + 1 for i in range(k) for _ in range(4)]))
        flo = builder.sitofp(_isum_q6(builder, lo, xl), _vec(_F32, 4 * k))
        fhi = builder.sitofp(_isum_q6(builder, hi, xh), _vec(_F32, 4 * k))
        return builder.fadd(builder.fmul(flo, slo, flags=("fast",)), builder.fmul(fhi, shi, flags=("fast",)),
                            flags=("fast",))

    def _i8_step(builder, qrow, xq, xc, drow, dx, b, k, f16):
        """Blocks b..b+k-1 of an I8 row with blocks of 32 (k in 4, 2, 1) -> a list of <16 x float> (or
        one <8 x float> for k = 1) scaled partial sums."""
        s = _scales(builder, drow, dx, b, k, f16)
        out = []
        for h in range(0, k, 2):
            n = 64 if k >= 2 else 32
            off = builder.mul(builder.add(b, _c(h)), _c(32))
            xcv = _load(builder, xc, builder.ashr(off, _c(2)), _I32, 16, align=4) if target.VNNI512 and n == 64 else None
            isum = _isum_i8(builder, _load(builder, qrow, off, _I8, n), _load(builder, xq, off, _I8, n), xcv)
            out.append(builder.fmul(builder.sitofp(isum, _vec(_F32, n // 4)),
                                    _spread(builder, s, 8, h, n // 32), flags=("fast",)))
        return out

    def _when(builder, cond, make, n):
        """make() -> n floats, evaluated only when cond holds; 0.0 each otherwise."""
        before = builder.block
        with builder.if_then(cond):
            vals = make()
            inside = builder.block
        out = []
        for v in vals:
            p = builder.phi(_F32)
            p.add_incoming(ir.Constant(_F32, 0.0), before)
            p.add_incoming(v, inside)
            out.append(p)
        return out

    def _emit_rows(builder, nb, parts, step, targets=(), lines=1):
        """The float sums over rows of nb blocks: step(b, k) gives, per row, the scaled partial sums of
        blocks b..b+k-1 as vectors (`parts` of them per row for k = 4, each <16 x float>); fours in a
        loop, each part into its own accumulator, then a step of two and/or one for the last nb % 4
        blocks. Rows stepped together share their x loads (LLVM merges the identical loads). targets:
        (i8 pointer, bytes) of rows to prefetch, `lines` 64-byte lines of each per loop iteration (what
        the step reads of its own row): the rows a sparse kernel reads next sit at scattered addresses,
        where the hardware prefetchers find no stream (kernels/gather.py explains), and a dense matvec's
        next rows begin on pages that the prefetchers have not yet entered."""
        fours = builder.ashr(nb, _c(2))
        zero = ir.Constant(_vec(_F32, 16), [0.0] * 16)

        def body(g, *accs):
            vals = [v for row in step(builder.mul(g, _c(4)), 4) for v in row]
            # added before the prefetch's branches, in the step's basic block, where LLVM fuses the
            # step's last multiply with the add
            accs = [builder.fadd(a, v, flags=("fast",)) for a, v in zip(accs, vals)]
            _prefetch_line(builder, targets, g, lines)
            return accs

        rows = step.rows
        accs = _counted_loop(builder, fours, [zero] * (parts * rows), body, "rowdot.loop")
        b2 = builder.mul(fours, _c(4))
        rem = builder.sub(nb, b2)
        has2 = builder.icmp_signed(">=", rem, _c(2))
        has1 = builder.icmp_signed("!=", builder.and_(rem, _c(1)), _c(0))
        t2 = _when(builder, has2, lambda: [_hsum(builder, row[0]) for row in step(b2, 2)], rows)
        t1 = _when(builder, has1, lambda: [_hsum(builder, row[0]) for row in step(builder.sub(nb, _c(1)), 1)], rows)
        out = []
        for i in range(rows):
            acc = accs[i * parts]
            for a in accs[i * parts + 1:(i + 1) * parts]:
                acc = builder.fadd(acc, a, flags=("fast",))
            out.append(builder.fadd(_hsum(builder, acc), builder.fadd(t2[i], t1[i], flags=("fast",)), flags=("fast",)))
        return out

    class _Step:
        """step(b, k) for _emit_rows over `rows` rows: one_row(i, b, k) -> row i's partial sums."""

        def __init__(self, rows, one_row):
            self.rows, self.one_row = rows, one_row

        def __call__(self, b, k):
            return [self.one_row(i, b, k) for i in range(self.rows)]

    # The forms' row dtypes; s8 and s4 are the 2:4 layouts (kernels/sparse24.py, steps in rowdot24.py),
    # whose blocks are 64 columns
    _WDTYPES = {"q4": types.uint8, "i8": types.int8, "q5": types.uint32, "q6": types.uint64,
                "s8": types.int16, "s4": types.int32}
    # 64-byte lines a four-block step reads of its row: 64 bytes of Q4, 80 of Q5, 96 of Q6, 128 of I8,
    # 160 of S8, 96 of S4
    _STEP_LINES = {"q4": 1, "q5": 2, "q6": 2, "i8": 2, "s8": 3, "s4": 2}
    # partial-sum vectors per row of a four-block step
    _PARTS = {"i8": 2, "s8": 2, "s4": 2}
    # scale dtypes per form: float32 or f16 bits, Q6's two f16 per block as one uint32
    _DDTYPES = {"q6": (types.uint32,)}
    _DDEFAULT = (types.float32, types.uint16)

    def _layout_step(form, builder, qrow, xq, xp, xc, drow, dx, f16):
        """step(b, k) of one row of the form's layout: a list of its partial-sum vectors."""
        if form == "q4":
            return lambda b, k: [_q4_step(builder, qrow, xp, drow, dx, b, k, f16)]
        if form == "q5":
            qbytes = builder.bitcast(qrow, _I8.as_pointer())
            return lambda b, k: [_q5_step(builder, qbytes, xp, drow, dx, b, k, f16)]
        if form == "q6":
            qbytes = builder.bitcast(qrow, _I8.as_pointer())
            dhalves = builder.bitcast(drow, _I16.as_pointer())
            return lambda b, k: [_q6_step(builder, qbytes, xp, dhalves, dx, b, k)]
        if form in ("s8", "s4"):
            from kernels import rowdot24
            return rowdot24.step(form, builder, builder.bitcast(qrow, _I8.as_pointer()), xq, xc, drow, dx, f16)
        return lambda b, k: _i8_step(builder, qrow, xq, xc, drow, dx, b, k, f16)

    def _dots_intrinsic(form, nmats, prefetch):
        """Row dots of row j of nmats weights of one layout, sharing the x loads; with prefetch, also
        row jp of each weight and its scales (jp < 0: none). Arguments: (w, d) per weight, j, [jp,]
        xq, xp, xc, dx: xp (Q4 step order) is read for the Q4, Q5 and Q6 layouts, xq and xc for I8 (see the
        forms below)."""
        wdtype = _WDTYPES[form]

        def typer(args):
            ws, ds = args[0:2 * nmats:2], args[1:2 * nmats:2]
            rest = args[2 * nmats:]
            j, jp = rest[0], (rest[1] if prefetch else None)
            xq, xp, xc, dx = rest[-4:]
            if not (all(_rows_array(w, wdtype) for w in ws)
                    and all(_rows_array(d, *_DDTYPES.get(form, _DDEFAULT)) for d in ds)
                    and isinstance(j, types.Integer) and (jp is None or isinstance(jp, types.Integer))
                    and _c_array(xq, 1, types.int8) and _c_array(xp, 1, types.int8)
                    and _c_array(xc, 1, types.int32) and _c_array(dx, 1, types.float32)):
                return None
            f16s = [d.dtype == types.uint16 for d in ds]

            def codegen(context, builder, sig, vals):
                k = 2 * nmats
                j_v = vals[k]
                xq_v, xp_v, xc_v, dx_v = (_data(context, builder, sig.args[i], vals[i])
                                          for i in range(len(vals) - 4, len(vals)))
                rows, targets = [], []
                for m in range(nmats):
                    qrow, _ = _row_ptr(context, builder, sig.args[2 * m], vals[2 * m], j_v)
                    drow, nb = _row_ptr(context, builder, sig.args[2 * m + 1], vals[2 * m + 1], j_v)
                    rows.append((qrow, drow, f16s[m]))
                    if prefetch:
                        for i in (2 * m, 2 * m + 1):
                            targets.append(_target(context, builder, sig.args[i], vals[i], vals[k + 1]))
                steps = [_layout_step(form, builder, q, xq_v, xp_v, xc_v, dr, dx_v, f16) for q, dr, f16 in rows]
                step = _Step(nmats, lambda i, b, kk: steps[i](b, kk))
                out = _emit_rows(builder, nb, _PARTS.get(form, 1), step, targets, _STEP_LINES[form])
                return out[0] if nmats == 1 else context.make_tuple(builder, sig.return_type, out)

            ret = types.float32 if nmats == 1 else types.UniTuple(types.float32, nmats)
            return ret(*args), codegen

        # numba's intrinsics take no *args: one explicit signature per form.
        if nmats == 2:
            def dots(typingctx, w0, d0, w1, d1, j, jp, xq, xp, xc, dx):
                return typer((w0, d0, w1, d1, j, jp, xq, xp, xc, dx))
        elif prefetch:
            def dots(typingctx, w0, d0, j, jp, xq, xp, xc, dx):
                return typer((w0, d0, j, jp, xq, xp, xc, dx))
        else:
            def dots(typingctx, w0, d0, j, xq, xp, xc, dx):
                return typer((w0, d0, j, xq, xp, xc, dx))
        dots.__name__ = dots.__qualname__ = f"{form}_dots{nmats}{'p' if prefetch else ''}"
        return intrinsic(dots)

    def tile_intrinsic(form, R, T):
        """Row dots of R rows of one weight with T tokens of x, sharing each row's weight loads across the
        tokens and each token's x loads across the rows (LLVM merges the identical loads and nibble
        splits): the register tile of the prefill GEMM (kernels/gemm.py). Arguments: w, d, r (first row),
        t (first token), then x as round_x makes it, one row per token: xq, xp (n, cols) int8, xc
        (n, cols/4) int32, dx (n, cols/32) f32. Returns R*T floats, row i and token j at i*T + j, min
        terms excluded."""
        wdtype = _WDTYPES[form]

        def tile(typingctx, w, d, r, t, xq, xp, xc, dx):
            if not (_rows_array(w, wdtype) and _rows_array(d, *_DDTYPES.get(form, _DDEFAULT))
                    and isinstance(r, types.Integer) and isinstance(t, types.Integer)
                    and _c_array(xq, 2, types.int8) and _c_array(xp, 2, types.int8)
                    and _c_array(xc, 2, types.int32) and _c_array(dx, 2, types.float32)):
                return None
            f16 = d.dtype == types.uint16

            def codegen(context, builder, sig, vals):
                def rows_of(i, first, count):
                    return [_row_ptr(context, builder, sig.args[i], vals[i],
                                     builder.add(_to_i64(builder, first), _c(k)))[0] for k in range(count)]

                qrows, drows = rows_of(0, vals[2], R), rows_of(1, vals[2], R)
                nb = _row_ptr(context, builder, sig.args[1], vals[1], vals[2])[1]
                xqs, xps, xcs, dxs = (rows_of(i, vals[3], T) for i in range(4, 8))
                steps = [_layout_step(form, builder, qrows[p // T], xqs[p % T], xps[p % T], xcs[p % T],
                                      drows[p // T], dxs[p % T], f16) for p in range(R * T)]
                step = _Step(R * T, lambda p, b, kk: steps[p](b, kk))
                out = _emit_rows(builder, nb, _PARTS.get(form, 1), step)
                return context.make_tuple(builder, sig.return_type, out)

            return types.UniTuple(types.float32, R * T)(w, d, r, t, xq, xp, xc, dx), codegen

        tile.__name__ = tile.__qualname__ = f"{form}_tile{R}x{T}"
        return intrinsic(tile)

    # The forms. Each product is sum over blocks b of scale(d[r, b]) * dx[b] * sum_j q[r, 32b + j] *
    # xq[32b + j] (q4_dot_numpy, i8_dot_numpy), min terms excluded, for w
    # (rows, cols/2) uint8 nibbles (Q4), (rows, 5*cols/32) uint32 nibbles and high bits (Q5), (rows,
    # 3*cols/32) uint64 nibbles and top bits (Q6, d (rows, cols/32) uint32: two f16 per block) or
    # (rows, cols) int8 in blocks of 32 (I8), d (rows, cols/32) f32
    # or uint16 f16 bits, and x as round_x makes it: xq (cols,) int8 natural order, xp (cols,) int8 Q4
    # step order (read for Q4, Q5 and Q6), xc (cols/4,) int32 lane corrections (read for I8 on VNNI), dx (cols/32,) f32.
    # The 2:4 forms (kernels/rowdot24.py) take w (rows, 20*cols/64) int16 (S8) or (rows, 6*cols/64) int32
    # (S4) with d (rows, cols/64), the same x, and read xq (and xc on VNNI).
    # One row: q4_dot(w, d, r, xq, xp, xc, dx), i8_dot(...): the dense matvecs' (see row below).
    # For the sparse FFN (kernels/sparse_ffn.py), prefetching row jp: (gate row j . x, up row j . x) of
    # two weights of one layout, q4_gu(gw, gd, uw, ud, j, jp, xq, xp, xc, dx), i8_gu(...), q5_gu(...);
    # one row, q4_row1p(w, d, j, jp, xq, xp, xc, dx), i8_row1p(...), q5_row1p(...).
    q4_dot, i8_dot, q5_dot, q6_dot, s8_dot, s4_dot = (_dots_intrinsic(f, 1, False)
                                                      for f in ("q4", "i8", "q5", "q6", "s8", "s4"))
    q4_gu, i8_gu, q5_gu, q6_gu = (_dots_intrinsic(f, 2, True) for f in ("q4", "i8", "q5", "q6"))
    q4_row1p, i8_row1p, q5_row1p, q6_row1p, s8_row1p, s4_row1p = (_dots_intrinsic(f, 1, True)
                                                                  for f in ("q4", "i8", "q5", "q6", "s8", "s4"))


def row(qs, d, m, r, xq, xp, xc, dx, xsum):
    """Row r of a Q4 (qs uint8), Q5 (qs uint32), Q6 (qs uint64), 32-block I8 (qs int8) or 2:4 (qs int16 S8, int32
    S4) weight times x rounded by round_x, min term included (xsum (cols/32,) f32 the rounded block sums); numba picks the formula by qs's dtype. The one
    row product of the dense matvecs (kernels/matvec.py), the one-region decode (kernels/decode_token.py),
    the sparse FFN's rows (kernels/sparse_ffn.py) and the prefill GEMM (kernels/gemm.py), so that all of
    them round alike."""


def row_ahead(qs, d, m, r, ahead, xq, xp, xc, dx, xsum):
    """`row`, prefetching row r + ahead of qs and d (none when that is past the last row) as it goes: the
    dense matvecs' row loops, whose next rows start on new pages where the hardware prefetchers ramp up
    again (one stream per array and thread)."""


@jit(inline=True)
def ahead_row(r, ahead, rows):
    """The row row_ahead prefetches while it reads row r: r + ahead, or -1 (none) past the last row."""
    return r + ahead if r + ahead < rows else -1


@jit(inline=True)
def rows_ahead(row_bytes):
    """How far ahead row_ahead prefetches: at least 4 KiB (a page) of rows, at least two rows."""
    return max(2, 4096 // max(1, row_bytes))


def min_part(qs, d, m, r, xsum):
    """The min term of row r that `row` adds: for Q4 (qs uint8) m, or Q4_0's -8d, times the rounded block
    sums (intdot.min_term); for Q5 (qs uint32) m or Q5_0's -16d (intdot.min_term16); for I8 (qs int8) m times them, or 0 when the format has no m;
    0 for Q6 (qs uint64) and the 2:4 layouts (int16, int32), whose offsets are inside their products."""


if NUMBA:
    from numba.core.extending import overload

    @overload(min_part, inline="always", jit_options={"fastmath": True})
    def _min_part_ov(qs, d, m, r, xsum):
        if qs.dtype == types.uint8:
            return lambda qs, d, m, r, xsum: intdot.min_term(d, m, r, xsum)
        if qs.dtype == types.uint32:
            return lambda qs, d, m, r, xsum: intdot.min_term16(d, m, r, xsum)
        if qs.dtype in (types.uint64, types.int16, types.int32):
            return lambda qs, d, m, r, xsum: np.float32(0.0)
        if qs.dtype == types.int8:
            def i8(qs, d, m, r, xsum):
                return intdot.scale_dot(m, r, xsum) if m.shape[1] else np.float32(0.0)
            return i8
        return None

    @overload(row_ahead, inline="always", jit_options={"fastmath": True})
    def _row_ahead_ov(qs, d, m, r, ahead, xq, xp, xc, dx, xsum):
        form = {types.uint8: q4_row1p, types.int8: i8_row1p, types.uint32: q5_row1p,
                types.uint64: q6_row1p, types.int16: s8_row1p, types.int32: s4_row1p}.get(qs.dtype)
        if form is None:
            return None

        def impl(qs, d, m, r, ahead, xq, xp, xc, dx, xsum):
            return form(qs, d, r, ahead_row(r, ahead, qs.shape[0]), xq, xp, xc, dx) + min_part(qs, d, m, r, xsum)
        return impl

    @overload(row, inline="always", jit_options={"fastmath": True})
    def _row_ov(qs, d, m, r, xq, xp, xc, dx, xsum):
        if qs.dtype == types.uint8:
            return lambda qs, d, m, r, xq, xp, xc, dx, xsum: (q4_dot(qs, d, r, xq, xp, xc, dx)
                                                              + min_part(qs, d, m, r, xsum))
        if qs.dtype == types.int8:
            return lambda qs, d, m, r, xq, xp, xc, dx, xsum: (i8_dot(qs, d, r, xq, xp, xc, dx)
                                                              + min_part(qs, d, m, r, xsum))
        if qs.dtype == types.uint32:
            return lambda qs, d, m, r, xq, xp, xc, dx, xsum: (q5_dot(qs, d, r, xq, xp, xc, dx)
                                                              + min_part(qs, d, m, r, xsum))
        if qs.dtype == types.uint64:
            return lambda qs, d, m, r, xq, xp, xc, dx, xsum: q6_dot(qs, d, r, xq, xp, xc, dx)
        if qs.dtype == types.int16:
            return lambda qs, d, m, r, xq, xp, xc, dx, xsum: s8_dot(qs, d, r, xq, xp, xc, dx)
        if qs.dtype == types.int32:
            return lambda qs, d, m, r, xq, xp, xc, dx, xsum: s4_dot(qs, d, r, xq, xp, xc, dx)
        return None
