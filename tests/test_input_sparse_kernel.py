"""The input-sparse matvec and its Q4C layout (kernels/input_sparse.py): the layout holds the Q4 weight's
own values, the numba kernel equals its numpy twin, a threshold of 0 is the dense Q4 matvec, and a
threshold is the dense matvec of x with the small entries zeroed."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import backend, input_sparse as isp, matvec

RTOL = 1e-5   # against sum |w|*|x| (float32 sums in another order; numba runs with fastmath)

SHAPES = [(64, 32), (64, 96), (128, 64), (192, 576), (576, 1536), (960, 576), (320, 128)]


def _q4(rng, rows, cols, kind, sym):
    """A Q4 layout weight (qs, d, m): random nibbles, f32 or f16-bit scales; sym: Q4_0's empty m."""
    qs = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
    d = rng.uniform(0.001, 0.1, (rows, cols // 32)).astype(np.float32)
    m = rng.uniform(-0.5, 0.5, (rows, 0 if sym else cols // 32)).astype(np.float32)
    if kind == "f16":
        d, m = d.astype(np.float16).view(np.uint16), m.astype(np.float16).view(np.uint16)
    return qs, d, m


def _x(rng, cols):
    """Channels of different scales, exact zeros, both signs."""
    x = (rng.standard_normal(cols) * 10.0 ** rng.uniform(-1, 1, cols)).astype(np.float32)
    x[rng.random(cols) < 0.1] = 0.0
    return x


def _threshold(x, sparsity):
    return np.float32(np.quantile(np.abs(x), sparsity)) if sparsity > 0 else np.float32(0.0)


def _bound(qs, d, m, x):
    """sum |w| * |x| per row (float64), the scale of the float rounding errors."""
    from kernels.dequant import dequant_q4_numpy
    w = dequant_q4_numpy(qs, d, m, np.empty((qs.shape[0], 2 * qs.shape[1]), np.float32))
    return np.abs(w.astype(np.float64)) @ np.abs(x.astype(np.float64)) + 1e-30


@pytest.mark.parametrize("kind,sym", [("f32", False), ("f16", False), ("f16", True), ("f32", True)])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_layout_round_trip(rows, cols, kind, sym):
    rng = np.random.default_rng(rows + cols)
    w = _q4(rng, rows, cols, kind, sym)
    qc, dc, mc = isp.pack_q4c(*w)
    assert qc.shape == (cols, rows // 2) and dc.shape == (cols // 32, rows)
    assert mc.shape == ((cols // 32, 0) if sym else (cols // 32, rows))
    assert qc.nbytes + dc.nbytes + mc.nbytes == sum(a.nbytes for a in w)      # no byte added
    for a, b in zip(isp.unpack_q4c(qc, dc, mc), w):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    full = isp.dequant_q4c_numpy(qc, dc, mc, 0, cols // 32, np.empty((cols, rows), np.float32))
    from kernels.dequant import dequant_q4_numpy
    assert np.array_equal(full.T, dequant_q4_numpy(*w, np.empty((rows, cols), np.float32)))


def test_bad_shapes():
    for rows, cols in ((96, 32), (64, 48)):
        with pytest.raises(ValueError, match="Q4C layout needs"):
            isp.check_shape(rows, cols)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.95, 1.0])
def test_select_twins(sparsity):
    rng = np.random.default_rng(7)
    cols = 576
    x = _x(rng, cols)
    thr = _threshold(x, sparsity) if sparsity < 1 else np.float32(1e30)
    nb = cols // 32
    got = []
    for fn in (isp.select_numpy, isp.select):
        bufs = (np.empty(cols, np.int8), np.empty(nb, np.float32), np.empty(nb, np.float32),
                np.empty(nb, np.int32), np.full(cols, -1, np.int32), np.empty(nb + 1, np.int32))
        k = fn(x, thr, *bufs)
        got.append((k, bufs))
    (k0, a), (k1, b) = got
    assert k0 == k1 == int(np.count_nonzero(a[0]))
    for u, v in zip(a[:4], b[:4]):
        assert np.array_equal(u, v)
    assert np.array_equal(a[4][:k0], b[4][:k1]) and np.array_equal(a[5], b[5])
    kept = a[4][:k0]
    assert np.all(np.abs(x[kept]) >= thr) and np.all(a[0][kept] != 0)
    # the rounding is the dense kernels' rounding of x with the dropped entries zeroed
    xq, dx = np.empty(cols, np.int8), np.empty(nb, np.float32)
    from kernels import intdot
    intdot.quantize_q8_numpy(np.where(np.abs(x) >= thr, x, 0).astype(np.float32), xq, dx)
    assert np.array_equal(xq, a[0]) and np.array_equal(dx, a[1])


@pytest.mark.parametrize("kind,sym", [("f32", False), ("f16", False), ("f16", True)])
@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matvec_against_dense(rows, cols, sparsity, kind, sym):
    """The kernel and its twin equal the dense Q4 matvec (same int8 rounding) of x with the entries
    below the threshold zeroed; at threshold 0 that is the dense matvec of x itself."""
    rng = np.random.default_rng(rows * 7 + cols + int(sparsity * 100))
    w = _q4(rng, rows, cols, kind, sym)
    x = _x(rng, cols)
    thr = _threshold(x, sparsity)
    xm = np.where(np.abs(x) >= thr, x, np.float32(0.0)).astype(np.float32)
    want = matvec.matvec_q4_numpy(*w, xm, np.empty(rows, np.float32)).astype(np.float64)
    bound = _bound(*w, x)
    c = isp.pack_q4c(*w)
    twin = isp.matvec_q4c_numpy(*c, x, thr, np.empty(rows, np.float32))
    assert np.all(np.abs(twin - want) <= RTOL * bound)
    if backend.NUMBA:
        got = isp.matvec_q4c(*c, x, thr, np.full(rows, np.nan, np.float32))
        assert np.all(np.abs(got - want) <= RTOL * bound)
        assert np.all(np.abs(got - twin) <= RTOL * bound)


def test_everything_dropped_gives_zero():
    rng = np.random.default_rng(3)
    w = _q4(rng, 192, 576, "f16", False)
    x = _x(rng, 576)
    c = isp.pack_q4c(*w)
    for fn in (isp.matvec_q4c_numpy, isp.matvec_q4c):
        assert not np.any(fn(*c, x, np.float32(1e30), np.full(192, np.nan, np.float32)))


@pytest.mark.parametrize("sym", [False, True])
def test_q4c_weight_matches_q4_weight(sym):
    """The engine's Q4CWeight gives the Q4 weight's products: decode (threshold 0), prefill through BLAS,
    dequantized rows, and the input-sparse matvec."""
    from engine.model.weights import Q4CWeight, Q4Weight
    rng = np.random.default_rng(11)
    w = Q4Weight(*_q4(rng, 192, 576, "f16", sym))
    c = Q4CWeight.from_q4(w)
    assert c.shape == w.shape and c.nbytes == w.nbytes
    x = _x(rng, 576)
    bound = _bound(w.qs, w.d, w.m, x)
    assert np.all(np.abs(c.matvec(x) - w.matvec(x)) <= RTOL * bound)
    xs = np.stack([x, -x, 2 * x])
    assert np.all(np.abs(c.matmul(xs) - w.matmul(xs)) <= RTOL * bound)
    assert np.array_equal(c.to_float32(), w.to_float32())
    thr = _threshold(x, 0.5)
    xm = np.where(np.abs(x) >= thr, x, np.float32(0.0)).astype(np.float32)
    got = c.matvec_sparse(x, thr, np.empty(192, np.float32))
    assert np.all(np.abs(got - w.matvec(xm)) <= RTOL * bound)
    with pytest.raises(NotImplementedError):
        c.row_slice(0, 64)
