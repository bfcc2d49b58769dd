"""kernels/sparse_ffn.py: every numba kernel against its numpy twin and a float64 reference built from
the layout table (kernels/layouts.md), on random weights in every layout, both scale dtypes, and the
edge cases of the active set (none, one, all). test_numpy_only_mode reruns this file without numba."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.executors.predictor import LayerPredictor
from kernels import dequant, sparse_ffn as S
from kernels.backend import NUMBA
from kernels.neuron_records import layout, pack, rows_contiguous
from tests.test_kernels import _q6, ref_q5, ref_q6

REPO = Path(__file__).resolve().parent.parent
RTOL = 1e-5          # fastmath reassociates f32 sums; errors are measured against sum |terms|


def _scales(rng, lo, hi, shape, kind):
    a = rng.uniform(lo, hi, shape).astype(np.float32)
    return a.astype(np.float16).view(np.uint16) if kind == "f16" else a


def _f64(a):
    return a.view(np.float16).astype(np.float64) if a.dtype == np.uint16 else a.astype(np.float64)


def make(rng, layout, rows, cols):
    """(w, d, m), bits16, and the float64 meaning as (scaled, offsets, rounds_x): value (r, c) =
    scaled[r, c] + offsets[r, c // 32]; rounds_x says the kernels multiply `scaled` by x rounded to int8
    per block of 32 (kernels/intdot.py), offsets included (they meet the block sums of the rounded x)."""
    e = np.zeros((rows, 0), np.float32)
    no_off = np.zeros((rows, max(1, cols // 32)))
    if layout == "f32":
        w = rng.standard_normal((rows, cols)).astype(np.float32) * 0.2
        return (w, e, e), 0, (w.astype(np.float64), no_off, False)
    if layout == "f16":
        w = (rng.standard_normal((rows, cols)) * 0.2).astype(np.float16)
        return (w.view(np.uint16), e, e), 0, (w.astype(np.float64), no_off, False)
    if layout == "bf16":
        bits = (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        ref = (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        return (bits, e, e), 1, (ref, no_off, False)
    if layout.startswith("q4"):                      # q4-<scale kind>[-sym]
        kind, sym = layout.split("-")[1], layout.endswith("sym")
        qs = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
        d = _scales(rng, 0.01, 0.05, (rows, cols // 32), kind)
        m = _scales(rng, -0.3, 0.0, (rows, 0 if sym else cols // 32), kind)
        q = np.empty((rows, cols))
        for b in range(cols // 32):
            byte = qs[:, 16 * b:16 * b + 16]
            q[:, 32 * b:32 * b + 16] = byte & 15
            q[:, 32 * b + 16:32 * b + 32] = byte >> 4
        blk = np.arange(cols) // 32
        off = -8 * _f64(d) if sym else _f64(m)
        return (qs, d, m), 0, (q * _f64(d)[:, blk], off, True)
    if layout.startswith("q5"):                      # q5-<scale kind>[-sym]: the Q5 layout, as tests/test_kernels.py
        kind, sym = layout.split("-")[1], layout.endswith("sym")
        qs = rng.integers(0, 1 << 32, (rows, 5 * cols // 32), dtype=np.uint32)
        d = _scales(rng, 0.005, 0.02, (rows, cols // 32), kind)
        m = _scales(rng, -0.3, 0.0, (rows, 0 if sym else cols // 32), kind)
        q = ref_q5(qs, np.ones((rows, cols // 32), np.float32), np.zeros((rows, cols // 32), np.float32))
        off = -16 * _f64(d) if sym else _f64(m)
        return (qs, d, m), 0, (q * _f64(d)[:, np.arange(cols) // 32], off, True)
    if layout == "q6":                                # the Q6 layout, as tests/test_kernels.py, smaller scales
        qs, d, m = _q6(rng, rows, cols)
        d = (d.view(np.float16) * np.float16(0.2)).view(np.uint32)
        return (qs, d, m), 0, (ref_q6(qs, d, m), no_off, True)
    _, kind, block, mn = layout.split("-")            # i8-<scale kind>-<block>-<min|nomin>
    block = int(block)
    q = rng.integers(-127, 128, (rows, cols), dtype=np.int8)
    d = _scales(rng, 0.001, 0.004, (rows, cols // block), kind)
    m = _scales(rng, -0.1, 0.1, (rows, cols // block if mn == "min" else 0), kind)
    blk = np.arange(cols) // block
    scaled = q * _f64(d)[:, blk]
    if block != 32:                                   # float x: fold the offsets in
        return (q, d, m), 0, (scaled + (_f64(m)[:, blk] if mn == "min" else 0.0), no_off, False)
    return (q, d, m), 0, (scaled, _f64(m) if mn == "min" else no_off, True)


def full(ref):
    scaled, off, _ = ref
    return scaled + np.repeat(off, 32, axis=1)[:, :scaled.shape[1]]


def x_rounded(x):
    """x rounded to int8 per block of 32 as ggml's Q8 does it, in float32: d = max|x|/127,
    q = nearest integer of x * (127/max|x|)."""
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1)
    inv = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    q = np.rint(blocks * inv[:, None])
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float64)[:, None]).reshape(-1)


def dots(ref, x):
    scaled, off, rounds = ref
    xv = x_rounded(x) if rounds else x.astype(np.float64)
    xs = xv.reshape(-1, 32).sum(axis=1) if x.shape[0] % 32 == 0 else np.zeros(1)
    return scaled @ xv + off[:, :xs.shape[0]] @ xs


def magnitude(ref, x):
    """sum |terms| of each row's dot product: the scale of its float32 rounding error."""
    return np.abs(full(ref)) @ np.abs(x.astype(np.float64))


def act64(g, u, kind):
    if kind == 0:
        return g / (1 + np.exp(-g)) * u
    if kind == 1:
        return 0.5 * g * (1 + np.vectorize(math.erf)(g / math.sqrt(2))) * u
    if kind == 2:
        return 0.5 * g * (1 + np.tanh(math.sqrt(2 / math.pi) * (g + 0.044715 * g ** 3))) * u
    if kind == 3:
        return np.maximum(g, 0) * u
    return np.maximum(g, 0) * np.maximum(u, 0)


RECORDED = {("q4-f16-sym", "i8-f16-32-nomin"), ("i8-f16-32-nomin", "i8-f16-32-nomin"),   # Q4_0, Q8_0
            ("q5-f16-sym", "i8-f16-32-nomin"), ("q6", "i8-f16-32-nomin")}                # Q5_0, Q6_K


def kernels():
    return [S.sparse_ffn, S.sparse_ffn_numpy]


def split_kernels():
    return [(S.sparse_acts, S.sparse_down), (S.sparse_acts_numpy, S.sparse_down_numpy)]


def check(rng, layout, down_layout, hidden, ffn, idx, kind, given_gate=False):
    (gw, gd, gm), f1, gref = make(rng, layout, ffn, hidden)
    (uw, ud, um), f2, uref = make(rng, layout, ffn, hidden)
    (dw, dd, dm), f3, dref = make(rng, down_layout, ffn, hidden)
    dscale = rng.uniform(0.5, 2.0, hidden).astype(np.float32)      # per-hidden-dimension output scale
    d64 = full(dref) * dscale
    bits16 = max(f1, f2, f3)
    x = rng.standard_normal(hidden).astype(np.float32)
    x[rng.random(hidden) < 0.1] = 0.0
    g_all, u_all = dots(gref, x), dots(uref, x)
    gate = g_all.astype(np.float32) if given_gate else np.zeros(0, np.float32)
    if given_gate:
        g_all = gate.astype(np.float64)
    idx = np.asarray(idx, dtype=np.int32)
    a = act64(g_all[idx], u_all[idx], kind)
    want = a @ d64[idx]
    # |g|*|u| bounds what float32 rounding of the two dot products can do to act(g, u) (|act| <= |g u|)
    mag = magnitude(gref, x)[idx] * magnitude(uref, x)[idx] + np.abs(a)    # (n,) float64
    scale = mag @ np.abs(d64[idx]) + 1e-30
    outs = []
    for fn in kernels():
        out = np.full(hidden, np.nan, np.float32)
        acts = np.full(len(idx), np.nan, np.float32)
        got = fn(gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, bits16, x, idx, gate, kind, 2, acts, out)
        assert got is out and out.dtype == np.float32
        err = np.abs(out - want) / scale
        assert err.max() < RTOL, f"{fn.__name__}: relative error {err.max():.2e}"
        assert (np.abs(acts - a) <= RTOL * mag).all(), fn.__name__
        outs.append(out)
    # numba and its twin agree more tightly than either agrees with float64
    assert (np.abs(outs[0] - outs[1]) / scale).max() < RTOL
    # The same arrays as fields of neuron records (kernels/neuron_records.py): only the addresses change,
    # so the kernels give the same bits. Run for the layouts of Q4_0 and Q8_0 models with the int8 downT,
    # which engine/executors/sparse.py records: each other compiled form of the kernel would cost the cold suite
    # ~15 s, and the row pointers are the intrinsics' code for every Q4 and 32-block I8 layout.
    records = (layout, down_layout) in RECORDED
    if records:
        _, (rgw, ruw, rdw, rgd, rud, rdd, rgm, rum, rdm) = pack([gw, uw, dw, gd, ud, dd, gm, um, dm])
    for fn, ref_out in zip(kernels(), outs if records else ()):
        out = np.full(hidden, np.nan, np.float32)
        fn(rgw, rgd, rgm, ruw, rud, rum, rdw, rdd, rdm, dscale, bits16, x, idx, gate, kind, 2,
           np.full(len(idx), np.nan, np.float32), out)
        assert np.array_equal(out, ref_out), fn.__name__
    if not given_gate:
        # The flash executor's split of the same sum: activations, then down sums per chunk added in order.
        bounds = np.unique(np.r_[0:len(idx):7, len(idx)]).astype(np.int64)    # chunks of 7, last shorter
        for acts_fn, down_fn in split_kernels():
            acts = acts_fn(gw, gd, gm, uw, ud, um, bits16, x, idx, kind, 2, np.full(len(idx), np.nan, np.float32))
            assert (np.abs(acts - a) <= RTOL * mag).all(), acts_fn.__name__
            parts = np.full((len(bounds) - 1, hidden), np.nan, np.float32)
            parts = down_fn(dw, dd, dm, bits16, idx, acts, bounds, parts)
            out = parts.sum(axis=0, dtype=np.float32) * dscale
            assert (np.abs(out - want) / scale).max() < RTOL, down_fn.__name__
            if records:
                racts = acts_fn(rgw, rgd, rgm, ruw, rud, rum, bits16, x, idx, kind, 2,
                                np.full(len(idx), np.nan, np.float32))
                rparts = down_fn(rdw, rdd, rdm, bits16, idx, acts, bounds, np.full_like(parts, np.nan))
                assert np.array_equal(racts, acts) and np.array_equal(rparts, parts), down_fn.__name__
    return outs[0]


LAYOUTS = [("f32", "f32"), ("f16", "f16"), ("bf16", "bf16"), ("q4-f16-sym", "i8-f16-32-nomin"),
           ("q4-f32", "q4-f16"), ("q4-f16", "i8-f16-32-nomin"), ("i8-f16-32-nomin", "i8-f16-32-nomin"),
           ("i8-f32-16-min", "i8-f32-32-min"), ("f32", "q4-f32-sym"), ("q5-f16-sym", "i8-f16-32-nomin"),
           ("q5-f32", "q4-f16"), ("q6", "i8-f16-32-nomin")]


@pytest.mark.parametrize("layout,down", LAYOUTS)
@pytest.mark.parametrize("hidden,ffn", [(64, 96), (1088, 40)])    # narrow and wide Q4 rows
def test_layouts_random_subset(layout, down, hidden, ffn):
    rng = np.random.default_rng(hidden + ffn + len(layout))
    idx = np.sort(rng.choice(ffn, ffn // 3, replace=False))
    check(rng, layout, down, hidden, ffn, idx, kind=0)


@pytest.mark.parametrize("layout,down", LAYOUTS)
@pytest.mark.parametrize("which", ["none", "one", "all"])
def test_edge_active_sets(layout, down, which):
    rng = np.random.default_rng(7)
    ffn = 96
    idx = {"none": [], "one": [ffn - 1], "all": list(range(ffn))}[which]
    out = check(rng, layout, down, 64, ffn, idx, kind=3)
    if which == "none":
        assert not out.any()


@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_activations_and_given_gate(kind):
    rng = np.random.default_rng(kind)
    idx = np.arange(0, 96, 2)
    check(rng, "q4-f16", "i8-f16-32-nomin", 64, 96, idx, kind)
    check(rng, "f32", "f32", 64, 96, idx, kind, given_gate=True)


def test_neuron_records_pack():
    rng = np.random.default_rng(5)
    q4 = rng.integers(0, 256, (7, 48), dtype=np.uint8)
    i8 = rng.integers(-127, 128, (7, 96), dtype=np.int8)
    d16 = rng.integers(0, 2**16, (7, 3), dtype=np.uint16)
    d32 = rng.standard_normal((7, 3)).astype(np.float32)
    empty = np.zeros((7, 0), np.uint16)
    fields = [q4, i8, d16, empty, d32]
    offsets, size = layout(fields)
    assert offsets == [0, 48, 144, 150, 152] and size == 192     # f32 after 6 bytes of f16: padded to 152
    records, views = pack(fields)
    assert records.shape == (7, size) and records.dtype == np.uint8 and size % 64 == 0
    assert views[3] is empty                                      # nothing to place
    for f, v, off in zip(fields, views, offsets):
        assert v.dtype == f.dtype and v.shape == f.shape and np.array_equal(v, f) and rows_contiguous(v)
        if f.shape[1]:
            assert v.strides[0] == size and np.shares_memory(v, records)
            assert v.__array_interface__["data"][0] - records.ctypes.data == off
    assert not rows_contiguous(q4[:, ::2])
    with pytest.raises(ValueError, match="7 rows"):
        pack([q4, i8[:5]])


@pytest.mark.skipif(not NUMBA, reason="the row-contiguity check is the numba kernels'")
def test_kernels_refuse_rows_that_are_not_contiguous():
    # Q4_0 records, with the gate's bytes swapped for every other byte of a wider array: the numba types
    # of the Q4_0 record test above (compiled once), but rows that are not contiguous.
    rng = np.random.default_rng(6)
    (gw, gd, gm), _, _ = make(rng, "q4-f16-sym", 8, 128)
    (dw, dd, dm), _, _ = make(rng, "i8-f16-32-nomin", 8, 128)
    _, (rgw, ruw, rdw, rgd, rud, rdd, rgm, rum, rdm) = pack([gw, gw, dw, gd, gd, dd, gm, gm, dm])
    wide = np.repeat(gw, 2, axis=1)[:, ::2]                      # (8, 64) uint8, every other byte
    x = rng.standard_normal(128).astype(np.float32)
    idx = np.arange(8, dtype=np.int32)
    with pytest.raises(ValueError, match="contiguous"):
        S.sparse_ffn(wide, rgd, rgm, ruw, rud, rum, rdw, rdd, rdm, np.ones(128, np.float32), 0, x, idx,
                     np.zeros(0, np.float32), 0, 2, np.empty(8, np.float32), np.empty(128, np.float32))
    from kernels.matvec import matvec_q4
    with pytest.raises(ValueError, match="contiguous"):                 # the dense matvec guards alike
        matvec_q4(wide, rgd, rgm, x, np.empty(8, np.float32))


def test_many_threads_uneven_shares():
    """More threads than the shares a small set allows; shares that split clusters."""
    rng = np.random.default_rng(3)
    (gw, gd, gm), _, _ = make(rng, "q4-f16", 200, 64)
    (uw, ud, um), _, _ = make(rng, "q4-f16", 200, 64)
    (dw, dd, dm), _, _ = make(rng, "i8-f16-32-nomin", 200, 64)
    x = rng.standard_normal(64).astype(np.float32)
    idx = np.arange(3, 140, dtype=np.int32)
    ones = np.ones(64, np.float32)
    want = S.sparse_ffn_numpy(gw, gd, gm, uw, ud, um, dw, dd, dm, ones, 0, x, idx, np.zeros(0, np.float32), 0, 1,
                              np.empty(len(idx), np.float32), np.empty(64, np.float32))
    for threads in (1, 2, 3, 8):
        got = S.sparse_ffn(gw, gd, gm, uw, ud, um, dw, dd, dm, ones, 0, x, idx, np.zeros(0, np.float32), 0, threads,
                           np.empty(len(idx), np.float32), np.empty(64, np.float32))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("layout,down", [("q4-f16", "i8-f16-32-nomin"), ("f32", "f32"), ("bf16", "q4-f32-sym")])
def test_split_kernels_bits_do_not_depend_on_grouping(layout, down):
    """sparse_acts of a neuron and sparse_down of a chunk give the same bits whichever other neurons or
    chunks share the call, with any thread count: what the flash executor's same-tokens guarantee
    rests on (engine/executors/flash_ffn.py)."""
    rng = np.random.default_rng(11)
    hidden, ffn = 64, 150
    (gw, gd, gm), f1, _ = make(rng, layout, ffn, hidden)
    (uw, ud, um), f2, _ = make(rng, layout, ffn, hidden)
    (dw, dd, dm), f3, _ = make(rng, down, ffn, hidden)
    bits16 = max(f1, f2, f3)
    x = rng.standard_normal(hidden).astype(np.float32)
    idx = np.sort(rng.choice(ffn, 100, replace=False)).astype(np.int32)
    bounds = np.array([0, 9, 40, 41, 64, 100], np.int64)
    for acts_fn, down_fn in split_kernels():
        acts = acts_fn(gw, gd, gm, uw, ud, um, bits16, x, idx, 3, 2, np.empty(100, np.float32))
        acts[::5] = 0.0                                        # zeros are skipped: they must not matter
        parts = down_fn(dw, dd, dm, bits16, idx, acts, bounds, np.empty((5, hidden), np.float32))
        for threads in (1, 3):
            for cut in ([0, 100], [0, 1, 37, 100], list(range(0, 101, 10))):
                got = np.empty(100, np.float32)
                for t0, t1 in zip(cut[:-1], cut[1:]):
                    got[t0:t1] = acts_fn(gw, gd, gm, uw, ud, um, bits16, x, idx[t0:t1], 3, threads,
                                         np.empty(t1 - t0, np.float32))
                got[::5] = 0.0
                np.testing.assert_array_equal(got, acts)
        for c0, c1 in ((0, 5), (0, 1), (1, 3), (3, 5), (4, 5)):
            t0, t1 = bounds[c0], bounds[c1]
            got = down_fn(dw, dd, dm, bits16, idx[t0:t1].copy(), acts[t0:t1].copy(), bounds[c0:c1 + 1] - t0,
                          np.empty((c1 - c0, hidden), np.float32))
            np.testing.assert_array_equal(got, parts[c0:c1])
        # The same rows at other slot indices (as if cached elsewhere): the same bits.
        perm = rng.permutation(ffn)
        moved = [w[np.argsort(perm)] for w in (dw, dd, dm)]
        got = down_fn(*moved, bits16, perm[idx].astype(np.int32), acts, bounds, np.empty((5, hidden), np.float32))
        np.testing.assert_array_equal(got, parts)


@pytest.mark.parametrize("rank,ffn,threshold", [(4, 96, 0.0), (16, 1536, 0.5), (8, 600, 1e9), (8, 600, -1e9),
                                                 (7, 300, 0.0)])        # odd rank: the one-row tail
def test_predict_and_select(rank, ffn, threshold):
    """The int8 predictor kernel and its twin against float64 on the dequantized matrices, and against
    LayerPredictor.scores (what the planner calibrates thresholds on)."""
    rng = np.random.default_rng(rank + ffn)
    hidden = 66                                                 # not a multiple of 4: w1's row tail
    p = LayerPredictor.from_float(rng.standard_normal((hidden, rank)).astype(np.float32),
                                  rng.standard_normal(rank).astype(np.float32),
                                  rng.standard_normal((rank, ffn)).astype(np.float32),
                                  rng.standard_normal(ffn).astype(np.float32), threshold, 0.0)
    assert p.w1.dtype == np.int8 and p.w2.dtype == np.int8
    h = rng.standard_normal(hidden).astype(np.float32)
    w1 = p.w1.astype(np.float64) * p.w1_scale[:, None]
    w2 = p.w2.astype(np.float64) * p.w2_scale
    z = np.maximum(h.astype(np.float64) @ w1 + p.b1, 0)
    want = z @ w2 + p.b2
    np.testing.assert_allclose(p.scores(h[None])[0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    for fn in (S.predict, S.predict_numpy):
        scores = np.empty(ffn, np.float32)
        idx = np.full(ffn, -1, np.int32)
        n = fn(*p.arrays, h, np.float32(threshold), 2, scores, idx)
        np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
        np.testing.assert_array_equal(idx[:n], np.flatnonzero(scores > np.float32(threshold)))
    for fn in (S.select, S.select_numpy):
        idx = np.empty(ffn, np.int32)
        n = fn(want.astype(np.float32), np.float32(threshold), idx)
        np.testing.assert_array_equal(idx[:n], np.flatnonzero(want.astype(np.float32) > np.float32(threshold)))


@pytest.mark.slow
@pytest.mark.skipif(not NUMBA, reason="this run is already the numpy-only mode")
def test_numpy_only_mode():
    """This file again with POCKETINFER_NO_NUMBA=1 (Termux has no numba): the selected kernels are the
    twins, and they must still match the float64 reference."""
    env = dict(os.environ, POCKETINFER_NO_NUMBA="1")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       cwd=str(REPO), env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# ---------------------------------------------------------------- the code the kernel compiles to

@pytest.mark.skipif(not NUMBA, reason="numba only: the code the kernel compiles to")
def test_sparse_kernel_code_uses_the_intrinsics():
    """The sparse FFN's Q4 and 32-block I8 rows go through the rowdot and gather intrinsics on every
    target. Checked on the kernel's LLVM IR (the intrinsics' loop labels), compiled afresh (numba cannot
    show cached code); tests/test_target.py runs it on a target without hardware halves."""
    from numba import njit

    rng = np.random.default_rng(2)
    (gw, gd, gm), _, _ = make(rng, "q4-f16-sym", 16, 64)
    (uw, ud, um), _, _ = make(rng, "q4-f16-sym", 16, 64)
    (dw, dd, dm), _, _ = make(rng, "i8-f16-32-nomin", 16, 64)
    x = rng.standard_normal(64).astype(np.float32)
    idx = np.arange(16, dtype=np.int32)
    args = (gw, gd, gm, uw, ud, um, dw, dd, dm, np.ones(64, np.float32), 0, x, idx, np.zeros(0, np.float32), 3, 1,
            np.empty(16, np.float32), np.empty(64, np.float32))
    fresh = njit(parallel=True, fastmath=True, nogil=True, cache=False)(S._sparse_ffn_numba.py_func)
    got = fresh(*args).copy()
    np.testing.assert_array_equal(got, S.sparse_ffn(*args))
    code = fresh.inspect_llvm(fresh.signatures[0])
    assert "rowdot.loop" in code and "gaxpy.loop" in code


# ---------------------------------------------------------------- kernels/gather.py

@pytest.mark.parametrize("layout,down", [("q4-f16-sym", "i8-f16-32-nomin"), ("q4-f32", "i8-f32-32-nomin"),
                                         ("i8-f16-32-nomin", "i8-f16-32-nomin"), ("i8-f32-32-min", "i8-f16-32-nomin"),
                                         ("q4-f16", "q4-f16"), ("i8-f16-32-nomin", "q4-f32-sym")])
@pytest.mark.parametrize("hidden", [32, 96, 1088])          # one block, an odd block count, many blocks
def test_gathered_rows_given_gate_and_odd_blocks(layout, down, hidden):
    """The kernel paths through kernels/gather.py: gate and up in one pass or up alone (gate given),
    block counts with and without the odd last block, enough neurons for the prefetching quads."""
    rng = np.random.default_rng(hidden + len(layout))
    ffn = 40
    idx = np.sort(rng.choice(ffn, 23, replace=False))
    check(rng, layout, down, hidden, ffn, idx, kind=0)
    check(rng, layout, down, hidden, ffn, idx, kind=3, given_gate=True)


@pytest.mark.slow
def test_gather_twins(simd_code):
    """The sparse kernels' row reads against their numpy twins: kernels/rowdot.py's prefetching dots
    (gate and up rows of one neuron, or one row) and kernels/gather.py's 4-row axpys (I8; Q4 with and
    without mins), on the AVX-512 VNNI, AVX2 and generic-vector code, the last with hardware or integer
    half conversion (each forced by compiling with the other flags off: tests/conftest.py), both scale
    dtypes, every block-count tail, prefetch targets valid and absent, a repeated row."""
    if not NUMBA:
        pytest.skip("LLVM IR: numba only (the numpy twins are tested through the kernels above)")
    from numba import njit

    from kernels import gather as G, rowdot

    @njit(cache=False)
    def run_dots(gq, gd, uq, ud, g8, u8, xq, xp, xc, dx, jp, out):
        for r in range(gq.shape[0]):
            out[r, 0], out[r, 1] = rowdot.q4_gu(gq, gd, uq, ud, r, jp, xq, xp, xc, dx)
            out[r, 2] = rowdot.q4_row1p(uq, ud, r, jp, xq, xp, xc, dx)
            out[r, 3], out[r, 4] = rowdot.i8_gu(g8, gd, u8, ud, r, jp, xq, xp, xc, dx)
            out[r, 5] = rowdot.i8_row1p(u8, ud, r, jp, xq, xp, xc, dx)
            out[r, 6] = rowdot.q4_dot(gq, gd, r, xq, xp, xc, dx)
            out[r, 7] = rowdot.i8_dot(g8, gd, r, xq, xp, xc, dx)
        return out

    @njit(cache=False)
    def run_axpy(w, d, j, a, pf, acc):
        if pf.shape[0]:
            G.axpy4_i8_pf(w, d, j, a, pf, acc)
        else:
            G.axpy4_i8(w, d, j, a, acc)
        return acc

    @njit(cache=False)
    def run_axpy_q4(w, d, m, j, a, pf, acc):
        if pf.shape[0]:
            G.axpy4_q4_pf(w, d, m, j, a, pf, acc)
        else:
            G.axpy4_q4(w, d, m, j, a, acc)
        return acc

    rng = np.random.default_rng(5)
    rows = 6
    for nb in (1, 2, 3, 4, 5, 6, 7, 18, 49):
        for kind in ("f32", "f16"):
            gq, gd, _ = (a for a in make(rng, "q4-" + kind + "-sym", rows, 32 * nb)[0])
            uq, ud, _ = (a for a in make(rng, "q4-" + kind + "-sym", rows, 32 * nb)[0])
            g8 = rng.integers(-128, 128, (rows, 32 * nb), dtype=np.int8)
            u8 = rng.integers(-128, 128, (rows, 32 * nb), dtype=np.int8)
            g8[0, :32] = -128                                # the extreme |w| of the AVX2 sign trick
            xq = rng.integers(-127, 128, 32 * nb, dtype=np.int8)
            xp = rowdot.prepare_q4_x_numpy(xq, np.empty_like(xq))
            xc = rowdot.lane_corrections_numpy(xq, np.empty(8 * nb, np.int32))
            dx = rng.uniform(0.001, 0.1, nb).astype(np.float32)
            for jp in (-1, rows - 1):
                got = run_dots(gq, gd, uq, ud, g8, u8, xq, xp, xc, dx, jp, np.empty((rows, 8), np.float32))
                want = np.array([[rowdot.q4_dot_numpy(w, d, r, xq, dx) for w, d in ((gq, gd), (uq, ud))]
                                 + [rowdot.i8_dot_numpy(w, d, r, xq, dx) for w, d in ((g8, gd), (u8, ud))]
                                 for r in range(rows)])
                # error scale of a row: sum |terms| (integer sums exact, then f32 products and sums)
                scale = 32 * nb * 127 * 15 * np.abs(scales_f32(gd)).max() * dx.max()
                assert np.abs(got[:, [0, 1, 3, 4]] - want).max() <= 1e-6 * scale
                np.testing.assert_array_equal(got[:, 1], got[:, 2])       # one row or two: same bits
                np.testing.assert_array_equal(got[:, 4], got[:, 5])
                # the dense matvec's products, up to where fastmath contracts multiply-adds differently
                assert np.abs(got[:, [0, 3]] - got[:, [6, 7]]).max() <= 1e-6 * scale
            for j, pf in ((np.array([1, 4, 4, 0], np.int64), np.array([2, -1, 5, 0], np.int64)),
                          (np.array([5, 3, 2, 1], np.int64), np.zeros(0, np.int64))):
                a = rng.standard_normal(4).astype(np.float32)
                acc = rng.standard_normal(32 * nb).astype(np.float32)
                got = run_axpy(g8, gd, j, a, pf, acc.copy())
                want = G.axpy4_numpy(g8, gd, j, a, acc.copy())
                tol = 1e-6 * (np.abs(acc) + 4 * 128 * np.abs(a).max() * np.abs(scales_f32(gd)).max())
                assert (np.abs(got - want) <= tol).all()
                for sym in (True, False):
                    qs, qd, qm = make(rng, "q4-" + kind + ("-sym" if sym else ""), rows, 32 * nb)[0]
                    got = run_axpy_q4(qs, qd, qm, j, a, pf, acc.copy())
                    want = G.axpy4_q4_numpy(qs, qd, qm, j, a, acc.copy())
                    rows_f = dequant.dequant_q4_numpy(qs[j], qd[j], qm[j], np.empty((4, 32 * nb), np.float32))
                    np.testing.assert_allclose(want, acc + a @ rows_f, rtol=1e-5, atol=1e-5)   # the twin itself
                    big = np.abs(scales_f32(qd)).max() * 16 + (np.abs(scales_f32(qm)).max() if qm.shape[1] else 0)
                    tol = 1e-6 * (np.abs(acc) + 4 * np.abs(a).max() * big)
                    assert (np.abs(got - want) <= tol).all(), (nb, kind, sym)


def scales_f32(d):
    return d.view(np.float16).astype(np.float32) if d.dtype == np.uint16 else d
