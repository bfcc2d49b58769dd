"""Matrix products for prefill on Q4, Q5, Q6 and 32-block I8 weights: out (n, rows) = x (n, cols) @ W.T, with each
token's x rounded to int8 per block of 32 (kernels/intdot.py), as decode rounds it and as ggml does.

Why: the f32 path dequantizes tiles of W and calls BLAS, which runs at the f32 FMA's rate. With x in
int8, the products are integer SIMD dot products (kernels/rowdot.py: vpdpbusd, pmaddubsw, or the
generic vector IR), several multiply-adds per lane per instruction, and W is read in its storage
precision: no f32 copy of any tile.

Two numba forms, chosen per call:
- rows in lanes (_gemm_lanes_numba, kernels/lanetile.py), where the CPU has AVX-512 VNNI and the rows are
  a multiple of 32: each prange iteration packs 32 rows into a layout with one row per 32-bit lane,
  then every token passes over them; the float work per block of 32 is shared by 16 rows;
- rows in turn (_gemm_numba) everywhere else, laid out as follows.
How the rows-in-turn kernel is laid out:
- every token's x is rounded once, in parallel (rowdot.round_x: natural and Q4 step order, lane
  corrections, block scales and rounded block sums, one row per token);
- W is cut into panels of PANEL rows, one prange iteration each: a panel (PANEL rows of W, 64 KiB
  of Q4 at 2048 columns) stays in the core's L2 while every token passes over it;
- inside a panel, register tiles of TILE_ROWS rows by TILE_TOKENS tokens (rowdot's q4_tile and
  i8_tile): each weight load serves TILE_TOKENS tokens, each load of x TILE_ROWS rows;
- the rows and tokens left over take the one-row dot (rowdot.row), and the min terms (m, or Q4_0's
  -8d, times the rounded block sums) are added per row and token, as the one-row dot adds them.

Numerics: the integer block sums are exact; the results equal the twin's, which multiplies the rounded
x by W dequantized to f32 through BLAS, up to the order of the float sums.
"""

import numpy as np

from kernels import dequant, intdot, lanetile, sparse24, target
from kernels.backend import NUMBA, jit
from kernels.neuron_records import check_weight_rows

if NUMBA:
    from numba import prange, types
    from numba.core.extending import overload

    from kernels import rowdot

PANEL = 64          # rows of W per prange iteration
TILE_ROWS = 4       # rows of W per register tile
TILE_TOKENS = 4     # tokens per register tile



def tile(w, d, r, t, xq, xp, xc, dx):
    """Rows r..r+TILE_ROWS-1 of w (Q4 nibbles or 32-block I8, by its dtype) with tokens t..t+TILE_TOKENS-1
    of x as _gemm_numba rounds it: TILE_ROWS*TILE_TOKENS float32, row-major, min terms excluded."""


if NUMBA:
    _q4_tile, _i8_tile, _q5_tile, _q6_tile, _s8_tile, _s4_tile = (
        rowdot.tile_intrinsic(f, TILE_ROWS, TILE_TOKENS) for f in ("q4", "i8", "q5", "q6", "s8", "s4"))

    @overload(tile, inline="always", jit_options={"fastmath": True})
    def _tile_ov(w, d, r, t, xq, xp, xc, dx):
        form = {types.uint8: _q4_tile, types.int8: _i8_tile, types.uint32: _q5_tile,
                types.uint64: _q6_tile, types.int16: _s8_tile, types.int32: _s4_tile}.get(w.dtype)
        if form is None:
            return None
        return lambda w, d, r, t, xq, xp, xc, dx: form(w, d, r, t, xq, xp, xc, dx)

# The twins dequantize this many weights at a time (1 MiB of f32) and hand each tile to BLAS.
_TILE_ELEMS = 1 << 18


def rounded_rows(x: np.ndarray) -> np.ndarray:
    """x (n, cols) f32 -> (n, cols) f32 as the integer kernels see it: rounded to int8 per block of 32."""
    n, cols = x.shape
    xq = np.empty(n * cols, dtype=np.int8)
    dx = np.empty(n * cols // 32, dtype=np.float32)
    intdot.quantize_q8_numpy(np.ascontiguousarray(x).reshape(-1), xq, dx)
    return (xq.reshape(-1, 32) * dx[:, None]).reshape(n, cols)


def _tiled_numpy(dequant_fn, arrays, x, out):
    """out = rounded x @ (W dequantized by dequant_fn).T, a tile of rows of W at a time. W's min terms
    (m, or Q4_0's -8d) are in the dequantized values, so they meet the rounded x's block sums."""
    xr = rounded_rows(x)
    rows, cols = out.shape[1], x.shape[1]
    step = max(1, min(rows, _TILE_ELEMS // cols))
    w = np.empty((step, cols), dtype=np.float32)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        wt = dequant_fn(*[a[r0:r1] for a in arrays], w[: r1 - r0])
        np.matmul(xr, wt.T, out=out[:, r0:r1])
    return out


def gemm_q4_numpy(qs, d, m, x, out):
    """qs (rows, cols/2) uint8, d (rows, cols/32) and m (rows, cols/32 or 0) f32 or uint16 f16 bits (the
    Q4 layout, kernels/layouts.md), x (n, cols) f32 -> out (n, rows) f32."""
    return _tiled_numpy(dequant.dequant_q4_numpy, (qs, d, m), x, out)


def gemm_q5_numpy(qs, d, m, x, out):
    """qs (rows, 5*cols/32) uint32, d (rows, cols/32) and m (rows, cols/32 or 0) f32 or uint16 f16 bits
    (the Q5 layout, kernels/layouts.md), x (n, cols) f32 -> out (n, rows) f32."""
    return _tiled_numpy(dequant.dequant_q5_numpy, (qs, d, m), x, out)


def gemm_q6_numpy(qs, d, m, x, out):
    """qs (rows, 3*cols/32) uint64, d (rows, cols/32) uint32 (two f16 scales per block), m (rows, 0) (the Q6
    layout, kernels/layouts.md), x (n, cols) f32 -> out (n, rows) f32."""
    return _tiled_numpy(dequant.dequant_q6_numpy, (qs, d, m), x, out)


def gemm_i8_numpy(q, d, m, x, out):
    """q (rows, cols) int8 in blocks of 32, d (rows, cols/32) and m (rows, cols/32 or 0) f32 or uint16 f16
    bits, x (n, cols) f32 -> out (n, rows) f32."""
    return _tiled_numpy(dequant.dequant_i8_numpy, (q, d, m), x, out)


def gemm_s24_numpy(qs, d, m, x, out):
    """qs, d a 2:4 weight (kernels/sparse24.py: qs int16 S8 or int32 S4, d (rows, cols/64) f16 bits, m
    (rows, 0)), x (n, cols) f32 -> out (n, rows) f32."""
    return _tiled_numpy(sparse24.dequant_numpy, (qs, d, m), x, out)


@jit(parallel=True)
def _gemm_numba(w, d, m, x, out):
    """Every layout: numba compiles one form per weight dtype (uint8 nibbles: Q4; uint32: Q5; uint64: Q6; int8: I8), and the
    rowdot forms are picked by that dtype. w, d, m with contiguous rows (kernels/neuron_records.py)."""
    check_weight_rows(w, d, m)
    n, cols = x.shape
    rows = w.shape[0]
    nb = cols // 32
    xq = np.empty((n, cols), dtype=np.int8)            # (n, cols) x rounded per block of 32
    xp = np.empty((n, cols), dtype=np.int8)            # (n, cols) the same in rowdot's Q4 step order
    xc = np.empty((n, cols // 4), dtype=np.int32)      # (n, cols/4) lane corrections (I8 on VNNI)
    dx = np.empty((n, nb), dtype=np.float32)           # (n, cols/32) block scales
    xsum = np.empty((n, nb), dtype=np.float32)         # (n, cols/32) rounded block sums, for the min terms
    for t in prange(n):
        rowdot.round_x(x[t], xq[t], xp[t], xc[t], dx[t], xsum[t])
    R, T = TILE_ROWS, TILE_TOKENS
    for g in prange((rows + PANEL - 1) // PANEL):
        r0 = g * PANEL
        r1 = min(rows, r0 + PANEL)
        rt = r0 + (r1 - r0) // R * R                   # rows r0..rt in whole tiles
        nt = n // T * T                                # tokens 0..nt in whole tiles
        for t in range(0, nt, T):
            for r in range(r0, rt, R):
                v = tile(w, d, r, t, xq, xp, xc, dx)
                for i in range(R):
                    for j in range(T):
                        out[t + j, r + i] = v[i * T + j]
            for r in range(rt, r1):
                for j in range(t, t + T):
                    out[j, r] = rowdot.row(w, d, m, r, xq[j], xp[j], xc[j], dx[j], xsum[j])
        for j in range(nt, n):
            for r in range(r0, r1):
                out[j, r] = rowdot.row(w, d, m, r, xq[j], xp[j], xc[j], dx[j], xsum[j])
        for j in range(nt):
            for r in range(r0, rt):
                out[j, r] += rowdot.min_part(w, d, m, r, xsum[j])
    return out


@jit(parallel=True)
def _gemm_lanes_numba(w, d, m, x, out, flip, row_bytes, split):
    """The rows-in-lanes form (kernels/lanetile.py) for AVX-512 VNNI and rows a multiple of 32: each
    prange iteration packs 32 rows (row_bytes each: lanetile.packed_bytes), then every token passes
    over them. split: scale blocks per block of 32 (2 for the Q6 layout, else 1)."""
    check_weight_rows(w, d, m)
    n, cols = x.shape
    rows = w.shape[0]
    nb = cols // 32
    xq = np.empty((n, cols), dtype=np.int8)            # (n, cols) x rounded per block of 32
    dx = np.empty((n, nb), dtype=np.float32)           # (n, cols/32) block scales
    xsum = np.empty((n, split * nb), dtype=np.float32) # (n, cols/32 or cols/16) rounded sums per scale block
    for t in prange(n):
        intdot.quantize_q8(x[t], xq[t], dx[t])
        intdot.rounded_block_sums(xq[t], dx[t], xsum[t])
    G, L, T = lanetile.GROUPS, lanetile.LANES, lanetile.TOKENS
    for p in prange(rows // (G * L)):
        ws = np.empty((G, L * row_bytes), dtype=np.uint8)      # (groups, 16 rows' bytes) packed rows
        sw = np.empty((G, split * nb * L), dtype=np.float32)   # (groups, scale blocks*16) scales
        mw = np.empty((G, split * nb * L), dtype=np.float32)   # (groups, scale blocks*16) min coefficients
        r0 = p * G * L
        for g in range(G):
            lanetile.pack(w, d, m, r0 + g * L, ws[g], sw[g], mw[g], flip)
        nt = n // T * T
        for t in range(0, nt, T):
            lanetile.tile(w, ws, sw, mw, xq, dx, xsum, t, out, r0)
        for t in range(nt, n):
            lanetile.tile1(w, ws, sw, mw, xq, dx, xsum, t, out, r0)
    return out


LANES_FORM = NUMBA and target.VNNI512     # the rows-in-lanes form runs on this machine


def _lanes(w) -> bool:
    return LANES_FORM and w.shape[0] % (lanetile.GROUPS * lanetile.LANES) == 0


def gemm_q4(qs, d, m, x, out):
    """gemm_q4_numpy's numba twin (the rows-in-lanes form where it applies)."""
    if _lanes(qs):
        return _gemm_lanes_numba(qs, d, m, x, out, False, lanetile.packed_bytes(qs, d.shape[1]), 1)
    return _gemm_numba(qs, d, m, x, out) if NUMBA else gemm_q4_numpy(qs, d, m, x, out)


def gemm_q5(qs, d, m, x, out):
    """gemm_q5_numpy's numba twin (the rows-in-lanes form where it applies)."""
    if _lanes(qs):
        return _gemm_lanes_numba(qs, d, m, x, out, False, lanetile.packed_bytes(qs, d.shape[1]), 1)
    return _gemm_numba(qs, d, m, x, out) if NUMBA else gemm_q5_numpy(qs, d, m, x, out)


def gemm_q6(qs, d, m, x, out):
    """gemm_q6_numpy's numba twin (the rows-in-lanes form where it applies, in blocks of 16)."""
    if _lanes(qs):
        return _gemm_lanes_numba(qs, d, m, x, out, False, lanetile.packed_bytes(qs, d.shape[1]), 2)
    return _gemm_numba(qs, d, m, x, out) if NUMBA else gemm_q6_numpy(qs, d, m, x, out)


def gemm_i8(q, d, m, x, out):
    """gemm_i8_numpy's numba twin (the rows-in-lanes form where it applies)."""
    if _lanes(q):
        return _gemm_lanes_numba(q, d, m, x, out, True, lanetile.packed_bytes(q, d.shape[1]), 1)
    return _gemm_numba(q, d, m, x, out) if NUMBA else gemm_i8_numpy(q, d, m, x, out)


def gemm_s24(qs, d, m, x, out):
    """gemm_s24_numpy's numba twin: the rows-in-lanes form where it applies, each group of rows expanded
    to dense bytes as it is packed; else the rows-in-turn form with rowdot's 2:4 tiles."""
    if _lanes(qs):
        return _gemm_lanes_numba(qs, d, m, x, out, False, lanetile.packed_bytes(qs, d.shape[1]), 1)
    return _gemm_numba(qs, d, m, x, out) if NUMBA else gemm_s24_numpy(qs, d, m, x, out)
