"""kernels/kv.py: the half KV cache's conversions against numpy's float16, and attention over a half
cache (numba decode kernel against the numpy prefill twin)."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import backend, kv, target
from kernels.attention import _attention_numba, attention_numpy


def _values():
    rng = np.random.default_rng(0)
    v = [rng.standard_normal(20000).astype(np.float32) * s for s in (1e-6, 1e-3, 1.0, 300.0, 3e4)]
    # halfway points between neighbouring halves (ties), subnormal range, the overflow edge, specials
    h = np.arange(0, 0x7C00, 7, dtype=np.uint16).view(np.float16).astype(np.float32)
    ties = ((h[:-1].astype(np.float64) + h[1:]) / 2).astype(np.float32)
    edge = np.array([65504, 65519.99, 65520, 65536, 1e9, 2**-24, 2**-25, 3 * 2**-26, 2**-26, 0.0, -0.0,
                     np.inf, -np.inf, 5.96e-8, 6.1e-5, 6.103515625e-05], np.float32)
    out = np.concatenate(v + [h, ties, -ties, edge])
    return out


def test_half_bits_match_numpy():
    """Both numba conversions (hardware fptrunc where there is one, integer arithmetic everywhere)
    round like numpy's float16: to nearest, ties to even, overflow to infinity."""
    if not backend.NUMBA:
        pytest.skip("numba only (the numpy path converts with numpy itself)")
    from numba import njit

    def convert(fn):
        @njit(cache=False)
        def run(x, out):
            for i in range(x.shape[0]):
                out[i] = fn(x[i])
            return out
        return run

    x = _values()
    with np.errstate(over="ignore"):            # numpy warns for values that round to infinity
        want = x.astype(np.float16).view(np.uint16)
    fns = [kv.half_bits_int] + ([kv._half_bits_hw] if target.NATIVE_HALF else [])
    for fn in fns:
        got = convert(fn)(x, np.empty(len(x), np.uint16))
        np.testing.assert_array_equal(got, want, err_msg=str(fn))
    nan = convert(kv.half_bits_int)(np.array([np.nan], np.float32), np.empty(1, np.uint16))
    assert np.isnan(nan.view(np.float16)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.uint16])
def test_attention_over_a_half_cache(dtype):
    """The decode attention kernel reads the cache through kv.load: on half bits it equals the numpy
    twin (which converts the cache with kv.to_f32) within float rounding."""
    rng = np.random.default_rng(1)
    n_heads, n_kv, hd, pos = 6, 2, 16, 37
    k = kv.to_storage(rng.standard_normal((n_kv, 48, hd)).astype(np.float32), dtype)
    v = kv.to_storage(rng.standard_normal((n_kv, 48, hd)).astype(np.float32), dtype)
    q = rng.standard_normal((1, n_heads, hd)).astype(np.float32)
    want = attention_numpy(q, k, v, pos, 0, np.empty_like(q))
    got = _attention_numba(q, k, v, pos, 0, np.empty_like(q)) if backend.NUMBA else want
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    if dtype == np.uint16:
        full = attention_numpy(q, kv.to_f32(k), kv.to_f32(v), pos, 0, np.empty_like(q))
        np.testing.assert_array_equal(want, full)


def test_record_scatter_twins():
    """kernels/records.py: bundles copied field by field into slot arrays, numba against numpy, fields
    of several dtypes and an empty one, rows in any order."""
    from kernels import records

    rng = np.random.default_rng(2)
    fields = [("a", np.uint8, 40), ("b", np.uint16, 3), ("c", np.float32, 0), ("d", np.int8, 17)]
    rec = np.dtype([(n, t, (c,)) for n, t, c in fields])
    src = rng.integers(0, 256, 7 * rec.itemsize + 5, dtype=np.uint8)
    starts = np.array([0, 3, 6, 1], np.int64) * rec.itemsize
    rows = np.array([4, 0, 2, 5], np.int64)
    off = np.array([rec.fields[n][1] for n, _, _ in fields], np.int64)
    ln = np.array([rec.fields[n][0].itemsize for n, _, _ in fields], np.int64)
    outs = []
    for fn in (records.scatter, records.scatter_numpy):
        arrays = [np.zeros((6, c), t) for _, t, c in fields]
        fn(src, starts, rows, off, ln, records.byte_views(arrays))
        outs.append(arrays)
    view = np.frombuffer(src[: 7 * rec.itemsize].tobytes(), dtype=rec)
    for (name, _, _), got, twin in zip(fields, *outs):
        np.testing.assert_array_equal(got, twin)
        np.testing.assert_array_equal(got[rows], view[name][starts // rec.itemsize])
