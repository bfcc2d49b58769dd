"""Small LLVM IR building blocks shared by the hand-written intrinsics (kernels/intdot.py, rowdot.py,
gather.py, records.py, sync.py, lanetile.py, input_sparse.py): types, constants, broadcasts, counted loops,
array checks and pointers, half conversion, prefetches.

Needs numba (llvmlite): import it only where kernels.backend.NUMBA holds.
"""

from llvmlite import ir
from numba import types

from kernels import target

I8, I16, I32, I64, F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def vec(t, n):
    return ir.VectorType(t, n)


def const64(v):
    return ir.Constant(I64, v)


def splat(t, n, v):
    """The constant vector <n x t> of v in every lane."""
    return ir.Constant(vec(t, n), [v] * n)


def broadcast(builder, v, n):
    """<n x type(v)> with the scalar value v in every lane."""
    t = vec(v.type, n)
    one = builder.insert_element(ir.Constant(t, ir.Undefined), v, ir.Constant(I32, 0))
    return builder.shuffle_vector(one, ir.Constant(t, ir.Undefined), ir.Constant(vec(I32, n), [0] * n))


def counted_loop(builder, n, inits, body, name="loop"):
    """for i in range(n) (n an i64), carrying the values `inits` (body(i, *values) -> the new values; a body
    carrying nothing may return None); returns the values after the loop (the inits when n <= 0)."""
    entry = builder.block
    fn = builder.function
    loop, after = fn.append_basic_block(name), fn.append_basic_block(name + ".after")
    builder.cbranch(builder.icmp_signed(">", n, const64(0)), loop, after)
    builder.position_at_end(loop)
    i = builder.phi(I64)
    carried = [builder.phi(v.type) for v in inits]
    new = body(i, *carried) or ()
    i2 = builder.add(i, const64(1))
    end = builder.block
    i.add_incoming(const64(0), entry)
    i.add_incoming(i2, end)
    for phi, init, nv in zip(carried, inits, new):
        phi.add_incoming(init, entry)
        phi.add_incoming(nv, end)
    builder.cbranch(builder.icmp_signed("<", i2, n), loop, after)
    builder.position_at_end(after)
    outs = []
    for init, nv in zip(inits, new):
        p = builder.phi(init.type)
        p.add_incoming(init, entry)
        p.add_incoming(nv, end)
        outs.append(p)
    return outs


def lanes(*idx):
    """A shuffle mask: <len(idx) x i32>."""
    return ir.Constant(vec(I32, len(idx)), list(idx))


def to_i64(builder, v):
    return builder.sext(v, I64) if v.type.width < 64 else v


def c_array(a, ndim, *dtypes):
    """Whether numba type a is a C-contiguous ndim array of one of dtypes."""
    return isinstance(a, types.Array) and a.ndim == ndim and a.layout == "C" and a.dtype in dtypes


def rows_array(a, *dtypes):
    """Whether numba type a is a 2-D array of one of dtypes that row_ptr can address: C-contiguous, or
    any layout ("A") whose rows are each contiguous, as a field of neuron records (kernels/neuron_records.py)
    is: rows a fixed stride apart. numba's type does not say whether an "A" array's rows are
    contiguous; the kernels taking one check its strides first (kernels/neuron_records.check_rows)."""
    return isinstance(a, types.Array) and a.ndim == 2 and a.layout in ("C", "A") and a.dtype in dtypes


def half_to_f32(builder, bits):
    """IEEE-half bit patterns -> float32: an i16 or <n x i16> value -> float or <n x float>. One fpext
    where the target converts halves in hardware (kernels/target.NATIVE_HALF: vcvtph2ps, fcvt). Elsewhere
    LLVM would make that fpext a call to a runtime helper that numba's JIT cannot resolve, so the bits
    are converted with integer operations instead, exact for every pattern as dequant.f16_to_f32_int's
    (-0 becomes +0). Read when the calling kernel compiles, so tests can force either form."""
    vector = isinstance(bits.type, ir.VectorType)
    n = bits.type.count if vector else 0
    ft = vec(F32, n) if vector else F32
    if target.NATIVE_HALF:
        return builder.fpext(builder.bitcast(bits, vec(ir.HalfType(), n) if vector else ir.HalfType()), ft)

    def k(v):
        return splat(I32, n, v) if vector else ir.Constant(I32, v)

    h = builder.zext(bits, vec(I32, n) if vector else I32)
    exp = builder.and_(h, k(0x7C00))
    sign = builder.shl(builder.and_(h, k(0x8000)), k(16))
    u = builder.add(builder.shl(builder.and_(h, k(0x7FFF)), k(13)), k(0x38000000))    # exponent bias 15 -> 127
    u = builder.select(builder.icmp_unsigned("==", exp, k(0x7C00)), builder.add(u, k(0x38000000)), u)  # Inf/NaN
    normal = builder.bitcast(builder.or_(u, sign), ft)
    # zero and subnormals (m * 2**-24): read as 2**-14 * (1 + m/1024), then remove the 2**-14
    low = builder.fsub(builder.bitcast(builder.or_(builder.add(u, k(0x00800000)), sign), ft),
                       builder.bitcast(builder.or_(k(0x38800000), sign), ft))
    return builder.select(builder.icmp_unsigned("==", exp, k(0)), low, normal)


def data(context, builder, ty, val):
    """The data pointer of a numba array."""
    return context.make_array(ty)(context, builder, val).data


def row_ptr(context, builder, ty, val, r):
    """(pointer to row r, row length in elements) of a 2-D array whose rows are contiguous (rows_array):
    rows shape[1] elements apart when C-contiguous, else strides[0] bytes apart."""
    a = context.make_array(ty)(context, builder, val)
    n = builder.extract_value(a.shape, 1)
    if ty.layout == "C":
        return builder.gep(a.data, [builder.mul(to_i64(builder, r), n)]), n
    off = builder.mul(to_i64(builder, r), builder.extract_value(a.strides, 0))
    p = builder.gep(builder.bitcast(a.data, I8.as_pointer()), [off])
    return builder.bitcast(p, a.data.type), n


def prefetch(builder, p):
    """A read prefetch of the line at p into L2 (llvm.prefetch, locality 2: prefetcht1 on x86). Not into
    L1 as well (locality 3, prefetcht0): a prefetch into L1 holds one of the core's few L1 miss buffers
    until its line arrives, so a stream of them caps the misses in flight, and the L1 (32 KiB) is too
    small to keep a row ahead anyway. Locality 1 and 0 (prefetcht2, prefetchnta) are slower than 2 too
    (tools/bench_sparse.py measures the sparse FFN that issues them)."""
    i8p = I8.as_pointer()
    fn = builder.module.declare_intrinsic("llvm.prefetch.p0", fnty=ir.FunctionType(
        ir.VoidType(), [i8p, I32, I32, I32]))
    builder.call(fn, [builder.bitcast(p, i8p), ir.Constant(I32, 0), ir.Constant(I32, 2), ir.Constant(I32, 1)])


def prefetch_target(context, builder, ty, val, r):
    """A prefetch target: (i8 pointer to row r of a 2-D array with contiguous rows (rows_array), its
    bytes); bytes 0 when r < 0 (nothing to fetch)."""
    a = context.make_array(ty)(context, builder, val)
    item = context.get_abi_sizeof(context.get_data_type(ty.dtype))
    nbytes = builder.mul(builder.extract_value(a.shape, 1), const64(item))
    stride = nbytes if ty.layout == "C" else builder.extract_value(a.strides, 0)
    r64 = to_i64(builder, r)
    ok = builder.icmp_signed(">=", r64, const64(0))
    base = builder.gep(builder.bitcast(a.data, I8.as_pointer()),
                       [builder.mul(builder.select(ok, r64, const64(0)), stride)])
    return base, builder.select(ok, nbytes, const64(0))


def prefetch_line(builder, targets, i, lines=1):
    """Prefetch lines i*lines .. i*lines + lines - 1 (64 bytes each) of each (pointer, bytes) target that
    has them: a loop consuming `lines` lines per iteration keeps a steady number of misses in flight
    this way (kernels/gather.py)."""
    for k in range(lines):
        off = builder.mul(builder.add(builder.mul(i, const64(lines)), const64(k)), const64(64))
        for base, nbytes in targets:
            with builder.if_then(builder.icmp_signed("<", off, nbytes)):
                prefetch(builder, builder.gep(base, [off]))
