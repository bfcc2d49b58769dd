"""GGUF tensor bytes -> repacked weights, checked against gguf-py's own dequantizer.

Blocks are random bytes (every nibble, bit and 6-bit scale pattern) with the float16 scale fields
overwritten by finite moderate values, so the reference stays finite.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T
from gguf.quants import dequantize
from hypothesis import given, settings, strategies as st

from engine.errors import ModelFormatError
from engine.formats import gguf_quants as gq
from engine.formats.gguf_quants import tensor_nbytes, type_name, vector_from_gguf, weight_from_gguf
from engine.model.weights import BF16Weight, F16Weight, F32Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight

# type -> (expected layout, block B of its scales or None, byte offsets of its float16 scale fields)
TYPES = {
    T.F32: (F32Weight, None, ()),
    T.F16: (F16Weight, None, ()),
    T.BF16: (BF16Weight, None, ()),
    T.Q4_0: (Q4Weight, 32, (0,)),
    T.Q4_1: (Q4Weight, 32, (0, 2)),
    T.Q5_0: (Q5Weight, 32, (0,)),
    T.Q5_1: (Q5Weight, 32, (0, 2)),
    T.Q8_0: (I8Weight, 32, (0,)),
    T.Q4_K: (Q4Weight, 32, (0, 2)),
    T.Q5_K: (Q5Weight, 32, (0, 2)),
    T.Q6_K: (Q6Weight, 32, (208,)),
}
WITH_MIN = {T.Q4_1, T.Q4_K, T.Q5_1, T.Q5_K}  # Q4_0's -8d offset is implied by an empty m (layouts.md)
F16_SCALES = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q4_K, T.Q5_K}  # f16 scales kept as uint16 bits

# Resident bytes / file bytes (kernels/layouts.md): f16 scales stay f16, Q4_K's and Q5_K's become f16,
# Q6_K's per 16 elements too (two per block of 32), 5-bit values keep 5 bits (the Q5 layout) and 6-bit ones
# 6 bits (the Q6 layout).
MEMORY_RATIO = {
    T.F32: 1.0, T.F16: 1.0, T.BF16: 1.0, T.Q4_0: 1.0, T.Q4_1: 1.0, T.Q5_0: 1.0,
    T.Q5_1: 1.0, T.Q8_0: 1.0, T.Q4_K: 160 / 144, T.Q5_K: 192 / 176, T.Q6_K: 224 / 210,
}


def random_tensor(qtype, rows, cols, rng):
    """(rows, row bytes) uint8 of valid blocks of `qtype`."""
    block, size = GGML_QUANT_SIZES[qtype]
    n = rows * cols // block
    if qtype == T.F32:
        raw = rng.standard_normal(n).astype(np.float32).view(np.uint8)
    elif qtype == T.F16:
        raw = rng.uniform(-3, 3, n).astype(np.float16).view(np.uint8)
    elif qtype == T.BF16:
        raw = (rng.standard_normal(n).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    else:
        raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
        for off in TYPES[qtype][2]:
            # both signs, a wide range of magnitudes, and some exact zeros
            h = (rng.choice([-1, 1], n) * 10.0 ** rng.uniform(-4, 0, n)).astype(np.float16)
            h[rng.random(n) < 0.05] = 0
            raw[:, off : off + 2] = h.view(np.uint8).reshape(n, 2)
    return raw.reshape(rows, -1)


def reference(qtype, raw, rows, cols):
    return dequantize(raw, qtype).reshape(rows, cols).astype(np.float64)


def assert_values(qtype, w, got, want):
    """The weight's values `got` against gguf-py's `want`: exact to float32 rounding, except where the
    layout rounds on purpose (gguf_quants' module doc)."""
    if qtype in (T.Q4_K, T.Q5_K):   # scales d*sc and dmin*mn rounded to f16: 2^-11 of each term at most
        tol = 2.0**-11 * (np.abs(want).max() + np.abs(w.m.view(np.float16).astype(np.float32)).max())
        assert np.abs(got - want).max() <= tol + 1e-30
    elif qtype == T.Q6_K:    # scales d*sc rounded to f16: 2^-11 of each value, or 2^-25 per unit of q where subnormal
        assert (np.abs(got - want) <= 2.0**-11 * np.abs(want) + 2.0**-25 * 32 + 1e-30).all()
    else:
        assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max() + 1e-30


def _x(rng, cols, n=None):
    x = rng.standard_normal(cols if n is None else (n, cols)).astype(np.float32)
    x[..., ::7] = 0.0
    return x


def _cols(qtype, n_blocks):
    return max(GGML_QUANT_SIZES[qtype][0], 32) * n_blocks


# ---------------------------------------------------------------- values

@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("rows,n_blocks", [(1, 1), (3, 2), (33, 1), (64, 4)])
def test_values_match_gguf(qtype, rows, n_blocks):
    rng = np.random.default_rng(int(qtype) * 100 + rows + n_blocks)
    cols = _cols(qtype, n_blocks)
    raw = random_tensor(qtype, rows, cols, rng)
    want = reference(qtype, raw, rows, cols)
    w = weight_from_gguf(int(qtype), raw, (rows, cols), "blk.0.ffn_up.weight", "model.gguf")

    layout, block, _ = TYPES[qtype]
    assert type(w) is layout and w.shape == (rows, cols)
    if block is not None:
        assert w.d.shape == (rows, cols // block)
        assert w.m.shape == ((rows, cols // block) if qtype in WITH_MIN else (rows, 0))
        if layout is Q6Weight:   # two f16 scales per block as one uint32; no m
            assert w.d.dtype == np.uint32 and w.m.dtype == np.float32
        else:
            assert w.d.dtype == w.m.dtype == (np.uint16 if qtype in F16_SCALES else np.float32)

    got = w.to_float32()
    assert_values(qtype, w, got, want)
    want = got.astype(np.float64)           # the products against the values the weight holds

    x = _x(rng, cols)
    scale = np.abs(want) @ np.abs(x.astype(np.float64)) + 1e-30
    # The Q4 layout's matvec, and the I8 layout's with blocks of 32, multiply x rounded to int8 per
    # block, as ggml does (kernels/intdot.py; tests/test_kernels.py checks them exactly against that
    # rounding): within ~1/254 of each block's max |x|.
    tol = 1e-2 if layout in (Q4Weight, Q5Weight, Q6Weight) or block == 32 else 1e-5
    assert (np.abs(w.matvec(x) - want @ x) / scale).max() < tol

    X = _x(rng, cols, n=5)
    scale = np.abs(X.astype(np.float64)) @ np.abs(want).T + 1e-30
    assert (np.abs(w.matmul(X) - X @ want.T) / scale).max() < 1e-5


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_arrays_are_owned_and_contiguous(qtype, tmp_path):
    """The converter copies out of the (memmapped) file: no result may alias it."""
    rng = np.random.default_rng(int(qtype))
    rows, cols = 9, _cols(qtype, 2)
    raw = random_tensor(qtype, rows, cols, rng)
    want = weight_from_gguf(int(qtype), raw.copy(), (rows, cols), "t", "memory").to_float32()
    path = tmp_path / "t.bin"
    raw.tofile(path)
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    w = weight_from_gguf(int(qtype), mm, (rows, cols), "t", str(path))
    for a in w._arrays():
        assert a.flags.c_contiguous
        assert not np.shares_memory(a, mm)
        assert not isinstance(a, np.memmap)
    del mm
    path.unlink()
    np.testing.assert_allclose(w.to_float32(), want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q5_1, T.Q4_K, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
@pytest.mark.parametrize("chunk", [256, 512, 4096])
def test_chunking(qtype, chunk, monkeypatch):
    """Many chunks, a partial last chunk, and rows longer than a chunk give the same values."""
    monkeypatch.setattr(gq, "_CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(chunk + int(qtype))
    rows, cols = 13, 1024
    raw = random_tensor(qtype, rows, cols, rng)
    w = weight_from_gguf(int(qtype), raw, (rows, cols), "t", "f.gguf")
    want = reference(qtype, raw, rows, cols).astype(np.float32)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        assert_values(qtype, w, w.to_float32(), want)
    else:
        assert np.array_equal(w.to_float32(), want)


@settings(max_examples=40, deadline=None, database=None)
@given(st.sampled_from(list(TYPES)), st.integers(1, 12), st.integers(1, 3), st.integers(0, 2**32 - 1))
def test_values_property(qtype, rows, n_blocks, seed):
    rng = np.random.default_rng(seed)
    cols = _cols(qtype, n_blocks)
    raw = random_tensor(qtype, rows, cols, rng)
    w = weight_from_gguf(int(qtype), raw.reshape(-1), (rows, cols), "t", "f.gguf")
    assert_values(qtype, w, w.to_float32(), reference(qtype, raw, rows, cols))


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_vector(qtype):
    rng = np.random.default_rng(int(qtype) + 7)
    n = _cols(qtype, 2)
    raw = random_tensor(qtype, 1, n, rng)
    v = vector_from_gguf(int(qtype), raw.reshape(-1), n, "output_norm.weight", "m.gguf")
    assert v.dtype == np.float32 and v.shape == (n,) and v.flags.c_contiguous
    w = weight_from_gguf(int(qtype), raw.reshape(-1), (1, n), "t", "m.gguf")
    np.testing.assert_array_equal(v, w.to_float32()[0])
    assert_values(qtype, w, v[None], reference(qtype, raw, 1, n))
    assert not np.shares_memory(v, raw)


# ---------------------------------------------------------------- memory

@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
def test_memory_ratio(qtype):
    rows, cols = 16, _cols(qtype, 4)
    raw = random_tensor(qtype, rows, cols, np.random.default_rng(0))
    w = weight_from_gguf(int(qtype), raw, (rows, cols), "t", "f.gguf")
    ratio = w.nbytes / raw.nbytes
    assert ratio == pytest.approx(MEMORY_RATIO[qtype])
    if qtype == T.Q4_1:
        assert ratio <= 1.0


# ---------------------------------------------------------------- errors

def _one_line(err):
    msg = str(err.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("qtype", [T.Q2_K, T.Q3_K, T.IQ4_XS, T.Q8_1])
def test_unsupported_type(qtype):
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.zeros(2 * size, np.uint8)
    with pytest.raises(ModelFormatError) as err:
        weight_from_gguf(int(qtype), raw, (1, 2 * block), "blk.3.attn_q.weight", "/models/x.gguf")
    msg = _one_line(err)
    for part in ("/models/x.gguf", "blk.3.attn_q.weight", qtype.name, "llama-quantize"):
        assert part in msg
    with pytest.raises(ModelFormatError):
        vector_from_gguf(int(qtype), raw, 2 * block, "n", "/models/x.gguf")


def test_unknown_type_id():
    with pytest.raises(ModelFormatError) as err:
        weight_from_gguf(99, np.zeros(64, np.uint8), (1, 32), "tok_embd.weight", "x.gguf")
    msg = _one_line(err)
    assert "99" in msg and "tok_embd.weight" in msg and "x.gguf" in msg
    with pytest.raises(ModelFormatError):
        tensor_nbytes(99, 32)


@pytest.mark.parametrize("qtype", list(TYPES), ids=lambda t: t.name)
@pytest.mark.parametrize("delta", [-1, 1, -64])
def test_wrong_byte_count(qtype, delta):
    rows, cols = 2, _cols(qtype, 1)
    raw = random_tensor(qtype, rows, cols, np.random.default_rng(1)).reshape(-1)
    bad = np.concatenate([raw, np.zeros(max(delta, 0), np.uint8)])[: len(raw) + delta]
    with pytest.raises(ModelFormatError) as err:
        weight_from_gguf(int(qtype), bad, (rows, cols), "blk.0.ffn_down.weight", "m.gguf")
    msg = _one_line(err)
    assert "truncated or corrupt" in msg and "blk.0.ffn_down.weight" in msg and "m.gguf" in msg


@pytest.mark.parametrize("qtype,cols", [(T.Q4_0, 48), (T.Q8_0, 16), (T.Q4_K, 128), (T.Q6_K, 512 + 32)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_partial_block(qtype, cols):
    with pytest.raises(ModelFormatError) as err:
        weight_from_gguf(int(qtype), np.zeros(10_000, np.uint8), (2, cols), "w", "m.gguf")
    msg = _one_line(err)
    assert qtype.name in msg and "w" in msg and "m.gguf" in msg


# ---------------------------------------------------------------- sizes and names

def test_tensor_nbytes_and_names():
    for qtype, (block, size) in GGML_QUANT_SIZES.items():
        assert type_name(int(qtype)) == qtype.name
        assert tensor_nbytes(int(qtype), 4 * block) == 4 * size
    assert type_name(5) == "unknown type 5"
    with pytest.raises(ModelFormatError):
        tensor_nbytes(int(T.Q4_K), 100)
    with pytest.raises(ModelFormatError, match="unknown to pocketinfer"):
        tensor_nbytes(5, 32)
