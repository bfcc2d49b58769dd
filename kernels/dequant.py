"""Dequantize a block of rows to float32: for batched prefill (tiles fed to BLAS) and embedding lookups.

Each takes the layout's arrays for the wanted rows (already sliced) and writes out (rows, cols) float32.
The numba versions are serial on purpose: prefill alternates dequantized tiles with OpenBLAS GEMMs, and
numba's OpenMP pool and OpenBLAS's pthreads both spin-wait after their calls, so on few cores a
parallel dequant leaves each pool spinning on the cores the other needs. Prefill parallelism comes
from BLAS; decode's from the matvecs.
Also home of the scalar 16-bit float conversions the numba kernels share (f16_to_f32, bf16_to_f32):
numba has no float16 arrays, so halves travel as uint16 bit patterns and convert in registers.
"""

import numpy as np

from kernels import target
from kernels.backend import NUMBA, jit, pick


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic

    _U32 = np.uint32

    @intrinsic
    def _as_f32(typingctx, bits):
        """The float32 whose bit pattern is the low 32 bits of an integer: a free register bitcast.
        (numba can only reinterpret whole arrays with `.view`.)"""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            if v.type.width > 32:
                v = builder.trunc(v, ir.IntType(32))
            elif v.type.width < 32:
                v = builder.zext(v, ir.IntType(32))
            return builder.bitcast(v, ir.FloatType())

        return types.float32(bits), codegen

    @intrinsic
    def _half_to_f32(typingctx, bits):
        """uint16 IEEE-half bits -> float32 by LLVM's fpext: one instruction (x86 F16C vcvtph2ps,
        AArch64 fcvt), exact for every pattern. Only for targets that have it (target.NATIVE_HALF):
        elsewhere LLVM emits a call to a runtime helper (__extendhfsf2) that numba's JIT cannot
        resolve, and the process aborts."""
        if not isinstance(bits, types.Integer):
            return None

        def codegen(context, builder, sig, args):
            v = args[0]
            if v.type.width > 16:
                v = builder.trunc(v, ir.IntType(16))
            return builder.fpext(builder.bitcast(v, ir.HalfType()), ir.FloatType())

        return types.float32(bits), codegen

    @jit()
    def f16_to_f32_int(h):
        """uint16 IEEE-half bits -> float32 with integer arithmetic, exact for every pattern
        (subnormals, infinities, NaNs; -0 becomes +0): for targets without a half-conversion
        instruction. Vectorizes (no 64K-entry table, so no gathers), but costs several instructions
        where the hardware conversion is one.

        numba widens integer arithmetic to 64 bits: truncating after every step lets LLVM keep
        32-bit lanes (otherwise the loop runs on half-width int64 vectors). No float32 subnormal is
        ever an input, so a CPU that flushes them (DAZ) gives the same result; and there is no
        multiply by 2**112, which fastmath moves onto the other factor of a dot product (x * 2**112
        overflows for |x| >= 65536)."""
        h = _U32(h)
        exp = _U32(h & 0x7C00)
        sign = _U32(_U32(h & 0x8000) << 16)
        u = _U32(_U32(_U32(h & 0x7FFF) << 13) + 0x38000000)   # rebias the exponent: 15 -> 127
        if exp == 0x7C00:                                       # Inf/NaN: exponent 31 -> 255
            u = _U32(u + 0x38000000)
        if exp == 0:
            # zero and subnormals (m * 2**-24): read as 2**-14 * (1 + m/1024), then remove 2**-14
            return _as_f32(_U32(u + 0x00800000) | sign) - _as_f32(_U32(0x38800000) | sign)
        return _as_f32(u | sign)

    @jit()
    def bf16_to_f32(h):
        """uint16 bfloat16 bits -> float32: the top half of a float32."""
        return _as_f32(_U32(_U32(h) << 16))

    f16_to_f32 = _half_to_f32 if target.NATIVE_HALF else f16_to_f32_int

    from numba.extending import overload


def scale_f32(v):
    """A block scale as float32, inside numba kernels: scale arrays are float32, or float16 kept as
    uint16 bit patterns where that is exact (GGUF's own f16 scales). numba picks the conversion from
    the array's dtype when the kernel compiles, so one kernel source serves both."""
    return np.float32(v.view(np.float16) if isinstance(v, np.uint16) else v)


def scales_f32_numpy(a: np.ndarray) -> np.ndarray:
    """The numpy twins' version: a (..) float32 or uint16 f16 bits -> float32 (a view when already f32)."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


if NUMBA:
    @overload(scale_f32, jit_options={"fastmath": True})
    def _scale_f32_ov(v):
        if isinstance(v, types.Float):
            return lambda v: np.float32(v)
        if v == types.uint16:
            return lambda v: f16_to_f32(v)
        return None


def dequant_f16_numpy(bits, out):
    """bits (rows, cols) uint16 -> out (rows, cols) f32."""
    out[:] = bits.view(np.float16)
    return out


def dequant_bf16_numpy(bits, out):
    """bits (rows, cols) uint16 -> out (rows, cols) f32."""
    out.view(np.uint32)[:] = bits.astype(np.uint32) << 16
    return out


def dequant_q4_numpy(qs, d, m, out):
    """qs (rows, cols/2) uint8, d (rows, cols/32) and m (rows, cols/32 or 0) f32 or f16 bits
    -> out (rows, cols) f32; an empty m means value = d*(q-8) (Q4_0)."""
    rows = qs.shape[0]
    q = qs.reshape(rows, -1, 16)
    blocks = out.reshape(rows, -1, 2, 16)          # (rows, blocks, lo/hi, 16)
    np.bitwise_and(q, 15, out=blocks[:, :, 0], casting="unsafe")
    np.right_shift(q, 4, out=blocks[:, :, 1], casting="unsafe")
    return _scaled_blocks(out.reshape(rows, -1, 32), d, m, 8, out)


def _scaled_blocks(flat, d, m, offset, out):
    """flat (rows, nb, 32) f32 values q, in place: d*q + m, or d*(q - offset) where m is empty."""
    if not m.shape[1]:
        flat -= offset
    flat *= scales_f32_numpy(d)[:, :, None]
    if m.shape[1]:
        flat += scales_f32_numpy(m)[:, :, None]
    return out


def _step_blocks(left):
    """Blocks in the row-dot step that starts with `left` blocks of the row to go: fours, then a two and/or
    a one (kernels/rowdot.py). The Q5 and Q6 layouts group their bytes by the same steps."""
    return 4 if left >= 4 else (2 if left >= 2 else 1)


step_blocks = pick(jit(inline=True)(_step_blocks), _step_blocks)


def row_groups(nb: int):
    """(first block, blocks per group, groups) of a Q5 or Q6 row of nb blocks: groups of four, then a group
    of two and/or one (step_blocks, kernels/rowdot.py's steps)."""
    b = 0
    for k, n in ((4, nb // 4), (2, (nb % 4) // 2), (1, nb % 2)):
        if n:
            yield b, k, n
            b += k * n


def q5_block_views(qs, nb):
    """Views of a Q5 weight's groups (kernels/layouts.md): per segment of row_groups, (first block, k,
    nibbles (rows, groups, k, 16) uint8, high words (rows, groups, k) uint32). qs (rows, 5*nb) uint32
    with contiguous rows; each group of k blocks is 16k nibble bytes, then k 32-bit words of high bits."""
    return [(b, k, seg[:, :, : 16 * k].reshape(seg.shape[0], -1, k, 16), seg[:, :, 16 * k:].view(np.uint32))
            for b, k, seg in _group_segments(qs, nb, 20)]


def _group_segments(qs, nb, block_bytes):
    """Per segment of row_groups, (first block, k, bytes (rows, groups, block_bytes*k) uint8) of a weight
    whose rows (contiguous) keep block_bytes per block in groups of k blocks (the Q5 and Q6 layouts)."""
    rows = qs.shape[0]
    by = qs.view(np.uint8)                                          # (rows, block_bytes*nb)
    return [(b, k, by[:, block_bytes * b: block_bytes * (b + k * n)].reshape(rows, n, block_bytes * k))
            for b, k, n in row_groups(nb)]


def q5_split_numpy(qs, nb):
    """qs (rows, 5*nb) uint32 (the Q5 layout) -> nibbles (rows, nb, 16) uint8 in the Q4 layout's order,
    high words (rows, nb) uint32: bit j of block b's word is bit 4 of its element j."""
    rows = qs.shape[0]
    nib = np.empty((rows, nb, 16), np.uint8)
    high = np.empty((rows, nb), np.uint32)
    for b, k, nv, hv in q5_block_views(qs, nb):
        n = nv.shape[1]
        nib[:, b: b + k * n] = nv.reshape(rows, n * k, 16)
        high[:, b: b + k * n] = hv.reshape(rows, n * k)
    return nib, high


def q5_join_numpy(nib, high, qs):
    """q5_split_numpy's inverse: nibbles (rows, nb, 16) uint8, high words (rows, nb) uint32 -> qs (rows,
    5*nb) uint32, written in place and returned."""
    rows, nb = high.shape
    for b, k, nv, hv in q5_block_views(qs, nb):
        n = nv.shape[1]
        nv[:] = nib[:, b: b + k * n].reshape(rows, n, k, 16)
        hv[:] = high[:, b: b + k * n].reshape(rows, n, k)
    return qs


def nibble_values_numpy(nib):
    """nib (rows, nb, 16) uint8 in the Q4 layout's order -> (rows, nb, 32) uint8 values 0..15 in natural
    order: byte j's low nibble is element j, its high nibble element j + 16."""
    v = np.empty(nib.shape[:2] + (32,), dtype=np.uint8)
    np.bitwise_and(nib, 15, out=v[:, :, :16])
    np.right_shift(nib, 4, out=v[:, :, 16:])
    return v


def nibble_bytes_numpy(v):
    """nibble_values_numpy's inverse: v (rows, nb, 32) uint8 values 0..15 -> (rows, nb, 16) uint8 in the
    Q4 layout's order."""
    return v[:, :, :16] | (v[:, :, 16:] << 4)


def q5_values_numpy(qs, nb):
    """qs (rows, 5*nb) uint32 in the Q5 layout -> (rows, nb, 32) uint8 values 0..31 in natural order."""
    nib, high = q5_split_numpy(qs, nb)
    v = nibble_values_numpy(nib)
    v |= (((high[:, :, None] >> np.arange(32, dtype=np.uint32)) & np.uint32(1)) << np.uint32(4)).astype(np.uint8)
    return v


@jit(inline=True)
def le_bytes(by, at, n):
    """The little-endian uint64 of bytes at..at+n-1 of by (n <= 8; LLVM merges the loads into one)."""
    v = np.uint64(0)
    for i in range(n):
        v |= np.uint64(by[at + i]) << np.uint64(8 * i)
    return v


def q6_block_views(qs, nb):
    """Views of a Q6 weight's groups (kernels/layouts.md): per segment of row_groups (the same groups),
    (first block, k, nibbles (rows, groups, k, 16) uint8, crumbs (rows, groups, 8k) uint8). qs (rows,
    3*nb) uint64 with contiguous rows; each group of k blocks is 16k nibble bytes, then 8k bytes of the
    values' top two bits."""
    return [(b, k, seg[:, :, : 16 * k].reshape(seg.shape[0], -1, k, 16), seg[:, :, 16 * k:])
            for b, k, seg in _group_segments(qs, nb, 24)]


def q6_values_numpy(qs, nb):
    """qs (rows, 3*nb) uint64 in the Q6 layout -> (rows, nb, 32) uint8 values 0..63 in natural order.
    In a group of k blocks, the step's low vector holds the blocks' first halves (element e: block e//16,
    element e%16) and its high vector their second halves; crumb byte i holds bits 4-5 of low elements i
    (bits 0-1) and i + 8k (bits 2-3), and of high elements i (bits 4-5) and i + 8k (bits 6-7)."""
    rows = qs.shape[0]
    v = np.empty((rows, nb, 32), np.uint8)
    for b, k, nib, crumbs in q6_block_views(qs, nb):
        n = nib.shape[1]
        c = crumbs.astype(np.uint8)
        lo_top = np.concatenate([c & 3, (c >> 2) & 3], axis=2).reshape(rows, n, k, 16)
        hi_top = np.concatenate([(c >> 4) & 3, c >> 6], axis=2).reshape(rows, n, k, 16)
        out = v[:, b: b + k * n].reshape(rows, n, k, 32)
        out[..., :16] = (nib & 15) | (lo_top << 4)
        out[..., 16:] = (nib >> 4) | (hi_top << 4)
    return v


def q6_join_numpy(values, qs):
    """q6_values_numpy's inverse: values (rows, nb, 32) uint8 0..63 in natural order -> qs (rows, 3*nb)
    uint64, written in place and returned."""
    rows, nb = values.shape[:2]
    for b, k, nib, crumbs in q6_block_views(qs, nb):
        n = nib.shape[1]
        v = values[:, b: b + k * n].reshape(rows, n, k, 32)
        nib[:] = (v[..., :16] & 15) | ((v[..., 16:] & 15) << 4)
        lo = (v[..., :16] >> 4).reshape(rows, n, 16 * k)
        hi = (v[..., 16:] >> 4).reshape(rows, n, 16 * k)
        h = 8 * k
        crumbs[:] = lo[..., :h] | (lo[..., h:] << 2) | (hi[..., :h] << 4) | (hi[..., h:] << 6)
    return qs


def q6_scales_numpy(d):
    """d (rows, nb) uint32, a Q6 weight's scales (two f16 per block: elements 0..15 in the low half) ->
    (rows, nb, 2) float32."""
    return d.view(np.uint16).view(np.float16).astype(np.float32).reshape(d.shape[0], d.shape[1], 2)


def dequant_q6_numpy(qs, d, m, out):
    """qs (rows, 3*cols/32) uint64 (the Q6 layout), d (rows, cols/32) uint32 (two f16 scales per block), m
    (rows, 0) -> out (rows, cols) f32: value = scale of the element's 16 * (q - 32)."""
    rows, nb = d.shape
    halves = out.reshape(rows, nb, 2, 16)
    halves[:] = q6_values_numpy(qs, nb).reshape(rows, nb, 2, 16)
    halves -= np.float32(32)
    halves *= q6_scales_numpy(d)[:, :, :, None]
    return out


def dequant_q5_numpy(qs, d, m, out):
    """qs (rows, 5*cols/32) uint32 (the Q5 layout), d (rows, cols/32) and m (rows, cols/32 or 0) f32 or
    f16 bits -> out (rows, cols) f32; an empty m means value = d*(q-16) (Q5_0)."""
    rows, nb = d.shape
    flat = out.reshape(rows, nb, 32)
    flat[:] = q5_values_numpy(qs, nb)
    return _scaled_blocks(flat, d, m, 16, out)


def dequant_i8_numpy(q, d, m, out):
    """q (rows, cols) int8, d (rows, cols/B) and m (rows, cols/B or 0) f32 or f16 bits -> out (rows, cols) f32."""
    rows, cols = q.shape
    block = cols // d.shape[1]
    blocks = out.reshape(rows, -1, block)
    blocks[:] = q.reshape(rows, -1, block)
    blocks *= scales_f32_numpy(d)[:, :, None]
    if m.shape[1]:
        blocks += scales_f32_numpy(m)[:, :, None]
    return out


@jit(parallel=False)
def _dequant_f16_numba(bits, out):
    rows, cols = bits.shape
    for r in range(rows):
        src = bits[r]
        o = out[r]
        for k in range(cols):
            o[k] = f16_to_f32(src[k])
    return out


@jit(parallel=False)
def _dequant_bf16_numba(bits, out):
    rows, cols = bits.shape
    for r in range(rows):
        src = bits[r]
        o = out[r]
        for k in range(cols):
            o[k] = bf16_to_f32(src[k])
    return out


# Stores stop LLVM from vectorizing the long-loop form the matvecs use: the scale load d[k >> 5] might
# alias the output and its address is not an affine function of k, so no run-time overlap check can be
# built. Per-block inner loops over 1-D slices, with the block's scale hoisted and a trip count known
# only at run time, vectorize (with an overlap check per block); a constant trip count of 16 or 32
# would be fully unrolled first and then left scalar.

@jit(parallel=False)
def _dequant_q4_numba(qs, d, m, out):
    rows, half = qs.shape
    nb = d.shape[1]
    hb = half // nb                                  # 16 bytes per block
    sym = m.shape[1] == 0                            # Q4_0: value = d*(q-8), no min array
    for r in range(rows):
        row = qs[r]
        o = out[r]
        dr = d[r]
        mr = m[r]
        for b in range(nb):
            s = scale_f32(dr[b])
            a = np.float32(-8.0) * s if sym else scale_f32(mr[b])
            src = row[b * hb : b * hb + hb]
            lo = o[2 * b * hb : 2 * b * hb + hb]     # elements 0-15 of the block: low nibbles
            hi = o[2 * b * hb + hb : 2 * b * hb + 2 * hb]
            for j in range(hb):
                q = np.int32(src[j])
                lo[j] = s * np.float32(np.int32(q & 15)) + a
                hi[j] = s * np.float32(np.int32(q >> 4)) + a
    return out


@jit(parallel=False)
def _dequant_q5_numba(qs, d, m, out):
    rows = qs.shape[0]
    nb = d.shape[1]
    sym = m.shape[1] == 0                            # Q5_0: value = d*(q-16), no min array
    for r in range(rows):
        by = qs[r].view(np.uint8)                    # (20*nb,) the row's bytes
        o = out[r]
        dr = d[r]
        mr = m[r]
        b = 0
        while b < nb:                                # groups of k blocks: 16k nibble bytes, then k words
            k = step_blocks(nb - b)
            for t in range(k):
                s = scale_f32(dr[b + t])
                a = np.float32(-16.0) * s if sym else scale_f32(mr[b + t])
                nib = 20 * b + 16 * t
                h = np.uint32(le_bytes(by, 20 * b + 16 * k + 4 * t, 4))
                o0 = 32 * (b + t)
                for j in range(16):
                    q = np.int32(by[nib + j])
                    lo = (q & 15) | np.int32(((h >> np.uint32(j)) & np.uint32(1)) << np.uint32(4))
                    hi = (q >> 4) | np.int32(((h >> np.uint32(j + 16)) & np.uint32(1)) << np.uint32(4))
                    o[o0 + j] = s * np.float32(lo) + a
                    o[o0 + 16 + j] = s * np.float32(hi) + a
            b += k
    return out


@jit(parallel=False)
def _dequant_q6_numba(qs, d, m, out):
    rows = qs.shape[0]
    nb = d.shape[1]
    for r in range(rows):
        by = qs[r].view(np.uint8)                    # (24*nb,) the row's bytes
        dh = d[r].view(np.uint16)                    # (2*nb,) f16 scales, one per 16 elements
        o = out[r]
        b = 0
        while b < nb:                                # groups of k blocks: 16k nibble bytes, then 8k crumbs
            k = step_blocks(nb - b)
            crumbs = 24 * b + 16 * k
            for t in range(k):
                s_lo = f16_to_f32(dh[2 * (b + t)])        # elements 0..15 of the block
                s_hi = f16_to_f32(dh[2 * (b + t) + 1])    # elements 16..31
                o0 = 32 * (b + t)
                for j in range(16):
                    e = 16 * t + j                   # element j's place in the step's low and high vectors
                    q = np.int32(by[24 * b + e])
                    c = np.int32(by[crumbs + e % (8 * k)])
                    sh = 2 * (e // (8 * k))
                    o[o0 + j] = s_lo * np.float32(((q & 15) | (((c >> sh) & 3) << 4)) - 32)
                    o[o0 + 16 + j] = s_hi * np.float32(((q >> 4) | (((c >> (sh + 4)) & 3) << 4)) - 32)
            b += k
    return out


@jit(parallel=False)
def _dequant_i8_numba(q, d, m, out):
    rows, cols = q.shape
    nb = d.shape[1]
    block = cols // nb
    has_min = m.shape[1] > 0
    for r in range(rows):
        row = q[r]
        o = out[r]
        dr = d[r]
        mr = m[r]
        for b in range(nb):
            s = scale_f32(dr[b])
            src = row[b * block : b * block + block]
            ob = o[b * block : b * block + block]
            if has_min:
                a = scale_f32(mr[b])
                for j in range(block):
                    ob[j] = s * np.float32(src[j]) + a
            else:
                for j in range(block):
                    ob[j] = s * np.float32(src[j])
    return out


dequant_f16 = pick(_dequant_f16_numba, dequant_f16_numpy)
dequant_bf16 = pick(_dequant_bf16_numba, dequant_bf16_numpy)
dequant_q4 = pick(_dequant_q4_numba, dequant_q4_numpy)
dequant_i8 = pick(_dequant_i8_numba, dequant_i8_numpy)
dequant_q5 = pick(_dequant_q5_numba, dequant_q5_numpy)
dequant_q6 = pick(_dequant_q6_numba, dequant_q6_numpy)
