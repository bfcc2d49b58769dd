"""The flash FFN executor (engine/executors/flash_ffn.py) and the neuron cache (engine/flash/cache.py): output from
bundles equals the in-memory FFN for every segment split, policy and ablation switch, with the numba
kernels and their numpy twins; injected read faults fail one call and leave the executor usable."""

from __future__ import annotations

import os

import numpy as np
import pytest

import engine.executors.flash_ffn as flash_ffn
from engine.errors import FlashReadError
from engine.executors.flash_ffn import FlashFFN, LayerPlan
from engine.flash import native_reader
from engine.flash.bundles import ALIGN, open_bundles
from engine.flash.cache import SegmentCache
from kernels.activation import RELU, SILU, glu
from kernels.sparse_ffn import sparse_acts, sparse_acts_numpy, sparse_down, sparse_down_numpy, sparse_ffn_numpy
from planner.bundles import layer_arrays, write_bundles
from tests.test_flash_bundles import FFN, HIDDEN, LAYERS, make_layers
from tests.test_flash_readers import aio_works

KINDS_READERS = ["python"] + (["aio"] if aio_works() else []) + (["native"] if native_reader.available() else [])
KERNELS = [(sparse_acts, sparse_down), (sparse_acts_numpy, sparse_down_numpy)]    # numba (if any), numpy


def reference(lw, x, neurons=None, act=SILU):
    """The in-memory sparse FFN over the given neurons (all by default), same weight format."""
    arrays, dscale, bits16 = layer_arrays(lw)
    idx = np.arange(FFN, dtype=np.int32) if neurons is None else np.sort(np.asarray(neurons, np.int32))
    out = np.empty(HIDDEN, np.float32)
    return sparse_ffn_numpy(*arrays, dscale, bits16, x, idx, np.zeros(0, np.float32), act, 1,
                            np.empty(len(idx), np.float32), out)


@pytest.fixture(params=["f32", "q4"])
def model(request, tmp_path):
    layers, orders = make_layers(seed=1, q4=request.param == "q4")
    path = tmp_path / "ffn.bundles"
    write_bundles(path, layers, orders, fingerprint="x")
    return layers, open_bundles(path)


CONFIGS = [dict(hot=0, cache=0), dict(hot=FFN, cache=0), dict(hot=20, cache=30), dict(hot=40, cache=FFN)]


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("pipeline,bundled,policy", [(True, True, "lru"), (False, True, "freq"),
                                                     (True, False, "window"), (False, False, "lru")])
def test_dense_mode_matches_in_memory_ffn(model, cfg, pipeline, bundled, policy):
    layers, bf = model
    rng = np.random.default_rng(2)
    ff = FlashFFN(bf, [LayerPlan("dense", **cfg)] * LAYERS, SILU, pipeline=pipeline, bundled=bundled,
                  policy=policy, request_bytes=3 * 4096, io_threads=2)
    try:
        for _ in range(3):
            for i, lw in enumerate(layers):
                x = rng.standard_normal(HIDDEN).astype(np.float32)
                np.testing.assert_allclose(ff.ffn(i, x), reference(lw, x), rtol=1e-4, atol=2e-3)
        s = ff.stats
        assert s.needed == 3 * LAYERS * FFN and s.hot + s.hits + s.misses == s.needed
        assert s.misses == 0 if cfg["hot"] == FFN else s.misses > 0
    finally:
        ff.close()


@pytest.mark.parametrize("policy", ["lru", "freq", "window"])
def test_given_neurons_with_cache_and_numpy_twin(model, policy, monkeypatch):
    layers, bf = model
    rng = np.random.default_rng(3)
    for acts_kernel, down_kernel in KERNELS:
        monkeypatch.setattr(flash_ffn, "sparse_acts", acts_kernel)
        monkeypatch.setattr(flash_ffn, "sparse_down", down_kernel)
        ff = FlashFFN(bf, [LayerPlan("given", hot=10, cache=25)] * LAYERS, RELU, policy=policy, io_threads=2)
        try:
            for t in range(12):
                for i, lw in enumerate(layers):
                    x = rng.standard_normal(HIDDEN).astype(np.float32)
                    k = [0, 1, 30, FFN][t % 4]                        # none, one, some, all neurons
                    neurons = rng.choice(FFN, size=k, replace=False)
                    np.testing.assert_allclose(ff.ffn(i, x, neurons), reference(lw, x, neurons, RELU),
                                               rtol=1e-4, atol=2e-3)
            assert ff.stats.hits > 0
        finally:
            ff.close()


def float_reference(lw, x):
    """x (n, hidden) -> (n, hidden): the same stored weights dequantized, float32 math throughout (the
    decode kernel instead rounds x to int8 per block for Q4 rows, as the dense decode kernel does)."""
    a, dscale, bits16 = layer_arrays(lw)
    g, u, d = (flash_ffn._weight(*a[k:k + 3], bits16).to_float32() for k in (0, 3, 6))
    act = glu(x @ g.T, x @ u.T, SILU, np.empty((len(x), FFN), np.float32))
    return (act @ d) * dscale


def test_prefill_batch_matches_float_math(model):
    layers, bf = model
    rng = np.random.default_rng(4)
    ff = FlashFFN(bf, [LayerPlan("dense", hot=30, cache=10)] * LAYERS, SILU, request_bytes=2 * 4096)
    try:
        x = rng.standard_normal((5, HIDDEN)).astype(np.float32)
        for i, lw in enumerate(layers):
            np.testing.assert_allclose(ff.ffn_batch(i, x), float_reference(lw, x), rtol=1e-4, atol=2e-3)
        assert ff.stats.prefill_bytes > 0 and ff.stats.bytes_read == 0     # prefill leaves decode counters
    finally:
        ff.close()


class _Faulty:
    """Wraps a reader's submit and submit_many (or read): its third request fails, by an unreadable descriptor ("error",
    kept until that request's result is asked for, since native readers read it later) or by asking past
    the end of the file ("short")."""

    def __init__(self, reader, fault: str, size: int):
        self.reader, self.fault, self.size, self.n = reader, fault, size, 0
        self.real_read = reader.read
        self.real_submit = type(reader).submit.__get__(reader)
        reader.submit, reader.read = self.submit, self.read
        reader.submit_many = lambda bufs, offsets: [self.submit(b, o) for b, o in zip(bufs, offsets)]

    def _bad(self, call, buf, offset):
        if self.fault == "short":
            return call(buf, self.size - ALIGN)
        good, bad = self.reader.fd, os.open(os.devnull, os.O_WRONLY)
        self.reader._use_fd(bad)
        return good, bad, call(buf, offset)

    def submit(self, buf, offset):
        self.n += 1
        if self.n != 3:
            return self.real_submit(buf, offset)
        got = self._bad(self.real_submit, buf, offset)
        if self.fault == "short":
            return got
        good, bad, ticket = got
        reader = self.reader

        class Restoring:
            def result(self):
                try:
                    return ticket.result()
                finally:
                    if reader.fd == bad:
                        reader._use_fd(good)
                        os.close(bad)

            def exception(self):
                try:
                    self.result()
                except FlashReadError as e:
                    return e

            def cancel(self):
                return False

            def cancelled(self):
                return False

        return Restoring()

    def read(self, buf, offset):
        self.n += 1
        if self.n != 3:
            return self.real_read(buf, offset)
        if self.fault == "short":
            return self._bad(self.real_read, buf, offset)
        good, bad = self.reader.fd, os.open(os.devnull, os.O_WRONLY)
        self.reader._use_fd(bad)
        try:
            return self.real_read(buf, offset)
        finally:
            self.reader._use_fd(good)
            os.close(bad)


@pytest.mark.parametrize("kind", KINDS_READERS)
@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("fault", ["error", "short"])
def test_read_fault_fails_one_call_and_the_next_works(model, pipeline, fault, kind):
    layers, bf = model
    rng = np.random.default_rng(5)
    ff = FlashFFN(bf, [LayerPlan("dense", hot=10, cache=20)] * LAYERS, SILU, pipeline=pipeline,
                  request_bytes=4096, io_threads=2, reader_kind=kind)
    _Faulty(ff.reader, fault, os.path.getsize(bf.path) + ALIGN)
    try:
        x = rng.standard_normal(HIDDEN).astype(np.float32)
        with pytest.raises(FlashReadError, match="short read" if fault == "short" else "aborted"):
            ff.ffn(0, x)
        for _ in range(3):                     # usable afterwards, and the cache holds correct bundles
            for i, lw in enumerate(layers):
                x = rng.standard_normal(HIDDEN).astype(np.float32)
                np.testing.assert_allclose(ff.ffn(i, x), reference(lw, x), rtol=1e-4, atol=2e-3)
    finally:
        ff.close()


@pytest.mark.parametrize("kind", KINDS_READERS)
def test_every_reader_gives_the_same_output(model, kind):
    layers, bf = model
    outs = {}
    for k in ("python", kind):
        ff = FlashFFN(bf, [LayerPlan("given", hot=10, cache=25)] * LAYERS, SILU, io_threads=3, reader_kind=k,
                      request_bytes=2 * 4096)
        try:
            r = np.random.default_rng(6)
            outs[k] = [ff.ffn(i, r.standard_normal(HIDDEN).astype(np.float32), r.choice(FFN, 40, replace=False))
                       for _ in range(4) for i in range(LAYERS)]
        finally:
            ff.close()
    for a, b in zip(outs["python"], outs[kind]):
        np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- the cache on its own

def check_consistent(c: SegmentCache):
    held = c.pos_of[c.pos_of >= 0]
    assert len(set(held.tolist())) == len(held) <= c.capacity
    for slot, pos in enumerate(c.pos_of):
        if pos >= 0:
            assert c.slot_of[pos] == slot
    assert (c.slot_of >= 0).sum() == len(held)


def test_lru_evicts_least_recently_used():
    c = SegmentCache(10, 2, "lru")
    for token in ([1], [2], [1], [3]):
        _, _, miss = c.lookup(np.array(token))
        c.admit(miss)
        c.end_token()
        check_consistent(c)
    assert set(c.pos_of.tolist()) == {1, 3}                 # 2 was least recently used


def test_a_token_never_evicts_its_own_neurons():
    c = SegmentCache(10, 2, "lru")
    hits, slots, miss = c.lookup(np.array([4, 5, 6]))
    got = c.admit(miss)
    assert (got >= 0).sum() == 2 and got[2] == -1           # the third does not fit
    c.end_token()
    check_consistent(c)


def test_frequency_policy_keeps_the_frequent_neuron():
    c = SegmentCache(100, 1, "freq")
    rng = np.random.default_rng(0)
    for t in range(50):
        want = np.array(sorted({7, int(rng.integers(10, 100))}))
        _, _, miss = c.lookup(want)
        c.admit(miss)
        c.end_token()
        check_consistent(c)
    assert c.pos_of[0] == 7                                 # one-off neurons lost against the regular one


@pytest.mark.parametrize("policy", ["lru", "freq", "window"])
def test_random_traffic_keeps_the_maps_consistent(policy):
    c = SegmentCache(50, 12, policy)
    rng = np.random.default_rng(1)
    for _ in range(200):
        want = np.unique(rng.integers(0, 50, size=rng.integers(0, 20)))
        hits, slots, miss = c.lookup(want)
        np.testing.assert_array_equal(c.pos_of[slots], hits)
        got = c.admit(miss)
        np.testing.assert_array_equal(c.pos_of[got[got >= 0]], miss[got >= 0])
        c.end_token()
        check_consistent(c)


# ---------------------------------------------------------------- a deploy directory below 100%

def test_deploy_below_budget_runs_ffns_from_bundles(tmp_path):
    """A relu model planned at 90% (its minimum is ~80%): engine.load(DEPLOY) drops the FFN weights and runs every FFN from the
    bundle file; greedy tokens equal those of the same bundles fully resident (every neuron hot)."""
    import json

    from model_factory import make_hf_model

    from engine.loader import load
    from planner.pipeline import make_deploy

    src = tmp_path / "src"
    make_hf_model("llama-relu", src, seed=0, intermediate_size=1024)   # bundles outweigh the I/O buffers
    cal = tmp_path / "cal.txt"
    cal.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(3, 128, 600)))
    res = make_deploy(src, "90%", tmp_path / "d", device_profile="snapdragon-8gen3-ufs4", calibration=cal, threads=1)
    plan = json.loads((res.path / "plan.json").read_text())
    assert plan["execution"]["weights"] == "flash"
    llm = load(res.path, threads=1)
    store = flash_ffn.store_of(llm.model.executors)
    assert isinstance(store, FlashFFN) and llm.model.weights.layers[0].w_gate is None
    assert "FFN flash (dense" in llm.describe() and "FFN flash (bundle file" in llm.describe()
    r = llm.generate([5, 6, 7], max_tokens=24, temperature=0)
    got = r.tokens
    assert store.stats.tokens > 0 and r.stats.flash["tokens"] == len(got) - 1   # reported through generate
    # The same bundles, every neuron resident: same arithmetic, no flash reads.
    for lay in plan["decode"]["layers"]:
        lay.update(hot_neurons=plan["model"]["ffn"], cold_cache_neurons=0)
    (res.path / "plan.json").write_text(json.dumps(plan))
    ref = load(res.path, threads=1)
    assert ref.generate([5, 6, 7], max_tokens=24, temperature=0).tokens == got
    assert flash_ffn.store_of(ref.model.executors).stats.misses == 0
