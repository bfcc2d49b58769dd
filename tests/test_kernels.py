"""Every matvec/dequant kernel against its plain-numpy twin and against a float64 reference.

The reference is built here straight from the layout table in kernels/layouts.md, so the numpy twins
are checked too (this matters under POCKETINFER_NO_NUMBA=1, where the selected kernel *is* the twin;
test_numpy_only_mode runs this whole file that way in a subprocess).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kernels import backend, dequant, intdot, matvec

REPO = Path(__file__).resolve().parent.parent

# numba runs with fastmath (reassociated float32 sums); errors are measured against sum |w|*|x|.
RTOL = 1e-5

SHAPES_32 = [(1, 32), (3, 32), (1, 64), (33, 64), (7, 96), (5, 576), (1536, 576), (2, 1024), (3, 1056)]
SHAPES_16 = [(1, 16), (3, 16), (33, 48), (1536, 576)]
# Rows wider than matvec.WIDE_COLS take the 4-rows-at-a-time loops: full groups, groups with 1-3 rows
# left over, fewer rows than a group, and the boundary itself (still one row at a time).
_W = matvec.WIDE_COLS
SHAPES_WIDE = [(1, _W + 32), (3, _W + 32), (4, _W + 32), (5, _W + 64), (10, _W + 32), (7, _W)]


# ---------------------------------------------------------------- random layouts and their float64 meaning

def _x(rng, cols):
    """Activations with exact zeros and both signs."""
    x = rng.standard_normal(cols).astype(np.float32)
    x[rng.random(cols) < 0.2] = 0.0
    x[0] = 0.0
    return x


def _halves(rng, shape):
    return rng.uniform(-2, 2, shape).astype(np.float16).view(np.uint16)


def _bf16s(rng, shape):
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _scales(rng, lo, hi, shape, kind):
    """Block scales as the layouts hold them: float32, or f16 as uint16 bits (kernels/layouts.md)."""
    a = rng.uniform(lo, hi, shape).astype(np.float32)
    return a.astype(np.float16).view(np.uint16) if kind == "f16" else a


def _q4(rng, rows, cols, kind="f32", sym=False):
    """sym: Q4_0's form, value d*(q-8) with an empty m."""
    qs = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
    d = _scales(rng, 0.001, 0.1, (rows, cols // 32), kind)
    m = _scales(rng, -0.5, 0.5, (rows, 0 if sym else cols // 32), kind)
    return qs, d, m


def _q5(rng, rows, cols, kind="f32", sym=False):
    """The Q5 layout: (rows, 5*cols/32) uint32 random bits; sym: Q5_0's form, value d*(q-16) with an
    empty m."""
    qs = rng.integers(0, 1 << 32, (rows, 5 * cols // 32), dtype=np.uint32)
    d = _scales(rng, 0.001, 0.1, (rows, cols // 32), kind)
    m = _scales(rng, -0.5, 0.5, (rows, 0 if sym else cols // 32), kind)
    return qs, d, m


def _q6(rng, rows, cols, kind="f16", sym=True):
    """The Q6 layout: (rows, 3*cols/32) uint64 random bits, two f16 scales of either sign per block as
    uint32, no m (kind and sym: for the shared parametrizations; Q6 has one form)."""
    qs = rng.integers(0, 1 << 63, (rows, 3 * cols // 32), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
    halves = rng.uniform(0.001, 0.1, (rows, cols // 16)) * rng.choice([-1.0, 1.0], (rows, cols // 16))
    d = halves.astype(np.float16).view(np.uint32)
    return qs, d, np.empty((rows, 0), np.float32)


def _i8(rng, rows, cols, block, with_min, kind="f32"):
    q = rng.integers(-128, 128, (rows, cols), dtype=np.int8)
    d = _scales(rng, 0.001, 0.1, (rows, cols // block), kind)
    nm = cols // block if with_min else 0
    m = _scales(rng, -0.5, 0.5, (rows, nm), kind)
    return q, d, m


def _f64(a):
    return a.view(np.float16).astype(np.float64) if a.dtype == np.uint16 else a.astype(np.float64)


def ref_f16(bits):
    return bits.view(np.float16).astype(np.float64)


def ref_bf16(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def ref_q4(qs, d, m):
    """Element 32b+j is the low nibble of qs[16b+j], element 32b+16+j its high nibble (layouts.md)."""
    rows, half = qs.shape
    q = np.empty((rows, half * 2), dtype=np.float64)
    for b in range(half // 16):
        byte = qs[:, 16 * b : 16 * b + 16]
        q[:, 32 * b : 32 * b + 16] = byte & 15
        q[:, 32 * b + 16 : 32 * b + 32] = byte >> 4
    block = np.arange(half * 2) // 32
    if not m.shape[1]:
        return (q - 8) * _f64(d)[:, block]
    return q * _f64(d)[:, block] + _f64(m)[:, block]


def ref_q4_int8x(qs, d, m, x):
    """What the Q4 matvec computes: the weights times x rounded to int8 per block of 32
    (kernels/intdot.py), min part (m, or -8d for Q4_0) included. float64 (rows,)."""
    xr = _int8_x(x)
    sym = not m.shape[1]
    scale_only = ref_q4(qs, d, np.zeros((qs.shape[0], 0 if sym else d.shape[1]), np.float32))
    if sym:
        scale_only += 8 * _f64(d)[:, np.arange(x.shape[0]) // 32]   # undo the -8 offset: d*q only
    mins = ref_q4(qs, d, m) - scale_only
    return scale_only @ xr + mins @ xr


def ref_q5(qs, d, m):
    """Each row in groups of four blocks, then a two and/or a one; a group of k blocks is 16k bytes of
    the Q4 layout's nibbles, then one little-endian 32-bit word per block whose bit j is bit 4 of the
    block's element j (layouts.md); value d*q + m, or d*(q-16) with an empty m."""
    rows, nb = d.shape
    by = qs.view(np.uint8)
    q = np.empty((rows, 32 * nb), dtype=np.float64)
    b, at = 0, 0
    while b < nb:
        k = 4 if nb - b >= 4 else (2 if nb - b >= 2 else 1)
        for i in range(k):
            nib = by[:, at + 16 * i: at + 16 * i + 16].astype(np.int64)
            word = by[:, at + 16 * k + 4 * i: at + 16 * k + 4 * i + 4].astype(np.int64)
            high = word[:, 0] | word[:, 1] << 8 | word[:, 2] << 16 | word[:, 3] << 24
            for j in range(16):
                q[:, 32 * (b + i) + j] = (nib[:, j] & 15) + 16 * ((high >> j) & 1)
                q[:, 32 * (b + i) + 16 + j] = (nib[:, j] >> 4) + 16 * ((high >> (j + 16)) & 1)
        at += 20 * k
        b += k
    block = np.arange(32 * nb) // 32
    if not m.shape[1]:
        return (q - 16) * _f64(d)[:, block]
    return q * _f64(d)[:, block] + _f64(m)[:, block]


def ref_q6(qs, d, m):
    """Each row in the Q5 layout's groups; a group of k blocks is 16k bytes of the Q4 layout's nibbles,
    then 8k crumb bytes: the step's low vector (the k blocks' elements 0..15) and high vector (16..31)
    take bits 4-5 of their values e < 8k from bit pairs 0 and 2 of crumb e, those of e >= 8k from pairs 1
    and 3 of crumb e - 8k (layouts.md); value scale * (q - 32), a scale per 16 elements."""
    rows, nb = d.shape
    by = qs.view(np.uint8).astype(np.int64)
    q = np.empty((rows, 32 * nb), dtype=np.float64)
    b, at = 0, 0
    while b < nb:
        k = 4 if nb - b >= 4 else (2 if nb - b >= 2 else 1)
        for e in range(16 * k):
            nib, crumb = by[:, at + e], by[:, at + 16 * k + e % (8 * k)]
            pair = e // (8 * k)
            el = 32 * (b + e // 16) + e % 16
            q[:, el] = (nib & 15) + 16 * ((crumb >> (2 * pair)) & 3)
            q[:, el + 16] = (nib >> 4) + 16 * ((crumb >> (4 + 2 * pair)) & 3)
        at += 24 * k
        b += k
    scales = d.view(np.float16).astype(np.float64)                     # (rows, 2*nb), one per 16
    return (q - 32) * scales[:, np.arange(32 * nb) // 16]


def ref_i8(q, d, m):
    block = np.arange(q.shape[1]) // (q.shape[1] // d.shape[1])
    w = q.astype(np.float64) * _f64(d)[:, block]
    if m.shape[1]:
        w += _f64(m)[:, block]
    return w


def _check_matvec(kernel, twin, args, w64, x, want=None):
    """Both backends against want (default w64 @ x) relative to sum |w||x|, and against each other.
    Kernels that round x to int8 pass `want` computed from the rounded x, and must also stay within
    that rounding (~1/254 of each block's max |x|) of the float product."""
    rows = w64.shape[0]
    exact = w64 @ x.astype(np.float64)
    want = exact if want is None else want
    scale = np.abs(w64) @ np.abs(x.astype(np.float64)) + 1e-30
    for fn in (kernel, twin):
        out = np.full(rows, np.nan, dtype=np.float32)
        got = fn(*args, x, out)
        assert got is out
        assert got.dtype == np.float32 and got.shape == (rows,)
        err = np.abs(got - want) / scale
        assert err.max() < RTOL, f"{getattr(fn, '__name__', fn)}: max relative error {err.max():.2e}"
        assert (np.abs(got - exact) / scale).max() < 1e-2
    a = kernel(*args, x, np.empty(rows, np.float32))
    b = twin(*args, x, np.empty(rows, np.float32))
    assert (np.abs(a - b) / scale).max() < RTOL


def _int8_x(x):
    """x rounded to int8 per block of 32 as kernels/intdot.py does, float64."""
    xq = np.empty(x.shape[0], np.int8)
    dx = np.empty(x.shape[0] // 32, np.float32)
    intdot.quantize_q8_numpy(x, xq, dx)
    return (xq.reshape(-1, 32).astype(np.float64) * dx[:, None]).reshape(-1)


def _check_dequant(kernel, twin, args, w64):
    scale = np.abs(w64) + 1.0
    for fn in (kernel, twin):
        out = np.full(w64.shape, np.nan, dtype=np.float32)
        got = fn(*args, out)
        assert got is out
        assert (np.abs(got - w64) / scale).max() < 1e-6, getattr(fn, "__name__", fn)


# ---------------------------------------------------------------- matvec

@pytest.mark.parametrize("rows,cols", SHAPES_32 + [(2, 16)] + SHAPES_WIDE)
def test_matvec_f16(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols)
    bits = _halves(rng, (rows, cols))
    _check_matvec(matvec.matvec_f16, matvec.matvec_f16_numpy, (bits,), ref_f16(bits), _x(rng, cols))


@pytest.mark.parametrize("rows,cols", SHAPES_32 + [(2, 16)] + SHAPES_WIDE)
def test_matvec_bf16(rows, cols):
    rng = np.random.default_rng(rows * 1000 + cols + 1)
    bits = _bf16s(rng, (rows, cols))
    _check_matvec(matvec.matvec_bf16, matvec.matvec_bf16_numpy, (bits,), ref_bf16(bits), _x(rng, cols))


# The layouts whose matvecs multiply x rounded to int8: (kernel, twin, random arrays, float64 values).
NIBBLE_LAYOUTS = {"q4": (matvec.matvec_q4, matvec.matvec_q4_numpy, _q4, ref_q4),
                  "q5": (matvec.matvec_q5, matvec.matvec_q5_numpy, _q5, ref_q5)}


@pytest.mark.parametrize("layout", list(NIBBLE_LAYOUTS))
@pytest.mark.parametrize("kind,sym", [("f32", False), ("f16", False), ("f16", True), ("f32", True)])
@pytest.mark.parametrize("rows,cols", SHAPES_32 + SHAPES_WIDE)
def test_matvec_q4_q5(rows, cols, kind, sym, layout):
    """Exact to float rounding against x rounded to int8 as intdot does, and within that rounding
    (~1/254 of each block's max |x|) of the float product."""
    kernel, twin, make, ref = NIBBLE_LAYOUTS[layout]
    rng = np.random.default_rng(rows * 1000 + cols + 2)
    args = make(rng, rows, cols, kind, sym)
    x = _x(rng, cols)
    w64 = ref(*args)
    want = ref_q4_int8x(*args, x) if layout == "q4" else w64 @ _int8_x(x)
    _check_int8x_matvec((kernel, twin), args, x, w64, want)


@pytest.mark.parametrize("rows,cols", SHAPES_32 + SHAPES_WIDE)
def test_matvec_q6(rows, cols):
    """As test_matvec_q4_q5, for the Q6 layout (one form: f16 scales per 16 elements, no m)."""
    rng = np.random.default_rng(rows * 1000 + cols + 6)
    args = _q6(rng, rows, cols)
    x = _x(rng, cols)
    w64 = ref_q6(*args)
    _check_int8x_matvec((matvec.matvec_q6, matvec.matvec_q6_numpy), args, x, w64, w64 @ _int8_x(x))


def _check_int8x_matvec(fns, args, x, w64, want):
    """Each of fns (kernel, twin) within float rounding of want (the product with x rounded to int8), within
    that rounding of the float product, and the two within float rounding of each other."""
    rows = w64.shape[0]
    scale = np.abs(w64) @ np.abs(x.astype(np.float64)) + 1e-30
    outs = []
    for fn in fns:
        out = np.full(rows, np.nan, dtype=np.float32)
        assert fn(*args, x, out) is out
        assert (np.abs(out - want) / scale).max() < RTOL, getattr(fn, "__name__", fn)
        assert (np.abs(out - w64 @ x) / scale).max() < 1e-2
        outs.append(out)
    assert (np.abs(outs[0] - outs[1]) / scale).max() < RTOL


@pytest.mark.parametrize("cols", [32, 64, 96, 576, 11008])
def test_quantize_q8(cols):
    """int8 rounding of x per block: numba and numpy agree, and each value is within half a step."""
    rng = np.random.default_rng(cols)
    x = _x(rng, cols) * np.float32(3.0)
    x[:32] = 0.0                                     # an all-zero block: scale 0, values 0
    got = []
    for fn in (intdot.quantize_q8, intdot.quantize_q8_numpy):
        xq = np.empty(cols, np.int8)
        dx = np.full(cols // 32, np.nan, np.float32)
        fn(x, xq, dx)
        assert np.abs(xq.astype(np.int32)).max() <= 127
        err = np.abs(xq.reshape(-1, 32) * dx[:, None] - x.reshape(-1, 32))
        assert (err <= dx[:, None] * 0.5001 + 1e-12).all()
        assert dx[0] == 0 and not xq[:32].any()
        got.append(xq)
    assert (np.abs(got[0].astype(np.int32) - got[1]) <= 1).all()
    # numba's two forms (the vector IR on C arrays, loops on strided ones) agree bit for bit
    wide = np.zeros(2 * cols, np.float32)
    wide[::2] = x
    xq, dx = np.empty(cols, np.int8), np.empty(cols // 32, np.float32)
    intdot.quantize_q8(wide[::2], xq, dx)
    np.testing.assert_array_equal(xq, got[0])


def test_quantize_q8_rounds_ties_to_even():
    """A block whose max |x| is 127 has scale 1, so x is its own scaled value: halves round to the even
    neighbour, as np.rint does, in numba and numpy alike."""
    x = np.zeros(32, np.float32)
    x[:9] = [127, 0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 126.5]
    want = np.zeros(32, np.int8)
    want[:9] = [127, 0, 2, 2, 4, 0, -2, -2, 126]
    for fn in (intdot.quantize_q8, intdot.quantize_q8_numpy):
        xq, dx = np.empty(32, np.int8), np.empty(1, np.float32)
        fn(x, xq, dx)
        np.testing.assert_array_equal(xq, want)
        assert dx[0] == 1.0


def test_min_term_twins(half_code):
    """The vectorized min-term intrinsics (8 blocks per step, then a scalar tail) against their numpy
    twins: both scale dtypes (f16 converted in hardware or with integers), block counts below, at and
    above multiples of 8, Q4_0's empty m."""
    if not backend.NUMBA:
        pytest.skip("numba only (the numpy twins are tested through matvec)")
    from numba import njit

    @njit(cache=False)
    def rows(d, m, xsum, out, out2):
        for r in range(d.shape[0]):
            out[r] = intdot.min_term(d, m, r, xsum)
            out2[r] = intdot.scale_dot(d, r, xsum)
        return out

    rng = np.random.default_rng(12)
    for nb in (1, 7, 8, 9, 18, 48, 49):
        for kind in ("f32", "f16"):
            _, d, m = _q4(rng, 5, 32 * nb, kind)
            xsum = rng.standard_normal(nb).astype(np.float32)
            for mm in (m, m[:, :0]):
                got, got2 = np.empty(5, np.float32), np.empty(5, np.float32)
                rows(d, np.ascontiguousarray(mm), xsum, got, got2)
                want = [intdot.min_term_numpy(d, mm, r, xsum) for r in range(5)]
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                np.testing.assert_allclose(got2, [intdot.scale_dot_numpy(d, r, xsum) for r in range(5)],
                                           rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("with_min", [False, True])
@pytest.mark.parametrize("block,rows,cols", [(32, r, c) for r, c in SHAPES_32 + SHAPES_WIDE]
                         + [(16, r, c) for r, c in SHAPES_16 + SHAPES_WIDE]
                         + [(64, 3, 128), (64, 5, _W + 64)])   # a block size no GGUF format has
def test_matvec_i8(block, rows, cols, with_min, kind):
    """Blocks of 32 (Q8_0, Q5_*) multiply x rounded to int8 (kernels/intdot.py); others float x."""
    rng = np.random.default_rng(rows * 1000 + cols + block + with_min)
    q, d, m = args = _i8(rng, rows, cols, block, with_min, kind)
    x = _x(rng, cols)
    want = None
    if block == 32:
        mins = ref_i8(q, d, m) - ref_i8(q, d, m[:, :0])
        want = ref_i8(q, d, m[:, :0]) @ _int8_x(x) + mins @ _int8_x(x)
    _check_matvec(matvec.matvec_i8, matvec.matvec_i8_numpy, args, ref_i8(*args), x, want)


def test_matvec_f32():
    rng = np.random.default_rng(5)
    w = rng.standard_normal((33, 64)).astype(np.float32)
    x = _x(rng, 64)
    out = np.empty(33, np.float32)
    assert matvec.matvec_f32(w, x, out) is out
    np.testing.assert_allclose(out, w.astype(np.float64) @ x, rtol=1e-5, atol=1e-5)


def test_matvec_all_zero_x():
    rng = np.random.default_rng(6)
    x = np.zeros(64, np.float32)
    for args in (_q4(rng, 3, 64), _q4(rng, 3, 64, "f16", sym=True)):
        for fn in (matvec.matvec_q4, matvec.matvec_q4_numpy):
            assert not fn(*args, x, np.full(3, np.nan, np.float32)).any()


# ---------------------------------------------------------------- dequant

@pytest.mark.parametrize("rows,cols", [(1, 16), (3, 32), (33, 64), (1536, 576)])
def test_dequant_f16(rows, cols):
    rng = np.random.default_rng(rows + cols)
    bits = _halves(rng, (rows, cols))
    _check_dequant(dequant.dequant_f16, dequant.dequant_f16_numpy, (bits,), ref_f16(bits))


@pytest.mark.parametrize("rows,cols", [(1, 16), (3, 32), (33, 64), (1536, 576)])
def test_dequant_bf16(rows, cols):
    rng = np.random.default_rng(rows + cols + 1)
    bits = _bf16s(rng, (rows, cols))
    _check_dequant(dequant.dequant_bf16, dequant.dequant_bf16_numpy, (bits,), ref_bf16(bits))


@pytest.mark.parametrize("kind,sym", [("f32", False), ("f16", False), ("f16", True)])
@pytest.mark.parametrize("rows,cols", SHAPES_32)
def test_dequant_q4(rows, cols, kind, sym):
    rng = np.random.default_rng(rows + cols + 2)
    args = _q4(rng, rows, cols, kind, sym)
    _check_dequant(dequant.dequant_q4, dequant.dequant_q4_numpy, args, ref_q4(*args))


@pytest.mark.parametrize("kind,sym", [("f32", False), ("f16", False), ("f16", True)])
@pytest.mark.parametrize("rows,cols", SHAPES_32)
def test_dequant_q5(rows, cols, kind, sym):
    rng = np.random.default_rng(rows + cols + 5)
    args = _q5(rng, rows, cols, kind, sym)
    _check_dequant(dequant.dequant_q5, dequant.dequant_q5_numpy, args, ref_q5(*args))


@pytest.mark.parametrize("rows,cols", SHAPES_32)
def test_dequant_q6(rows, cols):
    rng = np.random.default_rng(rows + cols + 6)
    args = _q6(rng, rows, cols)
    _check_dequant(dequant.dequant_q6, dequant.dequant_q6_numpy, args, ref_q6(*args))


def test_q6_values_round_trip():
    """q6_join_numpy writes what q6_values_numpy reads, for every tail of the groups."""
    rng = np.random.default_rng(61)
    for nb in range(1, 12):
        v = rng.integers(0, 64, (3, nb, 32), dtype=np.uint8)
        qs = dequant.q6_join_numpy(v, np.zeros((3, 3 * nb), np.uint64))
        np.testing.assert_array_equal(dequant.q6_values_numpy(qs, nb), v)


@pytest.mark.parametrize("kind", ["f32", "f16"])
@pytest.mark.parametrize("with_min", [False, True])
@pytest.mark.parametrize("block,rows,cols", [(32, r, c) for r, c in SHAPES_32] + [(16, r, c) for r, c in SHAPES_16]
                         + [(64, 3, 128)])
def test_dequant_i8(block, rows, cols, with_min, kind):
    rng = np.random.default_rng(rows + cols + block + with_min)
    args = _i8(rng, rows, cols, block, with_min, kind)
    _check_dequant(dequant.dequant_i8, dequant.dequant_i8_numpy, args, ref_i8(*args))


def test_dequant_row_slices():
    """Weights dequantize row tiles from sliced arrays (weights.py): slices must work too."""
    rng = np.random.default_rng(7)
    qs, d, m = _q4(rng, 40, 64)
    w64 = ref_q4(qs, d, m)
    out = np.empty((7, 64), np.float32)
    for fn in (dequant.dequant_q4, dequant.dequant_q4_numpy):
        fn(qs[30:37], d[30:37], m[30:37], out)
        np.testing.assert_allclose(out, w64[30:37], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- 16-bit float conversion

def _all_halves():
    return np.arange(65536, dtype=np.uint32).astype(np.uint16).reshape(256, 256)


def _same_floats(got, want):
    """Equal values, NaN where NaN (NaN payloads and the sign of zero may differ)."""
    nan = np.isnan(want)
    assert (np.isnan(got) == nan).all()
    assert (got[~nan] == want[~nan]).all()


def test_dequant_f16_every_pattern():
    bits = _all_halves()
    want = bits.view(np.float16).astype(np.float32)
    for fn in (dequant.dequant_f16, dequant.dequant_f16_numpy):
        _same_floats(fn(bits, np.empty((256, 256), np.float32)), want)


def test_dequant_bf16_every_pattern():
    bits = _all_halves()
    want = (bits.astype(np.uint32) << 16).view(np.float32)
    for fn in (dequant.dequant_bf16, dequant.dequant_bf16_numpy):
        _same_floats(fn(bits, np.empty((256, 256), np.float32)), want)


def _f16_int_kernels():
    """The integer half conversion (used where the CPU has none) in a dequant loop and a dot loop,
    compiled like the kernels (fastmath), whichever conversion this machine selected."""
    import numba

    conv = dequant.f16_to_f32_int

    @numba.njit(fastmath=True)
    def convert(bits, out):
        for k in range(bits.shape[0]):
            out[k] = conv(bits[k])
        return out

    @numba.njit(fastmath=True)
    def dot(bits, x):
        acc = np.float32(0.0)
        for k in range(bits.shape[0]):
            acc += conv(bits[k]) * x[k]
        return acc

    return convert, dot


@pytest.mark.skipif(not backend.NUMBA, reason="numba kernels only")
def test_f16_integer_conversion_every_pattern():
    convert, _ = _f16_int_kernels()
    bits = _all_halves().reshape(-1)
    _same_floats(convert(bits, np.empty(65536, np.float32)), bits.view(np.float16).astype(np.float32))


@pytest.mark.skipif(not backend.NUMBA, reason="numba kernels only")
def test_f16_integer_conversion_large_activations():
    """No rescaling constant may meet x: fastmath would fold it into x, and x * 2**112 overflows."""
    _, dot = _f16_int_kernels()
    rng = np.random.default_rng(8)
    bits = _halves(rng, 4096)
    x = (rng.standard_normal(4096) * 1e6).astype(np.float32)
    want = ref_f16(bits) @ x.astype(np.float64)
    scale = np.abs(ref_f16(bits)) @ np.abs(x.astype(np.float64))
    assert abs(dot(bits, x) - want) / scale < RTOL


@pytest.mark.skipif(not backend.NUMBA, reason="LLVM IR: numba only")
def test_half_to_f32_ir_every_pattern(half_code):
    """kernels/llvm_ir.half_to_f32, how the hand-written IR converts f16 scales, on every half pattern,
    as a scalar and in vectors of 8: hardware fpext, or the integer form of targets without one."""
    from numba import njit, types
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import F32, I16, data, half_to_f32, vec

    @intrinsic
    def convert1(typingctx, h):
        return types.float32(h), lambda context, builder, sig, args: half_to_f32(builder, args[0])

    @intrinsic
    def convert8(typingctx, bits, out, k):
        def codegen(context, builder, sig, args):
            src = builder.gep(data(context, builder, sig.args[0], args[0]), [args[2]])
            dst = builder.gep(data(context, builder, sig.args[1], args[1]), [args[2]])
            v = builder.load(builder.bitcast(src, vec(I16, 8).as_pointer()), align=2)
            builder.store(half_to_f32(builder, v), builder.bitcast(dst, vec(F32, 8).as_pointer()), align=4)
            return context.get_dummy_value()
        return types.void(bits, out, k), codegen

    @njit(cache=False, fastmath=True)
    def run(bits, one, eight):
        for k in range(bits.shape[0]):
            one[k] = convert1(bits[k])
        for k in range(0, bits.shape[0], 8):
            convert8(bits, eight, k)

    bits = _all_halves().reshape(-1)
    one, eight = np.empty(65536, np.float32), np.empty(65536, np.float32)
    run(bits, one, eight)
    want = bits.view(np.float16).astype(np.float32)
    _same_floats(one, want)
    _same_floats(eight, want)


def test_matvec_f16_special_values():
    """Subnormal, zero, largest finite halves, and activations far beyond the half range."""
    rng = np.random.default_rng(9)
    rows, cols = 6, 256
    vals = np.array([0.0, -0.0, 6e-8, -6e-8, 3e-5, 65504.0, -65504.0, 1.0], np.float16)
    bits = rng.choice(vals, (rows, cols)).view(np.uint16)
    x = _x(rng, cols) * np.float32(1e5)
    _check_matvec(matvec.matvec_f16, matvec.matvec_f16_numpy, (bits,), ref_f16(bits), x)


# ---------------------------------------------------------------- numpy twins work in chunks of rows

@pytest.mark.parametrize("chunk", [64, 1000])
def test_numpy_twins_in_chunks(chunk, monkeypatch):
    """Many chunks, a partial last chunk, rows longer than a chunk: same results."""
    monkeypatch.setattr(matvec, "CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(chunk)
    rows, cols = 37, 256
    x = _x(rng, cols)
    bits = _halves(rng, (rows, cols))
    cases = [
        (matvec.matvec_f16_numpy, (bits,), ref_f16(bits)),
        (matvec.matvec_bf16_numpy, (_bf16s(rng, (rows, cols)),), None),

        (matvec.matvec_i8_numpy, _i8(rng, rows, cols, 16, False), None),
    ]
    refs = {matvec.matvec_bf16_numpy: ref_bf16, matvec.matvec_i8_numpy: ref_i8}
    for fn, args, w64 in cases:
        w64 = refs[fn](*args) if w64 is None else w64
        out = np.full(rows, np.nan, np.float32)
        assert fn(*args, x, out) is out
        want = w64 @ x.astype(np.float64)
        scale = np.abs(w64) @ np.abs(x.astype(np.float64)) + 1e-30
        assert (np.abs(out - want) / scale).max() < RTOL
    q, d, m = _i8(rng, rows, cols, 32, True)
    out = np.full(rows, np.nan, np.float32)
    assert matvec.matvec_i8_numpy(q, d, m, x, out) is out
    mins = ref_i8(q, d, m) - ref_i8(q, d, m[:, :0])
    want = ref_i8(q, d, m[:, :0]) @ _int8_x(x) + mins @ _int8_x(x)
    assert (np.abs(out - want) / (np.abs(ref_i8(q, d, m)) @ np.abs(x.astype(np.float64)))).max() < RTOL
    for args in (_q4(rng, rows, cols), _q4(rng, rows, cols, "f16", sym=True)):
        out = np.full(rows, np.nan, np.float32)
        assert matvec.matvec_q4_numpy(*args, x, out) is out
        scale = np.abs(ref_q4(*args)) @ np.abs(x.astype(np.float64)) + 1e-30
        assert (np.abs(out - ref_q4_int8x(*args, x)) / scale).max() < RTOL


# ---------------------------------------------------------------- numpy-only mode

@pytest.mark.slow
def test_numpy_only_mode():
    """This file again with POCKETINFER_NO_NUMBA=1, as on Termux where numba has no wheel."""
    if not backend.NUMBA:
        pytest.skip("already running without numba: this run is the numpy-only check")
    env = dict(os.environ, POCKETINFER_NO_NUMBA="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
         "-x", "-k", "not numpy_only_mode"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    probe = subprocess.run(
        [sys.executable, "-c", "from kernels import backend, matvec; "
         "print(backend.NUMBA, matvec.matvec_q4 is matvec.matvec_q4_numpy)"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert probe.stdout.split() == ["False", "True"], probe.stdout + probe.stderr


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 5])
def test_glu_twins(kind, n):
    """kernels/activation.glu (one token serial, several in parallel) against glu_numpy, on the views the
    dense FFN passes: gate and up halves of one (n, 2*ffn) array, the output written over gate."""
    from kernels import activation

    rng = np.random.default_rng(kind + 10 * n)
    gu = (rng.standard_normal((n, 2 * 70)) * 3).astype(np.float32)
    want = activation.glu_numpy(gu[:, :70], gu[:, 70:], kind, np.empty((n, 70), np.float32))
    got = activation.glu(gu[:, :70], gu[:, 70:], kind, gu[:, :70])
    assert got.base is gu or got is gu[:, :70] or np.shares_memory(got, gu)
    np.testing.assert_allclose(gu[:, :70], want, rtol=1e-6, atol=1e-6)
