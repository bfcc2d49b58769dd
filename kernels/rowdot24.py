"""The row-dot steps of the 2:4 layouts S8 and S4 (kernels/sparse24.py, kernels/layouts.md), in the form of
kernels/rowdot.py's steps, which calls them: step(b, k) covers blocks b..b+k-1 of 64 columns; and the
expansion of 2:4 rows into the prefill GEMM's lane layout (pack_rows).

Each block is put back together in registers, two ways:
  - S8: the 32 values (stored as w + 128) are expanded into the dense block's 64 lanes by the mask, 128
    (zero) where pruned, by a masked expanding load straight from the row bytes (one vpexpandb on AVX-512
    VBMI2); the block is then two I8 blocks of 32 against the prepared x: on VNNI one vpdpbusd from xc,
    the lane corrections that undo the 128 (as rowdot's I8 rows), elsewhere rowdot._isum_i8 on w;
  - S4: the x values a block keeps are gathered by their columns, and the nibbles (low: kept values
    0..15, high: 16..31) multiply them as they are: an S4 block is half the products of a dense one, and
    its nibbles need no spreading. A pair of blocks is one 64-byte step: its codes and nibbles are two
    loads (the pair layout), one vpmultishiftqb puts each value's 2-bit code in a byte, adding its
    group's base makes the column, and one vpermt2b picks the 64 x values out of the pair's 128 (AVX-512
    VBMI). (q - 8) * x is q * x less 8 * x (two vpdpbusd on VNNI).
S8 expands rather than gathers because its x side then is the dense I8 rows' (its corrections xc shared
by every row), which a gathered x would have to recompute per row; the S4 nibbles would need spreading
to bytes before an expansion, which costs more than gathering x. A vpcompressb of x by a mask, the other
way to gather, costs about three times the vpermt2b route on Zen 4.

Targets: AVX-512 VBMI has the gather, VBMI2 the expansion; AArch64 has neither, and does both with NEON's
tbl (a byte table lookup) on indices looked up per mask or code byte; elsewhere (x86 without them) LLVM
lowers its generic compress and expanding load lane by lane: correct, and slower than the dense rows.
"""

from llvmlite import ir

from kernels import rowdot as _rd
from kernels import target
from kernels.llvm_ir import F32, I8, I16, I32, I64, const64, half_to_f32, lanes, splat, to_i64, vec
from kernels.sparse24 import BLOCK_BYTES, MASK_BYTES

I1 = ir.IntType(1)



def _word(builder, qrow, at):
    """i64: the 8 bytes at byte offset at of the row, little-endian: an S8 block's mask (bit c: column c
    of the block is kept) or an S4 block's codes (bits 2r: kept value r's column within its group)."""
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
# An S4 code byte covers two groups (8 columns): its four 2-bit codes are the kept columns 0..3 of the
# first group and 4..7 of the second; as positions (tbl's gather) and as the mask byte they make.
_CODE_IDX = [int.from_bytes(bytes([b & 3, b >> 2 & 3, 4 + (b >> 4 & 3), 4 + (b >> 6)]), "little") for b in range(256)]
_CODE_MASK = [1 << (b & 3) | 1 << (b >> 2 & 3) | 16 << (b >> 4 & 3) | 16 << (b >> 6) for b in range(256)]


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


def _tbl_gather(builder, v, word, name, table):
    """<32 x i8>: 32 lanes of v (<64 x i8>) picked by AArch64's tbl, four per byte k of word (i64) at
    columns 8k + table[byte] (positions packed as the four bytes of an i32)."""
    idx = builder.bitcast(_per_byte(builder, word, name, I32, table), vec(I8, 32))
    idx = builder.add(idx, ir.Constant(vec(I8, 32), [8 * (j // 4) for j in range(32)]))
    tables = _quarters(builder, v, 4)
    return _join(builder, [_tbl(builder, tables, q) for q in _quarters(builder, idx, 2)])


def _compress(builder, v, bits):
    """<32 x i8>: the 32 lanes of v (<64 x i8>) whose mask bit is set, in order: tbl on AArch64, LLVM's
    generic lowering elsewhere (vpcompressb where the target has VBMI2)."""
    if target.ARCH == "aarch64":
        return _tbl_gather(builder, v, bits, "s24.compress", _COMPRESS_IDX)
    t = vec(I8, 64)
    fn = builder.module.declare_intrinsic("llvm.experimental.vector.compress.v64i8",
                                          fnty=ir.FunctionType(t, [t, vec(I1, 64), t]))
    return _rd._half(builder, builder.call(fn, [v, _lanes_of(builder, bits), ir.Constant(t, [0] * 64)]), 0, 32)


def _mask_of_codes(builder, codes):
    """i64: the mask (bit c: column c kept) of an S4 block's codes (i64), a mask byte looked up per code
    byte."""
    return builder.bitcast(_per_byte(builder, codes, "s24.codemask", I8, _CODE_MASK), I64)


def _gather_block(builder, x, codes):
    """<32 x i8>: the x values (x <64 x i8>) an S4 block keeps, in order, from its codes (i64): tbl on
    the positions looked up per code byte on AArch64, else the compress by the mask they make."""
    if target.ARCH == "aarch64":
        return _tbl_gather(builder, x, codes, "s24.codeidx", _CODE_IDX)
    return _compress(builder, x, _mask_of_codes(builder, codes))


# The S4 pair's slots: slot j of its 64 kept x values is block (j // 8) % 2's kept value of rank
# r = (j // 16) * 8 + j % 8, the order its nibbles split in (kernels/sparse24.py's pair layout: byte j's
# low nibble is slot j, its high nibble slot j + 32), and the order in which one 16-byte broadcast of the
# pair's two code words puts each slot's code in the slot's own 64-bit lane: bits 2r of block's word.
_SLOT_BLOCK = [(j // 8) % 2 for j in range(64)]
_SLOT_RANK = [(j // 16) * 8 + j % 8 for j in range(64)]
_SLOT_BASE = [64 * b + 4 * (r // 2) for b, r in zip(_SLOT_BLOCK, _SLOT_RANK)]    # column of the group's first
_SLOT_OF = {(b, r): j for j, (b, r) in enumerate(zip(_SLOT_BLOCK, _SLOT_RANK))}
_RANK_SLOT = [[_SLOT_OF[h, r] for r in range(32)] for h in (0, 1)]           # block h's kept value r: its slot


def _gather_pair(builder, x0, x1, codes):
    """<64 x i8>: the x values two adjacent S4 blocks keep (x0, x1 <64 x i8>; codes <2 x i64>, the two
    blocks' code words) in the pair's slot order. VBMI: one vpmultishiftqb moves each slot's code to the
    low bits of its byte, the group base makes it a column of the two blocks, one vpermt2b picks the
    values. Elsewhere each block gathered (_gather_block) and the slots arranged."""
    t = vec(I8, 64)
    if not target.VBMI:
        c0, c1 = (builder.extract_element(codes, ir.Constant(I32, i)) for i in (0, 1))
        g0, g1 = _gather_block(builder, x0, c0), _gather_block(builder, x1, c1)
        return builder.shuffle_vector(g0, g1, lanes(*[32 * b + r for b, r in zip(_SLOT_BLOCK, _SLOT_RANK)]))
    words = builder.bitcast(builder.shuffle_vector(codes, codes, lanes(*[0, 1] * 4)), t)
    crumbs = _rd._x86(builder, "llvm.x86.avx512.pmultishift.qb.512", t,
                      ir.Constant(t, [2 * r for r in _SLOT_RANK]), words)
    idx = builder.or_(builder.and_(crumbs, splat(I8, 64, 3)), ir.Constant(t, _SLOT_BASE))
    return _rd._x86(builder, "llvm.x86.avx512.vpermi2var.qi.512", t, x0, idx, x1)


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
    """<2n x i8>: the n nibble bytes' low nibbles, then their high nibbles (S4's kept values in order): the
    bytes twice, the second copy's 16-bit words shifted right by 4, and every byte's low 4 bits."""
    n = nib.type.count
    twice = builder.bitcast(_rd._concat(builder, nib, nib), vec(I16, n))
    shifted = builder.lshr(twice, ir.Constant(vec(I16, n), [0] * (n // 2) + [4] * (n // 2)))
    return builder.and_(builder.bitcast(shifted, vec(I8, 2 * n)), splat(I8, 2 * n, 15))


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
        """isum's lanes times s's lanes idx (one per lane)."""
        return builder.fmul(builder.sitofp(isum, vec(F32, isum.type.count)),
                            builder.shuffle_vector(s, s, lanes(*idx)), flags=("fast",))

    def s8_block(blk, s, i):
        """Block blk (the step's i-th): its values expanded to the dense 64 lanes, times xq as an I8 row."""
        at = builder.mul(blk, const64(size))
        u = _expand_mem(builder, builder.gep(qrow, [builder.add(at, const64(MASK_BYTES))]), _word(builder, qrow, at),
                        fill=-128)
        off = builder.mul(blk, const64(64))
        xv = _rd._load(builder, xq, off, I8, 64)
        if target.VNNI512:       # the stored w + 128 is vpdpbusd's unsigned operand; xc undoes the 128
            xcv = _rd._load(builder, xc, builder.ashr(off, const64(2)), I32, 16, align=4)
            isum = _vnni(builder, xcv, u, xv)
        else:
            isum = _rd._isum_i8(builder, builder.xor(u, splat(I8, 64, -128)), xv, None)
        return scaled(isum, s, [2 * i + l // 8 for l in range(16)])

    def s4_pair(blk, s, i):
        """Blocks blk, blk + 1 (the step's i-th, i+1-th; blk even, a stored pair): the x values they keep
        gathered in the pair's slot order, which its nibbles split in; lane l (slots 4l..4l+3) is scaled
        as its slots' block and half (ranks 0..15 or 16..31)."""
        at = builder.mul(blk, const64(size))
        codes = _rd._load(builder, qrow, at, I64, 2)
        q = _nibbles(builder, _rd._load(builder, qrow, builder.add(at, const64(2 * MASK_BYTES)), I8, 32))
        x0 = _rd._load(builder, xq, builder.mul(blk, const64(64)), I8, 64)
        x1 = _rd._load(builder, xq, builder.mul(builder.add(blk, const64(1)), const64(64)), I8, 64)
        return scaled(_isum_nibbles(builder, q, _gather_pair(builder, x0, x1, codes)), s,
                      [2 * (i + _SLOT_BLOCK[4 * l]) + _SLOT_RANK[4 * l] // 16 for l in range(16)])

    def s4_single(blk, s):
        """The last block of a row with an odd count, stored alone: codes, then nibbles in the Q4 order."""
        at = builder.mul(blk, const64(size))
        xg = _gather_block(builder, _rd._load(builder, xq, builder.mul(blk, const64(64)), I8, 64),
                           _word(builder, qrow, at))
        q = _nibbles(builder, _rd._load(builder, qrow, builder.add(at, const64(MASK_BYTES)), I8, 16))
        return scaled(_isum_nibbles(builder, q, xg), s, [l // 4 for l in range(8)])

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


def _dense_s8(builder, qrow, blk):
    """<64 x i8>: S8 block blk of a row (qrow its i8 pointer) as the unsigned bytes the lane tile reads,
    the values as stored (w + 128), 128 where pruned."""
    at = builder.mul(blk, const64(BLOCK_BYTES["s8"]))
    return _expand_mem(builder, builder.gep(qrow, [builder.add(at, const64(MASK_BYTES))]), _word(builder, qrow, at),
                       fill=-128)


# Which of its group's two kept values (0 or 1) column j of a group holds, or 64 when it is pruned (with
# the block's base added, an index into vpermt2b's second table, all 8), by the group's codes (bits 0-3)
# and j (bits 4-5).
_WHICH = [0 if j == (i & 3) else 1 if j == (i >> 2 & 3) else 64 for j in range(4) for i in range(16)]


def _dense_s4(builder, q, codes, rank_lane: list):
    """<64 x i8>: an S4 block's nibbles (0..15) at their columns, 8 (zero) where pruned: the block's 32
    values are lanes rank_lane[r] of q (<64 x i8>, kept value r; 2g and 2g + 1 adjacent), codes (i64)
    its code word. VBMI: per column, one vpmultishiftqb puts its group's codes in its byte, one vpermb
    looks up which kept value it holds, one vpermt2b picks it (or an 8). Elsewhere the values in order,
    expanded by the mask the codes make."""
    t = vec(I8, 64)
    if not target.VBMI:
        kept = builder.shuffle_vector(q, q, lanes(*rank_lane))
        return _expand_reg(builder, kept, _mask_of_codes(builder, codes), fill=8)
    one = builder.insert_element(ir.Constant(vec(I64, 1), ir.Undefined), codes, ir.Constant(I32, 0))
    words = builder.bitcast(builder.shuffle_vector(one, one, lanes(*[0] * 8)), t)
    group = _rd._x86(builder, "llvm.x86.avx512.pmultishift.qb.512", t,
                     ir.Constant(t, [4 * (c // 4) for c in range(64)]), words)
    look = builder.or_(builder.and_(group, splat(I8, 64, 15)), ir.Constant(t, [(c % 4) << 4 for c in range(64)]))
    which = _rd._x86(builder, "llvm.x86.avx512.permvar.qi.512", t, ir.Constant(t, _WHICH), look)
    idx = builder.add(which, ir.Constant(t, [rank_lane[2 * (c // 4)] for c in range(64)]))   # >= 64 where pruned
    return _rd._x86(builder, "llvm.x86.avx512.vpermi2var.qi.512", t, q, idx, splat(I8, 64, 8))


def _q4_bytes(builder, dense):
    """<32 x i8>: 64 nibble values (<64 x i8>, 0..15) in the Q4 layout, per block of 32: byte j holds
    element j in its low nibble and element j + 16 in its high one."""
    lo = builder.shuffle_vector(dense, dense, lanes(*range(16), *range(32, 48)))
    hi = builder.shuffle_vector(dense, dense, lanes(*range(16, 32), *range(48, 64)))
    return builder.or_(lo, builder.shl(hi, splat(I8, 32, 4)))


def _dense_s4_pair(builder, qrow, pair):
    """The two blocks of the S4 pair number pair of a row (_dense_s4 each), from the pair's nibbles split
    once into the 64 slots and each block's code word."""
    at = builder.mul(pair, const64(2 * BLOCK_BYTES["s4"]))
    q = _nibbles(builder, _rd._load(builder, qrow, builder.add(at, const64(2 * MASK_BYTES)), I8, 32))
    return [_dense_s4(builder, q, _word(builder, qrow, builder.add(at, const64(MASK_BYTES * h))), _RANK_SLOT[h])
            for h in (0, 1)]


def _dense_s4_single(builder, qrow, blk):
    """The last S4 block of a row with an odd number, stored alone (codes, 16 nibble bytes)."""
    at = builder.mul(blk, const64(BLOCK_BYTES["s4"]))
    nib = _rd._load(builder, qrow, builder.add(at, const64(MASK_BYTES)), I8, 16)
    q = builder.shuffle_vector(_nibbles(builder, nib), ir.Constant(vec(I8, 32), ir.Undefined), lanes(*range(64)))
    return _dense_s4(builder, q, _word(builder, qrow, at), list(range(32)))


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
    the prefill GEMM's lane layout (kernels/lanetile.py: ws (16 * packed_bytes,) uint8, chunk c of row i
    at 64c + 4i): the 16 rows' blocks expanded to dense values (_dense_s8, _dense_s4; S4 then as Q4
    nibbles, two blocks at a time), transposed as a 16x16 matrix of 4-byte chunks in registers, and
    stored as 16 vectors."""
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

            def store(first, rows, count=16):
                """rows: 16 vectors <64 x i8> of 16 chunks; their first `count` chunks, transposed, from
                chunk `first` on."""
                cols = _transpose16(builder, [builder.bitcast(v, vec(I32, 16)) for v in rows])
                for c, col in enumerate(cols[:count]):
                    builder.store(col, builder.gep(out, [builder.add(first, const64(c))]), align=1)

            if form == "s8":         # a block is 16 chunks per row
                counted_loop(builder, nb, [], lambda blk: store(builder.mul(blk, const64(16)),
                                                                [_dense_s8(builder, q, blk) for q in qrows]), "pack24")
                return context.get_dummy_value()

            # S4 into the Q4 layout's nibbles: a pair of blocks is 16 chunks per row; a last single block
            # 8, transposed with 8 zero chunks beside
            def pair(p):
                store(builder.mul(p, const64(16)),
                      [_rd._concat(builder, *(_q4_bytes(builder, v) for v in _dense_s4_pair(builder, q, p)))
                       for q in qrows])

            counted_loop(builder, builder.ashr(nb, const64(1)), [], pair, "pack24")
            with builder.if_then(builder.icmp_signed("!=", builder.and_(nb, const64(1)), const64(0))):
                last = builder.sub(nb, const64(1))
                zero = ir.Constant(vec(I8, 32), [0] * 32)
                store(builder.mul(last, const64(8)),
                      [_rd._concat(builder, _q4_bytes(builder, _dense_s4_single(builder, q, last)), zero) for q in qrows],
                      count=8)
            return context.get_dummy_value()

        return types.none(qs, r0, ws), codegen

    return intrinsic(pack_rows)


pack_rows = _pack_intrinsic()
