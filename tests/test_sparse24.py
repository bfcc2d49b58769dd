"""kernels/sparse24.py, the 2:4 layouts S8 and S4: the mask, packing and its errors, and every kernel over
them (the decode row dots, the prefill GEMM in both forms, the lane packing) against the numpy twins, on
each code the hand-written IR has (tests/conftest.py's simd_code)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.model.weights import S24Weight
from kernels import backend, gemm, lanetile, matvec, sparse24

# (rows, cols): four-block steps with nothing left over, a step of two and one left over, a single
# block, rows a multiple of 32 (the GEMM's rows-in-lanes form on AVX-512 VNNI) and not
SHAPES = [(64, 256), (37, 448), (5, 64), (96, 192)]
FORMS = ["s8", "s4"]


def _pruned(rng, rows, cols):
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    keep = sparse24.mask_24(w)
    return w * keep, keep


def _packed(rng, form, rows, cols, scales="f16"):
    w, keep = _pruned(rng, rows, cols)
    qs, d = sparse24.pack(w, keep, form)
    if scales == "f32":
        d = sparse24.scales_f32_numpy(d)
    return qs, d, np.zeros((rows, 0), np.float32)


def test_mask_keeps_the_two_largest_of_each_four():
    w = np.array([[0.1, -3.0, 2.0, 0.5, 1.0, 1.0, 1.0, 1.0]], np.float32)
    keep = sparse24.mask_24(w)
    np.testing.assert_array_equal(keep, [[False, True, True, False, True, True, False, False]])
    score = np.array([[4, 3, 2, 1, 0, 0, 5, 5]], np.float32)
    np.testing.assert_array_equal(sparse24.mask_24(w, score), [[True, True, False, False, False, False, True, True]])


@pytest.mark.parametrize("form", FORMS)
def test_pack_round_trip(form):
    """Unpacked, a packed weight has the mask's zeros exactly and the kept values within half a
    quantization step of their block (int8: max/127), or a whole one for 4-bit, whose range is Q4_0's
    -8..7 steps of max/8 (the value opposite the largest may clip by one step)."""
    rng = np.random.default_rng(0)
    w, keep = _pruned(rng, 24, 192)
    qs, d = sparse24.pack(w, keep, form)
    assert qs.dtype == sparse24.ROW_DTYPES[form] and d.dtype == np.uint16 and d.shape == (24, 3)
    assert qs.nbytes + d.nbytes == 24 * sparse24.row_bytes(form, 192)
    got = sparse24.unpack(qs, d)
    assert np.all(got[~keep] == 0)
    amax = np.abs(w).reshape(24, 3, 64).max(axis=2)
    bound = amax / 127 * 0.51 if form == "s8" else amax / 8 * 1.001
    err = np.abs(got - w).reshape(24, 3, 64).max(axis=2)
    assert np.all(err <= bound + 1e-6)


def test_pack_is_deterministic():
    rng = np.random.default_rng(3)
    w, keep = _pruned(rng, 8, 128)
    a = sparse24.pack(w, keep, "s4")
    b = sparse24.pack(w.copy(), keep.copy(), "s4")
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


def test_bad_input():
    rng = np.random.default_rng(1)
    w, keep = _pruned(rng, 4, 128)
    with pytest.raises(sparse24.Sparse24Error, match="blocks of 64"):
        sparse24.pack(w[:, :96], keep[:, :96], "s8")
    with pytest.raises(sparse24.Sparse24Error, match="groups of 4"):
        sparse24.mask_24(w[:, :6])
    bad = keep.copy()
    bad[0, :4] = True
    with pytest.raises(sparse24.Sparse24Error, match="exactly two"):
        sparse24.pack(w, bad, "s8")
    with pytest.raises(sparse24.Sparse24Error, match="unknown 2:4 form"):
        sparse24.pack(w, keep, "s2")


@pytest.mark.parametrize("form", FORMS)
def test_matvec_twin_equals_the_unpacked_matrix(form):
    """The twin multiplies x rounded per block of 32, as the kernels do: it equals the unpacked matrix
    times that rounded x."""
    rng = np.random.default_rng(2)
    qs, d, m = _packed(rng, form, 40, 320)
    x = rng.standard_normal(320).astype(np.float32)
    got = matvec.matvec_s24_numpy(qs, d, m, x, np.empty(40, np.float32))
    want = sparse24.unpack(qs, d) @ gemm.rounded_rows(x[None, :])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_numba_equals_twin_on_every_code(simd_code):
    """The 2:4 row dots (matvec) and the prefill GEMM's rows-in-turn tile on each code, both scale dtypes,
    every tail, extreme values (S8 -127 and S4 nibble 15 and 0 against x = +-127)."""
    if not backend.NUMBA:
        pytest.skip("the 2:4 row dots are LLVM intrinsics: numba only")
    from numba import njit

    rows_matvec = njit(parallel=True, cache=False, fastmath=True)(matvec._matvec_q4_numba.py_func)
    gemm_rows = njit(parallel=True, cache=False, fastmath=True)(gemm._gemm_numba.py_func)
    rng = np.random.default_rng(5)
    for form in FORMS:
        for scales in ("f16", "f32"):
            for rows, cols in SHAPES:
                qs, d, m = _packed(rng, form, rows, cols, scales)
                raw = qs.view(np.uint8).reshape(rows, -1)
                if form == "s8":
                    raw[0, 8:40] = 0x01                     # -127 (v + 128)
                elif cols >= 128:                           # nibbles 15: a pair's follow its two code words
                    raw[0, 16:48] = 0x0F
                else:
                    raw[0, 8:24] = 0x0F
                x = rng.standard_normal((3, cols)).astype(np.float32)
                x[1] = np.sign(x[1])
                for t in range(3):
                    got = rows_matvec(qs, d, m, x[t], np.empty(rows, np.float32))
                    want = matvec.matvec_s24_numpy(qs, d, m, x[t], np.empty(rows, np.float32))
                    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                               err_msg=f"{simd_code} {form} {scales} {rows}x{cols}")
                got = gemm_rows(qs, d, m, x, np.empty((3, rows), np.float32))
                want = gemm.gemm_s24_numpy(qs, d, m, x, np.empty((3, rows), np.float32))
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                           err_msg=f"gemm {simd_code} {form} {scales} {rows}x{cols}")


@pytest.mark.parametrize("form", FORMS)
def test_gemm_equals_twin(form):
    """gemm_s24 (the rows-in-lanes form on AVX-512 VNNI when rows are a multiple of 32) against its twin."""
    rng = np.random.default_rng(6)
    for rows, cols in SHAPES:
        qs, d, m = _packed(rng, form, rows, cols)
        x = rng.standard_normal((9, cols)).astype(np.float32)
        got = gemm.gemm_s24(qs, d, m, x, np.empty((9, rows), np.float32))
        want = gemm.gemm_s24_numpy(qs, d, m, x, np.empty((9, rows), np.float32))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(), err_msg=f"{rows}x{cols}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("vbmi", [True, False])
def test_lane_packing_equals_twin(form, vbmi, monkeypatch):
    """The 2:4 rows expanded and transposed in registers (rowdot24.pack_rows) equal the numpy packing,
    with the CPU's VBMI instructions and without them (AVX-512 VNNI CPUs without VBMI)."""
    if not backend.NUMBA:
        pytest.skip("numba only")
    from numba import njit

    from kernels import target
    if vbmi and not target.VBMI:
        pytest.skip("numba's compile target has no VBMI")
    monkeypatch.setattr(target, "VBMI", vbmi)
    monkeypatch.setattr(target, "VBMI2", target.VBMI2 and vbmi)

    @njit(cache=False)
    def pack(w, d, m, r0, ws, sw, mw):
        lanetile.pack(w, d, m, r0, ws, sw, mw, False)

    rng = np.random.default_rng(8)
    rows, cols = 48, 320
    qs, d, m = _packed(rng, form, rows, cols)
    n = lanetile.LANES * lanetile.packed_bytes(qs, d.shape[1])
    got = [np.zeros(n, np.uint8), np.zeros(2 * cols // 64 * 16, np.float32), np.zeros(2 * cols // 64 * 16, np.float32)]
    want = [a.copy() for a in got]
    pack(qs, d, m, 16, *got)
    lanetile.pack_numpy(qs, d, m, 16, *want, False)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("form", FORMS)
def test_weight_class(form):
    """S24Weight: shape, bytes, matvec, the int8 GEMM and the f32 path agree with the unpacked matrix."""
    rng = np.random.default_rng(9)
    qs, d, m = _packed(rng, form, 64, 256)
    w = S24Weight(qs, d, m)
    assert w.shape == (64, 256) and w.form == form
    assert w.nbytes == 64 * sparse24.row_bytes(form, 256)
    dense = sparse24.unpack(qs, d)
    np.testing.assert_array_equal(w.to_float32(), dense)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    xr = gemm.rounded_rows(x)
    np.testing.assert_allclose(w.matvec(x[0]), dense @ xr[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w.matmul_int8(x), xr @ dense.T, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(w.matmul(x), x @ dense.T, rtol=1e-4, atol=1e-4)
