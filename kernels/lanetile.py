"""The prefill GEMM's register tile with one weight row per 32-bit lane (AVX-512 VNNI), and the packing
of weight rows into its layout.

Why rows in lanes: kernels/rowdot.py's tile gives each lane four bytes of one block, so every (row, token)
pair converts, scales and accumulates in float once per four blocks, two vpdpbusd for four float
operations. With 16 rows in the 16 lanes of a vector (ggml's repacked kernels do the same), one vpdpbusd
serves 16 rows, the integer sums of a whole block of 32 stay in the lanes, and the float work (convert,
scale, accumulate, min term) comes once per block for 16 rows: a quarter of it.

Layout of a packed group of 16 rows (`pack`, `pack_numpy`; one group per row of ws, sw, mw):
  ws (K/2 bytes for Q4, K for I8 and Q5, times 16): chunk c of every row, 4 bytes each, rows 0..15, then
      chunk c + 1... A Q4 chunk holds, in its low nibbles, elements 4c'..4c'+3 of its block and in its
      high nibbles elements 16+4c'..16+4c'+3 (c' = c mod 4, kernels/layouts.md); an I8 chunk holds four
      elements, sign bit flipped (q + 128 as unsigned), since vpdpbusd multiplies unsigned by signed
      bytes; a Q5 chunk four values 0..31 (unsigned already), read by the I8 tile; a Q6 chunk four
      values 0..63, read by the I8 tile in blocks of 16 (its scale blocks).
  sw (nb * 16) f32: block b's scales of the 16 rows (Q6: (2 * nb * 16), half block h's).
  mw (nb * 16) f32: block b's min coefficients, which multiply the block sums of the rounded x: m, or
      Q4_0's -8d or Q5_0's -16d; for I8 m - 128d (or -128d), the -128 undoing the sign flip; for Q6 -32
      times its half block's scale, against the sums of the rounded x's halves.
Packing moves 4-byte chunks, a transpose of 32-bit words per group; it runs once per panel and every
token reuses it.
"""

import numpy as np

from kernels import dequant, sparse24
from kernels.backend import NUMBA, jit
from kernels.dequant import scale_f32, scales_f32_numpy

if NUMBA:
    from kernels import rowdot24

LANES = 16          # rows per group: one per 32-bit lane of a 512-bit vector
GROUPS = 2          # groups per tile
TOKENS = 4          # tokens per tile


def pack_numpy(w, d, m, r0, ws, sw, mw, flip):
    """Rows r0..r0+15 of a Q4 (w uint8 nibbles), 32-block I8 (w int8, flip=True), Q5 (w uint32), Q6
    (w uint64) or 2:4 (w int16 or int32) weight into one group: ws (16 * packed_bytes,) uint8, sw, mw (nb * 16,) f32, Q6's (2 * nb *
    16,) (module doc)."""
    if w.dtype in (np.int16, np.int32):                                     # 2:4 (kernels/sparse24.py)
        values = sparse24.dense_bytes_numpy(w[r0:r0 + LANES], d[r0:r0 + LANES])     # (16, cols) uint8
        if w.dtype == np.int32:             # S4: the Q4 layout's nibbles, element j and j + 16 of a block of 32
            v = values.reshape(LANES, -1, 2, 16)
            values = np.ascontiguousarray(v[:, :, 0] | (v[:, :, 1] << 4)).reshape(LANES, -1)   # (16, cols/2)
        ws.view(np.uint32)[:] = values.view(np.uint32).T.reshape(-1)
        dd = np.repeat(scales_f32_numpy(d[r0:r0 + LANES]), 2, axis=1)       # (16, cols/32)
        sw[:] = dd.T.reshape(-1)
        mw[:] = (np.float32(-128.0) if w.dtype == np.int16 else np.float32(-8.0)) * sw
        return
    if w.dtype == np.uint64:
        values = dequant.q6_values_numpy(w[r0:r0 + LANES], d.shape[1])      # (16, nb, 32) uint8
        ws.view(np.uint32)[:] = values.reshape(LANES, -1).view(np.uint32).T.reshape(-1)
        halves = dequant.q6_scales_numpy(d[r0:r0 + LANES]).reshape(LANES, -1)   # (16, 2*nb)
        sw[:] = halves.T.reshape(-1)
        mw[:] = np.float32(-32.0) * sw
        return
    dd = scales_f32_numpy(d[r0:r0 + LANES])                                 # (16, nb)
    sw[:] = dd.T.reshape(-1)
    if w.dtype == np.uint32:
        values = dequant.q5_values_numpy(w[r0:r0 + LANES], d.shape[1])      # (16, nb, 32) uint8
        ws.view(np.uint32)[:] = values.reshape(LANES, -1).view(np.uint32).T.reshape(-1)
        mm = scales_f32_numpy(m[r0:r0 + LANES]) if m.shape[1] else np.float32(-16.0) * dd
        mw[:] = mm.T.reshape(-1)
        return
    words = np.ascontiguousarray(w[r0:r0 + LANES]).view(np.uint32)         # (16, chunks)
    ws.view(np.uint32)[:] = words.T.reshape(-1) ^ np.uint32(0x80808080 if flip else 0)
    if m.shape[1]:
        mm = scales_f32_numpy(m[r0:r0 + LANES]) + (np.float32(-128.0) * dd if flip else np.float32(0.0))
    else:
        mm = (np.float32(-128.0) if flip else np.float32(-8.0)) * dd
    mw[:] = mm.T.reshape(-1)


def packed_bytes(w, nb: int) -> int:
    """Bytes of one packed row (nb: d.shape[1]): cols/2 for Q4 nibbles and S4 (packed as Q4), cols for I8,
    and for Q5, Q6 and S8 (unpacked to bytes); a 2:4 scale block is 64 columns."""
    if w.dtype == np.int16:
        return 64 * nb
    if w.dtype == np.int32:
        return 32 * nb
    return 16 * nb if w.dtype == np.uint8 else 32 * nb


def pack(w, d, m, r0, ws, sw, mw, flip):
    """pack_numpy's numba twin; numba picks the layout by w's dtype."""


@jit(inline=True)
def _spread_bits(b8):
    """uint64 whose byte k is 16 where bit k of b8 (0..255) is set, else 0: the byte replicated, each copy
    masked to its own bit, then the top bit of (masked + 0x7F) moved to bit 4 (no carry crosses bytes)."""
    t = (b8 * np.uint64(0x0101010101010101)) & np.uint64(0x8040201008040201)
    return ((t + np.uint64(0x7F7F7F7F7F7F7F7F)) & np.uint64(0x8080808080808080)) >> np.uint64(3)


@jit(inline=True)
def _pack_q5(w, d, m, r0, ws, sw, mw, flip):
    """The Q5 layout into the I8 form: each value (0..31) a byte, chunk c of row i at 64c + 4i; min
    coefficients m, or Q5_0's -16d. Eight values at a time in uint64 words."""
    nb = d.shape[1]
    flat = ws.view(np.uint32)
    low = np.uint64(0x0F0F0F0F0F0F0F0F)
    for i in range(LANES):
        by = w[r0 + i].view(np.uint8)                # (20*nb,) the row's bytes (kernels/layouts.md)
        b = 0
        while b < nb:                                # groups of k blocks: 16k nibble bytes, then k words
            k = dequant.step_blocks(nb - b)
            for t in range(k):
                at = 20 * b + 16 * t
                n0, n1 = dequant.le_bytes(by, at, 8), dequant.le_bytes(by, at + 8, 8)    # nibble bytes 0-7 and 8-15
                h = dequant.le_bytes(by, 20 * b + 16 * k + 4 * t, 4)
                v = ((n0 & low) | _spread_bits(h & np.uint64(255)),                   # elements 0-7
                     (n1 & low) | _spread_bits((h >> np.uint64(8)) & np.uint64(255)),  # 8-15
                     ((n0 >> np.uint64(4)) & low) | _spread_bits((h >> np.uint64(16)) & np.uint64(255)),
                     ((n1 >> np.uint64(4)) & low) | _spread_bits(h >> np.uint64(24)))  # 24-31
                for e in range(4):
                    c = 8 * (b + t) + 2 * e          # the chunks of elements 8e..8e+3 and 8e+4..8e+7
                    flat[c * LANES + i] = np.uint32(v[e] & np.uint64(0xFFFFFFFF))
                    flat[(c + 1) * LANES + i] = np.uint32(v[e] >> np.uint64(32))
            b += k
    for i in range(LANES):
        for b in range(nb):
            s = scale_f32(d[r0 + i, b])
            sw[b * LANES + i] = s
            mw[b * LANES + i] = scale_f32(m[r0 + i, b]) if m.shape[1] else np.float32(-16.0) * s


@jit(inline=True)
def _pack_q6(w, d, m, r0, ws, sw, mw, flip):
    """The Q6 layout into the I8 form: each value (0..63) a byte, chunk c of row i at 64c + 4i; a scale and
    a min coefficient (-32 times it) per half block. Eight values at a time in uint64 words: a word of
    nibbles and one of crumbs, whose bit pair at `shift` (kernels/layouts.md) becomes bits 4-5."""
    nb = d.shape[1]
    flat = ws.view(np.uint32)
    low = np.uint64(0x0F0F0F0F0F0F0F0F)
    pairs = np.uint64(0x0303030303030303)
    for i in range(LANES):
        by = w[r0 + i].view(np.uint8)                # (24*nb,) the row's bytes
        b = 0
        while b < nb:                                # groups of k blocks: 16k nibble bytes, then 8k crumbs
            k = dequant.step_blocks(nb - b)
            for t in range(k):
                for u in range(2):                   # the block's elements 8u..8u+7 and 16+8u..16+8u+7
                    e = 16 * t + 8 * u               # their place in the step's low and high vectors
                    n = dequant.le_bytes(by, 24 * b + e, 8)
                    c = dequant.le_bytes(by, 24 * b + 16 * k + e % (8 * k), 8)
                    shift = np.uint64(2 * (e // (8 * k)))
                    lo = (n & low) | (((c >> shift) & pairs) << np.uint64(4))
                    hi = ((n >> np.uint64(4)) & low) | (((c >> (shift + np.uint64(4))) & pairs) << np.uint64(4))
                    for h, v in ((0, lo), (4, hi)):
                        ch = 8 * (b + t) + 2 * u + h     # the chunks of those eight elements
                        flat[ch * LANES + i] = np.uint32(v & np.uint64(0xFFFFFFFF))
                        flat[(ch + 1) * LANES + i] = np.uint32(v >> np.uint64(32))
            b += k
    for i in range(LANES):
        halves = d[r0 + i].view(np.uint16)
        for h in range(2 * nb):
            s = dequant.f16_to_f32(halves[h])
            sw[h * LANES + i] = s
            mw[h * LANES + i] = np.float32(-32.0) * s


@jit(inline=True)
def _pack_words(w, d, m, r0, ws, sw, mw, flip):
    """The Q4 and I8 layouts: 4-byte chunks moved as words; flip: XOR each byte with 0x80 (I8)."""
    chunks = w.shape[1] // 4
    flat = ws.view(np.uint32)
    mask = np.uint32(0x80808080) if flip else np.uint32(0)
    for i in range(LANES):
        words = w[r0 + i].view(np.uint32)
        for c in range(chunks):
            flat[c * LANES + i] = words[c] ^ mask
    nb = d.shape[1]
    base = np.float32(-128.0) if flip else np.float32(-8.0)
    for i in range(LANES):
        for b in range(nb):
            s = scale_f32(d[r0 + i, b])
            sw[b * LANES + i] = s
            if m.shape[1]:
                mw[b * LANES + i] = scale_f32(m[r0 + i, b]) + (base * s if flip else np.float32(0.0))
            else:
                mw[b * LANES + i] = base * s


@jit(inline=True)
def _pack_s24(w, d, m, r0, ws, sw, mw, flip):
    """A 2:4 layout (kernels/sparse24.py: w int16 S8, int32 S4), expanded to dense values in registers
    and transposed there (rowdot24.pack_rows): S8 into the I8 form, values flipped (q + 128; pruned 128),
    min coefficient -128d; S4 into the Q4 form, nibbles (pruned 8), min coefficient -8d. One f16 scale per
    64 columns serves two blocks of 32."""
    nb = d.shape[1]
    base = np.float32(-128.0) if w.itemsize == 2 else np.float32(-8.0)     # int16 rows: S8
    rowdot24.pack_rows(w, r0, ws)
    for i in range(LANES):
        for b in range(nb):
            s = scale_f32(d[r0 + i, b])
            for h in range(2):
                sw[(2 * b + h) * LANES + i] = s
                mw[(2 * b + h) * LANES + i] = base * s


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import F32, I8, I32, I64, broadcast, c_array, const64, row_ptr, vec

    def _tile_intrinsic(nibbles, T, block=32):
        """lane_tile(ws, sw, mw, xq, dx, xsum, t, out, col): GROUPS packed groups (rows of ws, sw, mw) times
        tokens t..t+T-1 of x rounded per block (xq (n, K) int8, dx (n, K/32) f32, xsum (n, K/block) f32 its
        sums per scale block), min terms included, stored to out[t + j, col + 16g + i] (out (n, rows)
        f32). block: the weights' scale block, 32, or 16 for the Q6 layout (I8 form only)."""

        def lane_tile(typingctx, ws, sw, mw, xq, dx, xsum, t, out, col):
            if not (c_array(ws, 2, types.uint8) and c_array(sw, 2, types.float32) and c_array(mw, 2, types.float32)
                    and c_array(xq, 2, types.int8) and c_array(dx, 2, types.float32)
                    and c_array(xsum, 2, types.float32) and c_array(out, 2, types.float32)
                    and isinstance(t, types.Integer) and isinstance(col, types.Integer)):
                return None
            sig = types.void(ws, sw, mw, xq, dx, xsum, t, out, col)

            def codegen(context, builder, sig, vals):
                v16i, v16f, v64b = vec(I32, 16), vec(F32, 16), vec(I8, 64)

                def rows(i, first, count):
                    f = builder.sext(first, I64) if first.type.width < 64 else first
                    return [row_ptr(context, builder, sig.args[i], vals[i], builder.add(f, const64(k)))
                            for k in range(count)]

                zero = const64(0)
                wrows = [p for p, _ in rows(0, zero, GROUPS)]
                srows = [p for p, _ in rows(1, zero, GROUPS)]
                mrows = [p for p, _ in rows(2, zero, GROUPS)]
                xrows = [p for p, _ in rows(3, vals[6], T)]
                drows, nbs = zip(*rows(4, vals[6], T))
                srows_x = [p for p, _ in rows(5, vals[6], T)]
                nb = builder.mul(nbs[0], const64(32 // block))   # scale blocks per row
                chunk_bytes = 8 if nibbles else 4            # weights (K elements) per 4-byte chunk
                per_block = block // chunk_bytes             # chunks per block

                def body(b, accs):
                    iacc = [ir.Constant(v16i, [0] * 16)] * (GROUPS * T)
                    for c in range(per_block):
                        off = builder.mul(builder.add(builder.mul(b, const64(per_block)), const64(c)), const64(64))
                        ws_ = [builder.load(builder.bitcast(builder.gep(p, [off]), v64b.as_pointer()), align=1)
                               for p in wrows]
                        if nibbles:
                            parts = [(builder.and_(w, ir.Constant(v64b, [15] * 64)),
                                      builder.lshr(w, ir.Constant(v64b, [4] * 64))) for w in ws_]
                            xoffs = [4 * c, 16 + 4 * c]
                        else:
                            parts = [(w,) for w in ws_]
                            xoffs = [4 * c]
                        for j in range(T):
                            for h, xo in enumerate(xoffs):
                                xa = builder.add(builder.mul(b, const64(block)), const64(xo))
                                x4 = builder.load(builder.bitcast(builder.gep(xrows[j], [xa]), I32.as_pointer()), align=1)
                                xb = broadcast(builder, x4, 16)
                                for g in range(GROUPS):
                                    p = g * T + j
                                    fn = builder.module.declare_intrinsic(
                                        "llvm.x86.avx512.vpdpbusd.512", fnty=ir.FunctionType(v16i, [v16i] * 3))
                                    iacc[p] = builder.call(fn, [iacc[p], builder.bitcast(parts[g][h], v16i), xb])
                    out = []
                    for g in range(GROUPS):
                        so = builder.mul(b, const64(16))
                        s = builder.load(builder.bitcast(builder.gep(srows[g], [so]), v16f.as_pointer()), align=4)
                        mv = builder.load(builder.bitcast(builder.gep(mrows[g], [so]), v16f.as_pointer()), align=4)
                        for j in range(T):
                            p = g * T + j
                            bx = b if block == 32 else builder.ashr(b, const64(1))      # x's block of 32
                            dxs = broadcast(builder, builder.load(builder.gep(drows[j], [bx])), 16)
                            xss = broadcast(builder, builder.load(builder.gep(srows_x[j], [b])), 16)
                            v = builder.fmul(builder.sitofp(iacc[p], v16f), builder.fmul(s, dxs, flags=("fast",)),
                                             flags=("fast",))
                            v = builder.fadd(v, builder.fmul(mv, xss, flags=("fast",)), flags=("fast",))
                            out.append(builder.fadd(accs[p], v, flags=("fast",)))
                    return out

                entry = builder.block
                fn = builder.function
                loop, after = fn.append_basic_block("lanes.loop"), fn.append_basic_block("lanes.after")
                zf = ir.Constant(v16f, [0.0] * 16)
                builder.cbranch(builder.icmp_signed(">", nb, zero), loop, after)
                builder.position_at_end(loop)
                b = builder.phi(I64)
                accs = [builder.phi(v16f) for _ in range(GROUPS * T)]
                new = body(b, accs)
                b2 = builder.add(b, const64(1))
                end = builder.block
                b.add_incoming(zero, entry)
                b.add_incoming(b2, end)
                for a, v in zip(accs, new):
                    a.add_incoming(zf, entry)
                    a.add_incoming(v, end)
                builder.cbranch(builder.icmp_signed("<", b2, nb), loop, after)
                builder.position_at_end(after)
                results = []
                for v in new:
                    res = builder.phi(v16f)
                    res.add_incoming(zf, entry)
                    res.add_incoming(v, end)
                    results.append(res)
                orows = rows(7, vals[6], T)
                c0 = builder.sext(vals[8], I64) if vals[8].type.width < 64 else vals[8]
                for g in range(GROUPS):
                    for j in range(T):
                        ptr = builder.gep(orows[j][0], [builder.add(c0, const64(16 * g))])
                        builder.store(results[g * T + j], builder.bitcast(ptr, v16f.as_pointer()), align=4)
                return context.get_dummy_value()

            return sig, codegen

        lane_tile.__name__ = lane_tile.__qualname__ = f"{'q4' if nibbles else 'i8'}_{block}_lanes{T}"
        return intrinsic(lane_tile)

    q4_tile, q4_tile1 = _tile_intrinsic(True, TOKENS), _tile_intrinsic(True, 1)
    i8_tile, i8_tile1 = _tile_intrinsic(False, TOKENS), _tile_intrinsic(False, 1)
    q6_tile, q6_tile1 = _tile_intrinsic(False, TOKENS, 16), _tile_intrinsic(False, 1, 16)


def tile(w, ws, sw, mw, xq, dx, xsum, t, out, col):
    """TOKENS tokens through the tile of w's layout (Q4 nibbles, I8 or Q6, by w's dtype)."""


def tile1(w, ws, sw, mw, xq, dx, xsum, t, out, col):
    """One token through the tile of w's layout."""


if NUMBA:
    from numba.core.extending import overload

    @overload(pack, inline="always")
    def _pack_ov(w, d, m, r0, ws, sw, mw, flip):
        if w.dtype == types.uint32:
            return _pack_q5.py_func
        if w.dtype == types.uint64:
            return _pack_q6.py_func
        if w.dtype in (types.uint8, types.int8):
            return _pack_words.py_func
        if w.dtype in (types.int16, types.int32):
            return _pack_s24.py_func
        return None

    def _dispatch(q4, i8, q6):
        def ov(w, ws, sw, mw, xq, dx, xsum, t, out, col):
            # Q5, Q6 and S8 pack into bytes (_pack_q5, _pack_q6, _pack_s24): the I8 form reads them, Q6's in
            # blocks of 16; S4 packs into the Q4 layout's nibbles.
            form = {types.uint8: q4, types.int8: i8, types.uint32: i8, types.uint64: q6,
                    types.int16: i8, types.int32: q4}.get(w.dtype)
            if form is None:
                return None
            return lambda w, ws, sw, mw, xq, dx, xsum, t, out, col: form(ws, sw, mw, xq, dx, xsum, t, out, col)
        return ov

    overload(tile, inline="always")(_dispatch(q4_tile, i8_tile, q6_tile))
    overload(tile1, inline="always")(_dispatch(q4_tile1, i8_tile1, q6_tile1))
