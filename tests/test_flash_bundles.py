"""The bundle file (engine/flash/bundles.py, planner/bundles.py) and the flash reader (engine/flash/reader.py):
round trip, load-time detection of truncated and mismatched files, short reads and O_DIRECT refusal."""

from __future__ import annotations

import errno
import os
import types

import numpy as np
import pytest

from engine.errors import FlashReadError, ModelFormatError
from engine.flash.bundles import ALIGN, FIELD_NAMES, open_bundles
from engine.flash.reader import FlashReader, aligned_buffer, merge_runs
from engine.model.layout import quantize_q4
from engine.model.weights import F32Weight, Q4Weight
from planner.bundles import hot_to_cold, layer_arrays, write_bundles

HIDDEN, FFN, LAYERS = 64, 96, 2


def _q5(a):
    """a (rows, cols) f32 as a Q5Weight, through GGUF's Q5_0 blocks."""
    from gguf import GGMLQuantizationType, quants

    from engine.formats.gguf_quants import weight_from_gguf
    raw = quants.quantize(a, GGMLQuantizationType.Q5_0)
    return weight_from_gguf(int(GGMLQuantizationType.Q5_0), raw.reshape(-1), a.shape, "t", "test")


def _q6(a):
    """a (rows, cols) f32 as a Q6Weight: a scale per 16 elements, max |value| / 31, values rounded."""
    from engine.model.weights import Q6Weight
    from kernels.dequant import q6_join_numpy
    rows, cols = a.shape
    halves = a.reshape(rows, cols // 16, 16)
    s = (np.abs(halves).max(axis=2) / 31).astype(np.float16)                 # (rows, cols/16)
    q = np.clip(np.rint(halves / s.astype(np.float32)[:, :, None]), -32, 31) + 32
    qs = q6_join_numpy(q.astype(np.uint8).reshape(rows, cols // 32, 32), np.empty((rows, 3 * cols // 32), np.uint64))
    return Q6Weight(qs, s.view(np.uint32), np.empty((rows, 0), np.float32))


def make_layers(seed=0, q4=False, q5=False, q6=False):
    rng = np.random.default_rng(seed)
    layers = []
    for _ in range(LAYERS):
        g, u = (rng.standard_normal((FFN, HIDDEN)).astype(np.float32) for _ in range(2))
        d = rng.standard_normal((HIDDEN, FFN)).astype(np.float32)
        if q5:
            lw = types.SimpleNamespace(w_gate=_q5(g), w_up=_q5(u), w_down=_q5(d))
        elif q6:
            lw = types.SimpleNamespace(w_gate=_q6(g), w_up=_q6(u), w_down=_q6(d))
        elif q4:
            lw = types.SimpleNamespace(w_gate=Q4Weight(*quantize_q4(g)), w_up=Q4Weight(*quantize_q4(u)),
                                       w_down=Q4Weight(*quantize_q4(d)))
        else:
            lw = types.SimpleNamespace(w_gate=F32Weight(g), w_up=F32Weight(u), w_down=F32Weight(d))
        layers.append(lw)
    orders = [rng.permutation(FFN).astype(np.int32) for _ in range(LAYERS)]
    return layers, orders


@pytest.fixture
def bundle_path(tmp_path):
    layers, orders = make_layers(q4=True)
    path = tmp_path / "ffn.bundles"
    write_bundles(path, layers, orders, fingerprint="f" * 64, act="silu")
    return path, layers, orders


def test_round_trip_records_hold_each_neuron_bundle(bundle_path):
    path, layers, orders = bundle_path
    bf = open_bundles(path, fingerprint="f" * 64, n_layers=LAYERS, hidden=HIDDEN, ffn=FFN)
    bf.verify()
    assert path.stat().st_size % ALIGN == 0
    for i, (lw, order) in enumerate(zip(layers, orders)):
        meta = bf.layers[i]
        assert meta.offset % ALIGN == 0
        np.testing.assert_array_equal(meta.order, order)
        np.testing.assert_array_equal(meta.inverse[order], np.arange(FFN))
        with open(path, "rb") as f:
            f.seek(meta.offset)
            recs = np.frombuffer(f.read(meta.nbytes), dtype=bf.dtype)
        arrays, dscale, _ = layer_arrays(lw)
        np.testing.assert_array_equal(meta.dscale, dscale)
        for name, a in zip(FIELD_NAMES, arrays):
            np.testing.assert_array_equal(recs[name], a[order])      # position p holds neuron order[p]


def test_no_partial_file_left_on_failure(tmp_path):
    layers, orders = make_layers()
    with pytest.raises(Exception):
        write_bundles(tmp_path / "x.bundles", layers, [orders[0], orders[1][:-1]])
    assert list(tmp_path.iterdir()) == []


def test_truncated_file_is_detected_at_load(bundle_path):
    path = bundle_path[0]
    size = path.stat().st_size
    os.truncate(path, size - ALIGN)
    with pytest.raises(ModelFormatError, match="truncated"):
        open_bundles(path)


def test_extra_bytes_are_detected_at_load(bundle_path):
    path = bundle_path[0]
    with open(path, "ab") as f:
        f.write(b"\0" * 10)
    with pytest.raises(ModelFormatError, match="extra bytes"):
        open_bundles(path)


@pytest.mark.parametrize("key,value", [("fingerprint", "e" * 64), ("n_layers", 3), ("hidden", 32), ("ffn", 97)])
def test_mismatched_model_is_detected_at_load(bundle_path, key, value):
    with pytest.raises(ModelFormatError, match="another model"):
        open_bundles(bundle_path[0], **{key: value})


def test_corrupt_header_and_records_are_detected(bundle_path):
    path = bundle_path[0]
    bf = open_bundles(path)
    raw = bytearray(path.read_bytes())
    raw[40] ^= 0xFF                                        # inside the header JSON
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="crc32"):
        open_bundles(path)
    raw[40] ^= 0xFF
    raw[bf.layers[1].offset + 5] ^= 0x01                   # inside layer 1's records
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelFormatError, match="layer 1 fails its crc32"):
        open_bundles(path).verify()


def test_not_a_bundle_file(tmp_path):
    p = tmp_path / "junk.bundles"
    p.write_bytes(b"hello world" * 10)
    with pytest.raises(ModelFormatError, match="not a pocketinfer bundle file"):
        open_bundles(p)


def test_hot_to_cold_order():
    np.testing.assert_array_equal(hot_to_cold(np.array([0.1, 0.5, 0.5, 0.0])), [1, 2, 0, 3])


def test_merge_runs():
    assert merge_runs(np.array([], dtype=np.int64), 1, 8) == []
    assert merge_runs(np.array([3, 4, 5, 9]), 0, 8) == [(3, 6), (9, 10)]
    assert merge_runs(np.array([3, 4, 5, 9]), 3, 8) == [(3, 10)]          # gap of 3 records read through
    assert merge_runs(np.arange(10), 0, 4) == [(0, 4), (4, 8), (8, 10)]
    assert merge_runs(np.array([0, 1, 2, 3, 20]), 0, 2) == [(0, 2), (2, 4), (20, 21)]


def test_reader_short_read_raises(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(b"\1" * (3 * ALIGN))
    r = FlashReader(p, direct=True, threads=1)
    try:
        _, buf = aligned_buffer(2 * ALIGN)
        r.read(buf[:ALIGN], ALIGN)
        assert (buf[:ALIGN] == 1).all()
        with pytest.raises(FlashReadError, match="short read"):
            r.read(buf, 2 * ALIGN)
        with pytest.raises(FlashReadError, match="short read"):
            r.submit(buf, 2 * ALIGN).result()
    finally:
        r.close()


def test_reader_falls_back_when_o_direct_is_refused(tmp_path, monkeypatch):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(256)) * (2 * ALIGN // 256))
    real_open = os.open

    def refusing_open(path, flags, *a):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", refusing_open)
    r = FlashReader(p, direct=True, threads=1)
    try:
        assert not r.direct and "refused O_DIRECT" in r.mode_note
        _, buf = aligned_buffer(ALIGN)
        r.read(buf, ALIGN)
        assert bytes(buf[:4]) == bytes([0, 1, 2, 3])
    finally:
        r.close()
