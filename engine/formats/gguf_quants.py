"""GGUF tensor bytes -> the repacked weight layouts of engine/model/weights.py (kernels/layouts.md).

One tensor at a time: `raw` is exactly that tensor's bytes (usually a view into the memmapped file).
Every result array is freshly allocated, C-contiguous and owned, so the file can be closed afterwards.

Block formats (ggml, little-endian; "f16" is an IEEE half; "element j" counts within the block):
  Q4_0  32 el, 18 B: d f16, qs[16]            value = d*(q-8); qs[j] = el j (low nibble), el j+16 (high)
  Q4_1  32 el, 20 B: d f16, m f16, qs[16]     value = d*q + m; nibbles as Q4_0
  Q5_0  32 el, 22 B: d f16, qh[4], qs[16]     value = d*(q-16); q = nibble | bit j of qh (u32) << 4
  Q5_1  32 el, 24 B: d, m f16, qh[4], qs[16]  value = d*q + m
  Q8_0  32 el, 34 B: d f16, qs int8[32]       value = d*q
  Q4_K 256 el, 144 B: d, dmin f16, scales[12], qs[128]
        8 sub-blocks of 32 with 6-bit scale sc and min mn: value = d*sc*q - dmin*mn. qs is 4 chunks of
        32 bytes; chunk c holds sub-block 2c in its low nibbles and 2c+1 in its high nibbles.
  Q5_K 256 el, 176 B: d, dmin f16, scales[12], qh[32], qs[128]: Q4_K plus bit s of qh[l] as bit 4
        of element l of sub-block s.
  Q6_K 256 el, 210 B: ql[128], qh[64], scales int8[16], d f16: value = d*scale[e//16]*(q-32), q six
        bits; within each half of 128 elements, element i takes low bits from ql[i%64] (nibble i//64)
        and high bits from qh[i%32] (bit pair i//32).

Scales that are f16 in the file stay f16, kept as uint16 bit patterns (numba has no float16 arrays; the
kernels convert in registers). K-quant scales are products d*sc of an f16 and a 6- or 8-bit integer,
which f16 holds to 11 bits: Q4_K's are rounded to f16 all the same (a relative error below 2^-11 on a
4-bit weight's scale, and 1.11x the file's bytes where float32 scales took 1.33x), and so are Q5_K's.
5-bit values keep 5 bits (the Q5 layout: Q5_0 and Q5_1 blocks as they are, Q5_K's rewritten into
them), and Q6_K's keep 6 bits (the Q6 layout), with its 16-element scales d*sc rounded to f16 as well.
"""

from __future__ import annotations

import sys

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from engine.errors import ModelFormatError
from engine.model.weights import BF16Weight, F16Weight, F32Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight, Weight
from kernels import dequant

# ggml's type ids (gguf-py's GGMLQuantizationType, an IntEnum: the same ints as ggml.h's enum ggml_type).
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 = (T.F32, T.F16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0)
Q4_K, Q5_K, Q6_K, BF16 = T.Q4_K, T.Q5_K, T.Q6_K, T.BF16

# The bit-unpacking converters work on this many elements at a time, so that a chunk's output and
# scratch stay in L2 cache while numpy passes over them several times.
_CHUNK_ELEMS = 1 << 19

_FIX = "re-quantize it to Q4_K_M, Q4_0 or Q8_0 with llama.cpp's llama-quantize"


def type_name(ggml_type: int) -> str:
    try:
        return T(int(ggml_type)).name
    except ValueError:
        return f"unknown type {int(ggml_type)}"


def block_size(ggml_type: int) -> tuple[int, int]:
    """(elements, bytes) of one block, from gguf-py's table of every type ggml defines, so that a reader
    can walk a file that also holds tensors we cannot convert (the error then names the tensor)."""
    try:
        return GGML_QUANT_SIZES[T(int(ggml_type))]
    except (ValueError, KeyError):
        raise ModelFormatError(f"GGML tensor type {int(ggml_type)} is unknown to pocketinfer; {_FIX}") from None


def tensor_nbytes(ggml_type: int, n_elements: int) -> int:
    """Bytes the tensor takes in the file; ModelFormatError for unknown types or partial blocks."""
    block, size = block_size(ggml_type)
    if n_elements % block:
        raise ModelFormatError(
            f"a {type_name(ggml_type)} tensor of {n_elements} elements is not a whole number of "
            f"{block}-element blocks: the file is corrupt; {_FIX}")
    return n_elements // block * size


# ---------------------------------------------------------------- public API

def weight_from_gguf(ggml_type: int, raw: np.ndarray, shape: tuple[int, int], name: str, source: str) -> Weight:
    """raw: exactly this tensor's bytes; shape = (rows, cols) in numpy order (cols = GGUF ne[0])."""
    ggml_type = int(ggml_type)
    rows, cols = (int(s) for s in shape)
    flat = _checked_bytes(ggml_type, raw, rows, cols, name, source)
    return _CONVERTERS[ggml_type](flat, rows, cols)


def vector_from_gguf(ggml_type: int, raw: np.ndarray, n: int, name: str, source: str) -> np.ndarray:
    """Norm weights and biases: (n,) float32, whatever the stored type."""
    ggml_type = int(ggml_type)
    flat = _checked_bytes(ggml_type, raw, 1, int(n), name, source)
    if ggml_type == F32:
        return flat.view("<f4").astype(np.float32)
    if ggml_type == F16:
        return flat.view("<f2").astype(np.float32)
    if ggml_type == BF16:
        return (flat.view("<u2").astype(np.uint32) << 16).view(np.float32)
    return _CONVERTERS[ggml_type](flat, 1, int(n)).to_float32()[0]


def _checked_bytes(ggml_type, raw, rows, cols, name, source) -> np.ndarray:
    """raw as a flat uint8 array after checking type, block alignment and byte count."""
    tname = type_name(ggml_type)
    if ggml_type not in _CONVERTERS:
        raise ModelFormatError(
            f"{source}: tensor {name!r} has type {tname}, which pocketinfer cannot load; {_FIX}")
    block, size = block_size(ggml_type)
    if cols % block:
        raise ModelFormatError(
            f"{source}: tensor {name!r} ({tname}) has rows of {cols} values, not a multiple of the "
            f"{block}-value block: the file is corrupt or was written by an incompatible tool; {_FIX}")
    if sys.byteorder != "little":
        raise ModelFormatError(f"{source}: reading GGUF tensors needs a little-endian CPU")
    want = rows * (cols // block) * size
    raw = np.asarray(raw)
    if raw.nbytes != want:
        raise ModelFormatError(
            f"{source}: tensor {name!r} ({tname}, {rows}x{cols}) has {raw.nbytes} bytes where "
            f"{want} are expected: the file is truncated or corrupt; download or convert it again")
    return np.ascontiguousarray(raw).reshape(-1).view(np.uint8)


# ---------------------------------------------------------------- dense

def _f32(flat, rows, cols):
    w = np.empty((rows, cols), dtype=np.float32)
    w.reshape(-1)[:] = flat.view("<f4")
    return F32Weight(w)


def _bits16(flat, rows, cols):
    bits = np.empty((rows, cols), dtype=np.uint16)
    bits.reshape(-1)[:] = flat.view("<u2")
    return bits


# ---------------------------------------------------------------- how the converters stay fast
#
# numpy pays ~20 ns per inner loop and runs uint8 shifts one byte at a time, so a naive version (ops
# on (n, 16) slices of the blocks) runs at ~0.2 GB/s. Instead: (1) fields are declared as opaque
# void items ("V16", "V32") and copied or replicated into place with one memcpy per item; (2) all
# bit arithmetic runs on whole chunks viewed as uint64 lanes (8 bytes per operation); a per-byte
# shift becomes a per-lane shift plus a byte mask, and where the shift differs along the block it
# comes from a full-length tiled pattern, never a small broadcast array. The uint64 views assume a
# little-endian host (x86-64, ARM), as GGUF's byte order is.

_U64 = np.uint64
_NIBBLES = _U64(0x0F0F0F0F0F0F0F0F)
_PATTERNS: dict[tuple[int, ...], np.ndarray] = {}


def _lanes(per_lane: tuple[int, ...], n: int) -> np.ndarray:
    """(n,) uint64: `per_lane` repeated (cached; sliced from one long array)."""
    p = _PATTERNS.get(per_lane)
    if p is None or len(p) < n:
        p = np.tile(np.array(per_lane, dtype=_U64), -(-max(n, _CHUNK_ELEMS // 8) // len(per_lane)))
        _PATTERNS[per_lane] = p
    return p[:n]


def _runs(*values: int, lanes: int) -> tuple[int, ...]:
    """(v0 x lanes, v1 x lanes, ...): one value per run of `lanes` uint64 lanes."""
    return tuple(v for v in values for _ in range(lanes))


def _u64(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(_U64)


# ---------------------------------------------------------------- 32-element block formats

_Q4_0 = np.dtype([("d", "<f2"), ("qs", "V16")])
_Q4_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "V16")])
_Q5_0 = np.dtype([("d", "<f2"), ("qh", "V4"), ("qs", "V16")])
_Q5_1 = np.dtype([("d", "<f2"), ("m", "<f2"), ("qh", "V4"), ("qs", "V16")])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "V32")])


def _f16_bits(blocks: np.ndarray, name: str, rows: int, nb: int) -> np.ndarray:
    """A block field of f16 scales kept as their uint16 bit patterns: (rows, nb) uint16. The kernels
    read them through kernels.dequant.scale_f32, so the scales cost the file's bytes, not twice that."""
    out = np.empty((rows, nb), dtype=np.uint16)
    out.reshape(-1)[:] = blocks[name].view(np.uint16)
    return out


def _q4_legacy(flat, rows, cols, with_min):
    # Q4_0/Q4_1 nibbles are already in the Q4 layout's order: a strided copy, no unpacking.
    blocks = flat.view(_Q4_1 if with_min else _Q4_0)
    qs = np.empty((rows, cols // 2), dtype=np.uint8)     # (rows, cols/2)
    qs.reshape(-1, 16).view("V16")[:, 0] = blocks["qs"]
    d = _f16_bits(blocks, "d", rows, cols // 32)         # (rows, cols/32) f16 bits
    # Q4_0 keeps no min: the layout's empty m means value = d*(q-8), as in the file.
    m = _f16_bits(blocks, "m", rows, cols // 32) if with_min else np.empty((rows, 0), dtype=np.uint16)
    return Q4Weight(qs, d, m)


def _q8_0(flat, rows, cols):
    blocks = flat.view(_Q8_0)
    q = np.empty((rows, cols), dtype=np.int8)
    q.reshape(-1, 32).view("V32")[:, 0] = blocks["qs"]
    d = _f16_bits(blocks, "d", rows, cols // 32)         # (rows, cols/32) f16 bits
    return I8Weight(q, d, np.empty((rows, 0), dtype=np.uint16))


def _q5_legacy(flat, rows, cols, with_min):
    # Q5_0/Q5_1 blocks hold the Q5 layout's parts as they are: nibbles in the Q4 order and a
    # little-endian u32 of high bits, bit j for element j. Strided copies into the groups, no unpacking.
    blocks = flat.view(_Q5_1 if with_min else _Q5_0).reshape(rows, cols // 32)
    nb = cols // 32
    qs = np.empty((rows, 5 * nb), dtype=np.uint32)
    for b, k, nv, hv in dequant.q5_block_views(qs, nb):
        src = blocks[:, b: b + k * nv.shape[1]].reshape(rows, -1, k)
        nv.view("V16")[..., 0] = src["qs"]
        hv[:] = src["qh"].view("<u4")
    d = _f16_bits(blocks.reshape(-1), "d", rows, nb)      # (rows, nb) f16 bits
    # Q5_0 keeps no min: the layout's empty m means value = d*(q-16), as in the file.
    m = _f16_bits(blocks.reshape(-1), "m", rows, nb) if with_min else np.empty((rows, 0), dtype=np.uint16)
    return Q5Weight(qs, d, m)


# ---------------------------------------------------------------- K-quants (256-element super-blocks)

_Q4_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "V12"), ("qs", "V128")])
_Q5_K = np.dtype([("d", "<f2"), ("dmin", "<f2"), ("scales", "V12"), ("qh", "V32"), ("qs", "V32", (4,))])
_Q6_K = np.dtype([("ql", "V32", (4,)), ("qh", "V32", (2,)), ("scales", "i1", (16,)), ("d", "<f2")])


def _superblock_chunks(rows: int, cols: int):
    """(first super-block, count) per chunk of whole rows."""
    per_row = cols // 256
    step = max(1, _CHUNK_ELEMS // cols) * per_row
    for b0 in range(0, rows * per_row, step):
        yield b0, min(step, rows * per_row - b0)


def _k_scales(blk, d_out, m_out):
    """Sub-block scale d*sc and offset -dmin*mn, into (n, 8) each, from 12 bytes of 6-bit pairs.

    Bytes 0-3 hold sc0-3 (low 6 bits), bytes 4-7 hold mn0-3; sc4-7 and mn4-7 take their low 4 bits
    from the nibbles of bytes 8-11 and their top 2 bits from the top bits of bytes 0-3 and 4-7.
    Worked on four bytes at a time as uint32 lanes.
    """
    n = len(blk)
    s = np.ascontiguousarray(blk["scales"]).view("<u4").reshape(n, 3)
    lo, mid, hi = s[:, 0], s[:, 1], s[:, 2]
    packed = np.empty((n, 4), dtype=np.uint32)            # bytes: sc0-3, sc4-7, mn0-3, mn4-7
    np.bitwise_and(lo, 0x3F3F3F3F, out=packed[:, 0])
    packed[:, 1] = (hi & 0x0F0F0F0F) | ((lo >> 2) & 0x30303030)
    np.bitwise_and(mid, 0x3F3F3F3F, out=packed[:, 2])
    packed[:, 3] = ((hi >> 4) & 0x0F0F0F0F) | ((mid >> 2) & 0x30303030)
    sm = packed.view(np.uint8).reshape(n, 2, 8)
    np.multiply(sm[:, 0], blk["d"].astype(np.float32)[:, None], out=d_out)
    np.multiply(sm[:, 1], -blk["dmin"].astype(np.float32)[:, None], out=m_out)


def _q4_k(flat, rows, cols):
    blocks = flat.view(_Q4_K)
    qs_out = np.empty((rows, cols // 2), dtype=np.uint8)
    d = np.empty((rows, cols // 32), dtype=np.uint16)     # f16 bits of d*sc, rounded (module doc)
    m = np.empty_like(d)                                   # f16 bits of -dmin*mn
    qv, dv, mv = qs_out.reshape(-1, 128), d.reshape(-1, 8), m.reshape(-1, 8)
    t_buf = np.empty(min(rows * cols, max(_CHUNK_ELEMS, cols)) // 16, dtype=_U64)  # scratch
    ds, ms = (np.empty((max(n for _, n in _superblock_chunks(rows, cols)), 8), np.float32) for _ in range(2))
    for b0, n in _superblock_chunks(rows, cols):
        blk = blocks[b0 : b0 + n]
        _k_scales(blk, ds[:n], ms[:n])
        dv[b0 : b0 + n] = ds[:n].astype(np.float16).view(np.uint16)
        mv[b0 : b0 + n] = ms[:n].astype(np.float16).view(np.uint16)
        o = qv[b0 : b0 + n]
        o.view("V128")[:, 0] = blk["qs"]
        _k_nibbles_to_q4_order(o, t_buf)
    return Q4Weight(qs_out, d, m)


def _k_nibbles_to_q4_order(o: np.ndarray, t_buf: np.ndarray) -> None:
    """o (n, 128) uint8 K-quant nibble chunks, rewritten in place in the Q4 layout's order. In each
    32-byte chunk, byte l holds element l of sub-block 2c (low nibble) and of 2c+1 (high); the Q4 layout
    wants byte j of a sub-block to hold its elements j and j+16, so bytes j (A) and j+16 (B) of a chunk
    swap A's high nibble with B's low nibble: t = (A>>4 ^ B) & 15; A ^= t<<4; B ^= t (XOR swap). In
    uint64 lanes B is 2 lanes after A; t is masked to zero in the lanes that hold B. t_buf: scratch of
    at least o.size/8 - 2 uint64."""
    f = _u64(o)
    t = t_buf[: f.size - 2]
    np.right_shift(f[:-2], 4, out=t)
    t ^= f[2:]
    t &= _lanes((0x0F0F0F0F0F0F0F0F, 0x0F0F0F0F0F0F0F0F, 0, 0), t.size)
    f[2:] ^= t
    t <<= 4
    f[:-2] ^= t


def _q5_k(flat, rows, cols):
    blocks = flat.view(_Q5_K)
    nb = cols // 32
    qs = np.empty((rows, 5 * nb), dtype=np.uint32)
    d = np.empty((rows, nb), dtype=np.uint16)             # f16 bits of d*sc, rounded as Q4_K's
    m = np.empty_like(d)                                   # f16 bits of -dmin*mn
    dv, mv = d.reshape(-1, 8), m.reshape(-1, 8)
    n_max = max(n for _, n in _superblock_chunks(rows, cols))
    ds, ms = (np.empty((n_max, 8), np.float32) for _ in range(2))
    o = np.empty((n_max, 128), dtype=np.uint8)             # scratch: one chunk's nibbles
    t_buf = np.empty(n_max * 16, dtype=_U64)               # scratch
    for b0, n in _superblock_chunks(rows, cols):
        blk = blocks[b0 : b0 + n]
        _k_scales(blk, ds[:n], ms[:n])
        dv[b0 : b0 + n] = ds[:n].astype(np.float16).view(np.uint16)
        mv[b0 : b0 + n] = ms[:n].astype(np.float16).view(np.uint16)
        o[:n].view("V32").reshape(n, 4)[:] = blk["qs"]
        _k_nibbles_to_q4_order(o[:n], t_buf)
        r0, r1 = b0 * 8 // nb, (b0 + n) * 8 // nb       # the chunk's rows (chunks are whole rows)
        # Bit s of qh[l] is bit 4 of element l of sub-block s: transpose the (32 x 8) bit matrix of each
        # super-block into one 32-bit word per sub-block, bit l for element l.
        qh = np.ascontiguousarray(blk["qh"]).view(np.uint8).reshape(n, 32, 1)
        bits = np.unpackbits(qh, axis=2, bitorder="little")                 # (n, l, s)
        words = np.packbits(bits.transpose(0, 2, 1), axis=2, bitorder="little")   # (n, s, 4) bytes
        high = np.ascontiguousarray(words).view("<u4").reshape(r1 - r0, nb)
        dequant.q5_join_numpy(o[:n].reshape(r1 - r0, nb, 16), high, qs[r0:r1])
    return Q5Weight(qs, d, m)


def _q6_k(flat, rows, cols):
    blocks = flat.view(_Q6_K)
    nb = cols // 32
    qs = np.empty((rows, 3 * nb), dtype=np.uint64)
    d = np.empty((rows, nb), dtype=np.uint32)             # two f16 bits of d*sc per block, rounded as Q4_K's
    dv = d.view(np.uint16).reshape(-1, 16)
    n_max = max(n for _, n in _superblock_chunks(rows, cols))
    o = np.empty((n_max, 256), dtype=np.uint8)            # scratch: one chunk's values 0..63
    h_buf = np.empty((n_max, 256), dtype=np.uint8)        # scratch
    ds = np.empty((n_max, 16), np.float32)                # scratch
    for b0, n in _superblock_chunks(rows, cols):
        blk = blocks[b0 : b0 + n]
        np.multiply(blk["scales"], blk["d"].astype(np.float32)[:, None], out=ds[:n])
        dv[b0 : b0 + n] = ds[:n].astype(np.float16).view(np.uint16)
        # Quarter t (32 elements) of each half takes its low 4 bits from ql bytes 32*(t%2) + l of
        # that half, nibble t//2, and its top 2 bits from bit pair t of qh byte l of that half.
        q = o[:n]                                         # (n, half, t//2, t%2, 32)
        q.view("V32").reshape(n, 2, 2, 2)[:] = blk["ql"].reshape(n, 2, 1, 2)
        f = _u64(q)
        f >>= _lanes(_runs(0, 4, lanes=8), f.size)
        f &= _NIBBLES
        high = h_buf[:n]                                  # (n, half, t, 32)
        high.view("V32").reshape(n, 2, 4)[:] = blk["qh"][:, :, None]
        h = _u64(high)
        h >>= _lanes(_runs(0, 2, 4, 6, lanes=4), h.size)
        h &= _U64(0x0303030303030303)
        h <<= 4
        f |= h
        r0, r1 = b0 * 8 // nb, (b0 + n) * 8 // nb       # the chunk's rows (chunks are whole rows)
        dequant.q6_join_numpy(q.reshape(r1 - r0, nb, 32), qs[r0:r1])
    return Q6Weight(qs, d, np.empty((rows, 0), dtype=np.float32))


_CONVERTERS = {
    F32: _f32,
    F16: lambda f, r, c: F16Weight(_bits16(f, r, c)),
    BF16: lambda f, r, c: BF16Weight(_bits16(f, r, c)),
    Q4_0: lambda f, r, c: _q4_legacy(f, r, c, with_min=False),
    Q4_1: lambda f, r, c: _q4_legacy(f, r, c, with_min=True),
    Q5_0: lambda f, r, c: _q5_legacy(f, r, c, with_min=False),
    Q5_1: lambda f, r, c: _q5_legacy(f, r, c, with_min=True),
    Q8_0: _q8_0,
    Q4_K: _q4_k,
    Q5_K: _q5_k,
    Q6_K: _q6_k,
}
