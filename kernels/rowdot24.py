"""The row-dot steps of the 2:4 layouts S8 and S4 (kernels/sparse24.py, kernels/layouts.md), in the form of
kernels/rowdot.py's steps, which calls them: step(b, k) covers blocks b..b+k-1 of 64 columns; and the
expansion of 2:4 rows into the prefill GEMM's lane layout (pack_rows).

Each block is put back together in registers with its 64-bit mask, two ways:
  - S8: the 32 values (stored as w + 128) are expanded into the dense block's 64 lanes, 128 (zero) where
    pruned, by a masked expanding load straight from the row bytes (one vpexpandb on AVX-512 VBMI2); the
    block is then two I8 blocks of 32 against the prepared x: on VNNI one vpdpbusd from xc, the lane
    corrections that undo the 128 (as rowdot's I8 rows), elsewhere rowdot._isum_i8 on w;
  - S4: x is compressed by the mask to the 32 values the block keeps (one vpcompressb), and the nibbles
    (low: kept values 0..15, high: 16..31) multiply them as they are: an S4 block is half the products
    of a dense one, and its nibbles need no spreading. Two blocks make one 64-byte step; (q - 8) * x is
    q * x less 8 * x (two vpdpbusd on VNNI).
S8 expands rather than compresses because its x side then is the dense I8 rows' (its corrections xc
shared by every row), which a compressed x would have to recompute per row; the S4 nibbles would need
spreading to bytes before an expansion, which costs more than compressing x.

Targets: AVX-512 VBMI2 has both instructions; AArch64 has neither, and does both with NEON's tbl (a byte
table lookup) on indices looked up per mask byte; elsewhere (x86 without VBMI2) LLVM lowers its generic
compress and expanding load lane by lane: correct, and slower than the dense rows.
"""

from llvmlite import ir

from kernels import rowdot as _rd
from kernels import target
from kernels.llvm_ir import F32, I8, I16, I32, I64, const64, half_to_f32, lanes, splat, to_i64, vec
from kernels.sparse24 import BLOCK_BYTES, MASK_BYTES

I1 = ir.IntType(1)



def _mask(builder, qrow, at):
    """i64: the 64-bit mask at byte offset at of the row (bit c: column c of the block is kept)."""
    return builder.load(builder.bitcast(builder.gep(qrow, [at]), I64.as_pointer()), align=1)


def _lanes_of(builder, bits):
    return builder.bitcast(bits, vec(I1, 64))


def _lut(builder, name: str, elem, values: list):
    """A constant table in the module (made once per module)."""
    g = builder.module.globals.get(name)
    if g is None:
        t = ir.ArrayType(elem, len(values))
        g = ir.GlobalVariable(builder.module, t, name)
        g.linkage, g.global_constant, g.initializer = "internal", True, ir.Constant(t, values)
    return g


# AArch64 has no compress or expand instruction; NEON's tbl (a byte table lookup, 0 for an index past the
# table) does both with indices looked up per mask byte (8 columns, of which 2:4 keeps exactly 4):
# the positions of its set bits (compress), and for each bit the rank of its value among the kept ones or
# 0x80 when clear (expand).
_COMPRESS_IDX = [int.from_bytes(bytes(([j for j in range(8) if b >> j & 1] + [0, 0, 0, 0])[:4]), "little")
                 for b in range(256)]
_EXPAND_IDX = [int.from_bytes(bytes(bin(b & ((1 << j) - 1)).count("1") if b >> j & 1 else 0x80 for j in range(8)),
                              "little") for b in range(256)]


def _per_byte(builder, bits, name, elem, table):
    """<8 x elem>: table[byte k of bits] for k = 0..7."""
    g = _lut(builder, name, elem, table)
    out = ir.Constant(vec(elem, 8), ir.Undefined)
    for k in range(8):
        byte = builder.and_(builder.lshr(bits, const64(8 * k)), const64(255))
        v = builder.load(builder.gep(g, [const64(0), byte]), align=elem.width // 8)
        out = builder.insert_element(out, v, ir.Constant(I32, k))
    return out


def _tbl(builder, tables: list, idx, fill=None):
    """<16 x i8>: NEON tbl (tbx with a fill byte, which keeps fill past the table) over 1-4 tables of 16 bytes."""
    t = vec(I8, 16)
    n = len(tables)
    if fill is None:
        fn = builder.module.declare_intrinsic(f"llvm.aarch64.neon.tbl{n}.v16i8", fnty=ir.FunctionType(t, [t] * (n + 1)))
        return builder.call(fn, [*tables, idx])
    fn = builder.module.declare_intrinsic(f"llvm.aarch64.neon.tbx{n}.v16i8", fnty=ir.FunctionType(t, [t] * (n + 2)))
    return builder.call(fn, [splat(I8, 16, fill), *tables, idx])


def _quarters(builder, v, n):
    """v <16n x i8> as n vectors <16 x i8>."""
    return [builder.shuffle_vector(v, v, lanes(*range(16 * i, 16 * i + 16))) for i in range(n)]


def _join(builder, parts):
    while len(parts) > 1:
        parts = [_rd._concat(builder, parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
    return parts[0]


def _expand_reg(builder, kept, bits, fill=0):
    """<64 x i8>: the 32 lanes of kept (<32 x i8>) placed, in order, in the lanes whose mask bit is set, fill
    elsewhere: vpexpandb on AVX-512 VBMI2, tbl on AArch64, LLVM's generic expanding load (lane by lane,
    through a stack slot) elsewhere."""
    t = vec(I8, 64)
    if target.ARCH == "aarch64":
        idx = builder.bitcast(_per_byte(builder, bits, "s24.expand", I64, _EXPAND_IDX), t)
        idx = builder.add(idx, ir.Constant(t, [4 * (j // 8) for j in range(64)]))    # 4 kept per earlier byte
        tables = _quarters(builder, kept, 2)
        return _join(builder, [_tbl(builder, tables, q, None if fill == 0 else fill) for q in _quarters(builder, idx, 4)])
    wide = builder.shuffle_vector(kept, kept, lanes(*range(32), *range(32)))
    if target.VBMI2:
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.mask.expand.v64i8",
                                              fnty=ir.FunctionType(t, [t, t, vec(I1, 64)]))
        return builder.call(fn, [wide, splat(I8, 64, fill), _lanes_of(builder, bits)])
    slot = builder.alloca(t)
    builder.store(wide, slot)
    return _expand_mem(builder, builder.bitcast(slot, I8.as_pointer()), bits, fill)


def _expand_mem(builder, src, bits, fill=0):
    """<64 x i8>: the 32 bytes at src placed in the lanes whose mask bit is set, fill elsewhere (a masked
    expanding load: vpexpandb from memory on VBMI2; tbl on AArch64)."""
    t = vec(I8, 64)
    if target.ARCH == "aarch64":
        kept = builder.load(builder.bitcast(src, vec(I8, 32).as_pointer()), align=1)
        return _expand_reg(builder, kept, bits, fill)
    fn = builder.module.declare_intrinsic("llvm.masked.expandload.v64i8",
                                          fnty=ir.FunctionType(t, [I8.as_pointer(), vec(I1, 64), t]))
    return builder.call(fn, [src, _lanes_of(builder, bits), splat(I8, 64, fill)])


def _compress(builder, v, bits):
    """<32 x i8>: the 32 lanes of v (<64 x i8>) whose mask bit is set, in order: vpcompressb on VBMI2, tbl
    on AArch64, LLVM's generic lowering elsewhere."""
    if target.ARCH == "aarch64":
        idx = builder.bitcast(_per_byte(builder, bits, "s24.compress", I32, _COMPRESS_IDX), vec(I8, 32))
        idx = builder.add(idx, ir.Constant(vec(I8, 32), [8 * (j // 4) for j in range(32)]))  # byte k: columns 8k..
        tables = _quarters(builder, v, 4)
        return _join(builder, [_tbl(builder, tables, q) for q in _quarters(builder, idx, 2)])
    t = vec(I8, 64)
    fn = builder.module.declare_intrinsic("llvm.experimental.vector.compress.v64i8",
                                          fnty=ir.FunctionType(t, [t, vec(I1, 64), t]))
    return _rd._half(builder, builder.call(fn, [v, _lanes_of(builder, bits), ir.Constant(t, [0] * 64)]), 0, 32)


def _vnni(builder, acc, u, s):
    """acc + vpdpbusd(u unsigned bytes, s signed bytes): <16 x i32>."""
    v16 = vec(I32, 16)
    return _rd._x86(builder, "llvm.x86.avx512.vpdpbusd.512", v16, acc, builder.bitcast(u, v16), builder.bitcast(s, v16))


def _isum_nibbles(builder, q, x):
    """q <n x i8> unsigned 0..15 (meaning q - 8), x <n x i8> signed -> <n/4 x i32>: lane l = the sum over
    its four bytes of (q - 8) * x. VNNI: q*x less 8*x, two vpdpbusd; elsewhere the generic vector IR."""
    n = q.type.count
    if target.VNNI512 and n == 64:
        zero = ir.Constant(vec(I32, 16), [0] * 16)
        return builder.sub(_vnni(builder, zero, q, x), _vnni(builder, zero, splat(I8, 64, 8), x))
    t = vec(I16, n)
    p = builder.mul(builder.sub(builder.zext(q, t), splat(I16, n, 8)), builder.sext(x, t))   # |.| <= 1024
    return _rd._quads_i32(builder, p)


def _nibbles(builder, nib):
    """<2n x i8>: the n nibble bytes' low nibbles, then their high nibbles (S4's kept values in order)."""
    n = nib.type.count
    return _rd._concat(builder, builder.and_(nib, splat(I8, n, 15)), builder.lshr(nib, splat(I8, n, 4)))


def step(form, builder, qrow, xq, xc, drow, dx, f16):
    """step(b, k) of one 2:4 row: a list of <16 x float> scaled partial sums (two for k = 4, else one; an
    <8 x float> for k = 1 of S4), lanes of four products. qrow: the row as an i8 pointer; drow its
    scales (f16 bits as i16, or f32)."""
    size = BLOCK_BYTES[form]

    def scales(b, k):
        """<2k x float>: lane 2i + h = scale(d[b + i]) * dx[2(b + i) + h]."""
        if f16:
            dv = half_to_f32(builder, _rd._load(builder, drow, b, I16, k, align=2))
        else:
            dv = _rd._load(builder, drow, b, F32, k, align=4)
        dxv = _rd._load(builder, dx, builder.mul(b, const64(2)), F32, 2 * k, align=4)
        return builder.fmul(dxv, builder.shuffle_vector(dv, dv, lanes(*[j // 2 for j in range(2 * k)])),
                            flags=("fast",))

    def scaled(isum, s, idx):
        return builder.fmul(builder.sitofp(isum, vec(F32, isum.type.count)),
                            builder.shuffle_vector(s, s, lanes(*[i for i in idx for _ in range(4)])), flags=("fast",))

    def s8_block(blk, s, i):
        """Block blk (the step's i-th): its values expanded to the dense 64 lanes, times xq as an I8 row."""
        at = builder.mul(blk, const64(size))
        u = _expand_mem(builder, builder.gep(qrow, [builder.add(at, const64(MASK_BYTES))]), _mask(builder, qrow, at),
                        fill=-128)
        off = builder.mul(blk, const64(64))
        xv = _rd._load(builder, xq, off, I8, 64)
        if target.VNNI512:       # the stored w + 128 is vpdpbusd's unsigned operand; xc undoes the 128
            xcv = _rd._load(builder, xc, builder.ashr(off, const64(2)), I32, 16, align=4)
            isum = _vnni(builder, xcv, u, xv)
        else:
            isum = _rd._isum_i8(builder, builder.xor(u, splat(I8, 64, -128)), xv, None)
        return scaled(isum, s, [2 * i, 2 * i, 2 * i + 1, 2 * i + 1])

    def s4_block(blk):
        """(<32 x i8> x compressed by block blk's mask to the values it keeps, <16 x i8> its nibble bytes)."""
        at = builder.mul(blk, const64(size))
        xv = _rd._load(builder, xq, builder.mul(blk, const64(64)), I8, 64)
        return (_compress(builder, xv, _mask(builder, qrow, at)),
                _rd._load(builder, qrow, builder.add(at, const64(MASK_BYTES)), I8, 16))

    def s4_pair(blk, s, i):
        """Blocks blk, blk + 1 (the step's i-th, i+1-th): the two compressed x arranged as the nibbles split,
        [low 0, low 1, high 0, high 1], 16 each."""
        (g0, n0), (g1, n1) = s4_block(blk), s4_block(builder.add(blk, const64(1)))
        xg = builder.shuffle_vector(g0, g1, lanes(*range(16), *range(32, 48), *range(16, 32), *range(48, 64)))
        q = _nibbles(builder, _rd._concat(builder, n0, n1))
        return scaled(_isum_nibbles(builder, q, xg), s, [2 * i, 2 * i + 2, 2 * i + 1, 2 * i + 3])

    def s4_single(blk, s):
        xg, nib = s4_block(blk)
        return scaled(_isum_nibbles(builder, _nibbles(builder, nib), xg), s, [0, 1])

    def add(vs):
        acc = vs[0]
        for v in vs[1:]:
            acc = builder.fadd(acc, v, flags=("fast",))
        return acc

    def run(b, k):
        s = scales(b, k)
        if form == "s8":
            vs = [s8_block(builder.add(b, const64(i)), s, i) for i in range(k)]
        elif k == 1:
            return [s4_single(b, s)]
        else:
            vs = [s4_pair(builder.add(b, const64(i)), s, i) for i in range(0, k, 2)]
        if k == 4 and form == "s8":
            return [add(vs[:2]), add(vs[2:])]
        return vs if k == 4 else [add(vs)]

    return run


def _dense_block(builder, form, qrow, blk):
    """<64 x i8>: block blk of a row (qrow its i8 pointer) as the unsigned bytes the lane tile reads: S8
    values with the sign bit flipped (w + 128; pruned lanes 128), S4 nibbles 0..15 (pruned lanes 8,
    meaning zero)."""
    at = builder.mul(blk, const64(BLOCK_BYTES[form]))
    bits = _mask(builder, qrow, at)
    src = builder.gep(qrow, [builder.add(at, const64(MASK_BYTES))])
    if form == "s8":
        return _expand_mem(builder, src, bits, fill=-128)
    nib = builder.load(builder.bitcast(src, vec(I8, 16).as_pointer()), align=1)
    return _expand_reg(builder, _nibbles(builder, nib), bits, fill=8)


def _transpose16(builder, rows):
    """16 vectors <16 x i32> (a 16x16 matrix by rows) -> its columns: four stages, each exchanging bit h of
    the row and lane indices between pairs of rows h apart (two shuffles per pair)."""
    rows = list(rows)
    for h in (1, 2, 4, 8):
        for i in range(16):
            if i & h:
                continue
            a, b = rows[i], rows[i + h]
            # lane c of the new row i: a[c] where bit h of c is clear, else b[c - h]; of row i + h:
            # a[c + h] where it is clear, else b[c] (b's lanes are 16..31 of the pair)
            rows[i] = builder.shuffle_vector(a, b, lanes(*[c if not c & h else 16 + c - h for c in range(16)]))
            rows[i + h] = builder.shuffle_vector(a, b, lanes(*[c + h if not c & h else 16 + c for c in range(16)]))
    return rows


def _pack_intrinsic():
    """pack_rows(qs, r0, ws): rows r0..r0+15 of a 2:4 weight (qs int16 S8 or int32 S4) into one group of
    the prefill GEMM's lane layout (kernels/lanetile.py: ws (16 * cols,) uint8, chunk c of row i at
    64c + 4i): each block of the 16 rows expanded to dense bytes (_dense_block), transposed as a 16x16
    matrix of 4-byte chunks in registers, and stored as 16 vectors."""
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import c_array, counted_loop, data, row_ptr, rows_array

    def pack_rows(typingctx, qs, r0, ws):
        if not (rows_array(qs, types.int16, types.int32) and isinstance(r0, types.Integer)
                and c_array(ws, 1, types.uint8)):
            return None
        form = "s8" if qs.dtype == types.int16 else "s4"

        def codegen(context, builder, sig, vals):
            first = to_i64(builder, vals[1])
            qrows = []
            for i in range(16):
                p, n = row_ptr(context, builder, sig.args[0], vals[0], builder.add(first, const64(i)))
                qrows.append(builder.bitcast(p, I8.as_pointer()))
            nb = builder.sdiv(builder.mul(n, const64(2 if form == "s8" else 4)), const64(BLOCK_BYTES[form]))
            out = builder.bitcast(data(context, builder, sig.args[2], vals[2]), vec(I32, 16).as_pointer())

            def body(blk):
                dense = [builder.bitcast(_dense_block(builder, form, q, blk), vec(I32, 16)) for q in qrows]
                for c, col in enumerate(_transpose16(builder, dense)):
                    builder.store(col, builder.gep(out, [builder.add(builder.mul(blk, const64(16)), const64(c))]), align=1)

            counted_loop(builder, nb, [], body, "pack24")
            return context.get_dummy_value()

        return types.none(qs, r0, ws), codegen

    return intrinsic(pack_rows)


pack_rows = _pack_intrinsic()
