"""kernels/gemm.py, the int8-activation prefill GEMM: its numpy twin against an independent reference
(each token through the matvec twin, which rounds x the same way), the numba kernel against the twin on
every tile remainder and code form, and the prefill engines as the model runs them."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kernels import backend, dequant, gemm, matvec
from tests.test_kernels import _i8, _q4, _q5, _q6, ref_q4, ref_q5

# (rows, cols, tokens): tiles with nothing left over, rows and tokens left over, one block of 32, rows
# in several panels with a short last one, fewer rows than one tile, a single token; rows a multiple of
# 32 take the rows-in-lanes form where the CPU has AVX-512 VNNI (64 and 96 rows, the latter with a
# token left over).
SHAPES = [(64, 128, 8), (70, 96, 9), (131, 32, 3), (200, 224, 13), (3, 64, 5), (5, 64, 1), (96, 160, 7)]
FORMATS = ["q4_0", "q4_1", "q8_0", "i8_min", "q5_0", "q5_1", "q6"]


def _weight(rng, kind, rows, cols, scales):
    """(fn, twin, matvec twin, arrays) of one format: Q4_0/Q4_1 nibbles, Q8_0 (I8, no min), I8 with a min,
    the Q5 layout without (Q5_0) and with (Q5_1) a min, all in blocks of 32, or the Q6 layout (its scales
    are always two f16 per block: `scales` does not apply)."""
    if kind == "q6":
        return gemm.gemm_q6, gemm.gemm_q6_numpy, matvec.matvec_q6_numpy, _q6(rng, rows, cols)
    if kind.startswith("q4"):
        return gemm.gemm_q4, gemm.gemm_q4_numpy, matvec.matvec_q4_numpy, _q4(rng, rows, cols, scales, sym=kind == "q4_0")
    if kind.startswith("q5"):
        return gemm.gemm_q5, gemm.gemm_q5_numpy, matvec.matvec_q5_numpy, _q5(rng, rows, cols, scales, sym=kind == "q5_0")
    arrays = _i8(rng, rows, cols, 32, kind == "i8_min", scales)
    return gemm.gemm_i8, gemm.gemm_i8_numpy, matvec.matvec_i8_numpy, arrays


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("scales", ["f32", "f16"])
def test_twin_equals_per_token_matvecs(kind, scales):
    """The twin (rounded x times W dequantized, through BLAS) equals each token through the matvec twin,
    which rounds x per block of 32 and adds the min terms from the rounded block sums."""
    rng = np.random.default_rng(1)
    rows, cols, n = 37, 160, 6
    _, twin, mv, arrays = _weight(rng, kind, rows, cols, scales)
    x = rng.standard_normal((n, cols), dtype=np.float32)
    got = twin(*arrays, x, np.empty((n, rows), np.float32))
    want = np.stack([mv(*arrays, x[t], np.empty(rows, np.float32)) for t in range(n)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_rounding_is_per_block_of_32():
    """A block of x whose largest value is 127 times another's is rounded on its own scale: the small
    block survives, which one scale per row would flush to zero."""
    rng = np.random.default_rng(2)
    qs, d, m = _q4(rng, 4, 64, "f32")
    x = np.concatenate([np.full(32, 100.0), rng.uniform(-0.5, 0.5, 32)]).astype(np.float32)[None, :]
    xr = gemm.rounded_rows(x)
    assert np.abs(xr[0, 32:] - x[0, 32:]).max() <= np.abs(x[0, 32:]).max() / 127 / 2 + 1e-7
    want = xr.astype(np.float64) @ ref_q4(qs, d, m).T
    got = gemm.gemm_q4_numpy(qs, d, m, x, np.empty((1, 4), np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("scales", ["f32", "f16"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_numba_equals_twin(kind, scales, shape):
    if not backend.NUMBA:
        pytest.skip("numba only")
    rng = np.random.default_rng(sum(shape))
    rows, cols, n = shape
    fn, twin, _, arrays = _weight(rng, kind, rows, cols, scales)
    x = rng.standard_normal((n, cols), dtype=np.float32)
    x[0, :32] *= 50                                   # blocks on different scales
    got = fn(*arrays, x, np.empty((n, rows), np.float32))
    want = twin(*arrays, x, np.empty((n, rows), np.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.slow
def test_numba_equals_twin_on_every_code(simd_code):
    """The register tile on the AVX-512 VNNI, AVX2 and generic code (tests/conftest.py forces each when
    the kernel compiles), extreme values included: q = 15, 31, 63 or -128 against x = +-127."""
    if not backend.NUMBA:
        pytest.skip("numba only")
    from numba import njit

    kernel = njit(parallel=True, cache=False, fastmath=True)(gemm._gemm_numba.py_func)
    rng = np.random.default_rng(7)
    rows, cols, n = 70, 224, 9
    for kind in FORMATS:
        for scales in ("f32", "f16"):
            _, twin, _, arrays = _weight(rng, kind, rows, cols, scales)
            arrays[0][0] = {"q4": 0xFF, "q5": 0xFFFFFFFF, "q6": np.uint64(2**64 - 1)}.get(kind[:2], -128)
            x = rng.standard_normal((n, cols), dtype=np.float32)
            x[1] = np.sign(x[1])                       # rounds to +-127 everywhere
            got = kernel(*arrays, x, np.empty((n, rows), np.float32))
            want = twin(*arrays, x, np.empty((n, rows), np.float32))
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max(),
                                       err_msg=f"{simd_code} {kind} {scales}")


# ---------------------------------------------------------------- the prefill engines in the model

@pytest.fixture(scope="module", params=["Q4_0", "Q8_0"])
def q4_gguf(request, stories_dir, tmp_path_factory):
    """stories260K (a real model) converted to a GGUF in the format of the parameter."""
    from tests.model_factory import hf_to_gguf
    from tests.test_stories260k import _vocab_meta

    out = tmp_path_factory.mktemp("gemm_model") / f"stories.{request.param}.gguf"
    return hf_to_gguf(stories_dir, out, request.param, _vocab_meta(stories_dir))


def test_engines_agree_and_are_described(q4_gguf):
    """Prefill through int8 and f32 on a Q4_0 and a Q8_0 model: the logits differ by what rounding x to 8
    bits moves them (within 2% of their spread), the last token's argmax is the same, and describe()
    names the engine."""
    import engine

    ids = np.arange(3, 40)
    out = {}
    for name in ("int8", "f32"):
        llm = engine.load(str(q4_gguf), threads=2, prefill=name)
        assert llm.model.executors.prefill.engine == name
        assert f"FFN dense, {'int8 GEMM' if name == 'int8' else 'f32 BLAS'}" in llm.describe()
        out[name] = llm.logits(ids)
    a, b = out["int8"], out["f32"]
    assert np.abs(a - b).max() <= 0.02 * (b.max() - b.min())
    assert a[-1].argmax() == b[-1].argmax()


def test_plan_sets_the_engine_and_bad_values_are_named(q4_gguf, tmp_path):
    from engine.errors import ModelFormatError
    from engine.executors.plan import read_plan
    from engine.formats.gguf_file import GGUFFile
    from engine.formats.gguf_loader import config_from_gguf
    from engine.loader import load

    config = config_from_gguf(GGUFFile(q4_gguf))
    layers = [{"mode": "dense"}] * config.num_hidden_layers
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"decode": {"layers": layers}, "prefill": {"engine": "f32"}}))
    assert read_plan(p, config).prefill == "f32"
    p.write_text(json.dumps({"decode": {"layers": layers}, "prefill": {"engine": "npu"}}))
    with pytest.raises(ModelFormatError, match="prefill.engine is 'npu'"):
        read_plan(p, config)
    with pytest.raises(ValueError, match="prefill='fast' is not one of int8, onnx, f32"):
        load(str(q4_gguf), prefill="fast")


@pytest.mark.parametrize("kind", FORMATS)
@pytest.mark.parametrize("scales", ["f32", "f16"])
def test_lane_packing_twins(kind, scales):
    """kernels/lanetile.pack against pack_numpy: 4-byte chunks of 16 rows interleaved (sign bits flipped
    for I8), scales and min coefficients per block and row (per half block for Q6)."""
    if not backend.NUMBA:
        pytest.skip("numba only")
    from numba import njit

    from kernels import lanetile

    @njit(cache=False)
    def pack(w, d, m, r0, ws, sw, mw, flip):
        lanetile.pack(w, d, m, r0, ws, sw, mw, flip)

    rng = np.random.default_rng(3)
    _, _, _, (w, d, m) = _weight(rng, kind, 48, 96, scales)
    flip = not kind.startswith("q4")
    nb = d.shape[1]
    nbytes = 16 * lanetile.packed_bytes(w, nb)
    scale_blocks = 2 * nb if kind == "q6" else nb
    want = [np.empty(nbytes, np.uint8), np.empty(16 * scale_blocks, np.float32), np.empty(16 * scale_blocks, np.float32)]
    got = [np.empty_like(a) for a in want]
    lanetile.pack_numpy(w, d, m, 16, *want, flip)
    pack(w, d, m, 16, *got, flip)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    if kind == "q6":
        values = dequant.q6_values_numpy(w, nb).reshape(w.shape[0], -1)
        assert want[0][:4].tobytes() == values[16, :4].tobytes()
        assert want[0][4:8].tobytes() == values[17, :4].tobytes()
        np.testing.assert_array_equal(want[1][16:32], dequant.q6_scales_numpy(d)[16:32, 0, 1])
        return
    if kind.startswith("q5"):
        values = np.rint(ref_q5(w, np.ones_like(d, np.float32), np.zeros_like(d, np.float32))).astype(np.uint8)
        assert want[0][:4].tobytes() == values[16, :4].tobytes()
        assert want[0][4:8].tobytes() == values[17, :4].tobytes()
        return
    assert want[0][:4].tobytes() == (w[16, :4].view(np.uint8) ^ (0x80 if flip else 0)).tobytes()
    assert want[0][4:8].tobytes() == (w[17, :4].view(np.uint8) ^ (0x80 if flip else 0)).tobytes()
