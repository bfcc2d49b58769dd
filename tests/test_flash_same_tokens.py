"""Same tokens at any budget: the flash FFN (engine/executors/flash_ffn.py) gives bitwise the same output whatever its
cache holds, whatever the hot count, request size, pipelining or bundling, so a deploy at any budget
decodes the same greedy tokens, with the same logits, as the same bundles fully resident. The cache
changes where weights come from, never the arithmetic.

tools/check_flash_tokens.py makes the same check on SmolLM2-135M deploys (128 steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import engine.executors.flash_ffn as flash_ffn
from engine.executors.choose import layer_by_layer
from engine.executors.flash_ffn import FlashFFN, LayerPlan
from engine.flash.bundles import open_bundles
from kernels.activation import SILU
from kernels.sparse_ffn import sparse_acts, sparse_acts_numpy, sparse_down, sparse_down_numpy
from planner.bundles import write_bundles
from tests.test_flash_bundles import FFN, HIDDEN, LAYERS, make_layers

# Segment splits and read paths that group the neurons of one token differently.
VARIANTS = [dict(hot=0, cache=0, request_bytes=4096, io_threads=1), dict(hot=20, cache=30), dict(hot=40, cache=FFN),
            dict(hot=7, cache=11),
            dict(hot=0, cache=25, pipeline=False), dict(hot=13, cache=9, bundled=False, policy="freq"),
            dict(hot=30, cache=40, policy="window", request_bytes=4096, max_gap=0)]


@pytest.fixture(params=["numba", "numpy"])
def kernels(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setattr(flash_ffn, "sparse_acts", sparse_acts_numpy)
        monkeypatch.setattr(flash_ffn, "sparse_down", sparse_down_numpy)
    else:
        assert flash_ffn.sparse_acts is sparse_acts and flash_ffn.sparse_down is sparse_down
    return request.param


@pytest.fixture(params=["f32", "q4", "q5", "q6"])
def bundles(request, tmp_path):
    layers, orders = make_layers(seed=4, q4=request.param == "q4", q5=request.param == "q5", q6=request.param == "q6")
    path = tmp_path / "ffn.bundles"
    write_bundles(path, layers, orders, fingerprint="x")
    return open_bundles(path)


def make(bf, mode, hot, cache, **kw):
    kw = {"request_bytes": 3 * 4096, "io_threads": 2, **kw}
    return FlashFFN(bf, [LayerPlan(mode, hot=hot, cache=cache)] * LAYERS, SILU, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("chunk", [8, flash_ffn.CHUNK])
@pytest.mark.parametrize("mode", ["dense", "given"])
def test_ffn_bits_do_not_depend_on_the_cache(bundles, kernels, mode, chunk, monkeypatch):
    """A token sequence that comes back to the same inputs: each call, with its cache cold, warm or
    holding other neurons, equals the fully resident executor bit for bit. Chunks of 8 neurons: a dozen
    per token, completed one group of reads at a time, and a staging ring smaller than a token's misses."""
    monkeypatch.setattr(flash_ffn, "CHUNK", chunk)
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal(HIDDEN).astype(np.float32) for _ in range(3)]
    sets = [np.sort(rng.choice(FFN, k, replace=False)) for k in (50, 70, FFN)]
    seq = [0, 1, 0, 2, 0, 0, 1]                     # token 0 with a cold, then differently warm caches
    ref = make(bundles, mode, FFN, 0)
    try:
        want = {(t, i): ref.ffn(i, xs[t], sets[t]).copy() for t in range(3) for i in range(LAYERS)}
    finally:
        ref.close()
    for v in VARIANTS:
        ff = make(bundles, mode, **v)
        try:
            for t in seq:
                for i in range(LAYERS):
                    np.testing.assert_array_equal(ff.ffn(i, xs[t], sets[t]), want[t, i], err_msg=str(v))
            s = ff.stats
            assert s.misses > 0 and (s.hits > 0 or v["cache"] == 0), v         # every segment was used
            if chunk == 8 and v == VARIANTS[0]:
                assert ff.ring < FFN                    # the ring wrapped within a token: slots reused
        finally:
            ff.close()


def test_prefill_bits_do_not_depend_on_the_hot_count(bundles, monkeypatch):
    """Prefill tiles are fixed position ranges: any hot count (one tile across the hot/cold boundary,
    or none) gives the fully resident bits."""
    monkeypatch.setattr(flash_ffn, "_PREFILL_TILE", 32)        # 3 tiles of FFN = 96
    x = np.random.default_rng(7).standard_normal((5, HIDDEN)).astype(np.float32)
    ref = make(bundles, "dense", FFN, 0)
    try:
        want = [ref.ffn_batch(i, x) for i in range(LAYERS)]
    finally:
        ref.close()
    for hot, kw in ((0, {}), (20, {}), (32, {}), (50, {"pipeline": False}), (95, {"request_bytes": 4096})):
        ff = make(bundles, "dense", hot, 10, **kw)
        try:
            for i in range(LAYERS):
                np.testing.assert_array_equal(ff.ffn_batch(i, x), want[i], err_msg=f"hot {hot}")
        finally:
            ff.close()


# ---------------------------------------------------------------- a deploy directory, end to end

STEPS = 64


def greedy(model, ids, steps=STEPS):
    """Prompt, then `steps` argmax tokens fed back (EOS ignored) -> (tokens, (steps, vocab) f32 logits)."""
    cache = model.new_cache(len(ids) + steps + 1)
    logits = model.forward(np.asarray(ids), cache, all_logits=False)[0]
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits.copy())
        tokens.append(int(np.argmax(logits)))
        logits = model.forward(np.array([tokens[-1]]), cache, all_logits=False)[0]
    return tokens, np.stack(rows)


def test_greedy_tokens_at_two_budgets_equal_the_fully_resident_run(tmp_path):
    """A SwiGLU model (like SmolLM2) planned at 90% and at 80%, about the lowest budget the planner
    accepts for it (embeddings and attention are most of its bytes): STEPS greedy tokens and every
    step's logits equal those of the same bundles with every neuron resident, and those of the same
    plan with a cold-neuron cache added (the planner gives this model none)."""
    from model_factory import make_hf_model

    from engine.loader import load
    from planner.pipeline import make_deploy

    src = tmp_path / "src"
    make_hf_model("llama", src, seed=0, intermediate_size=1024)   # bundles outweigh the I/O buffers
    cal = tmp_path / "cal.txt"
    cal.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(3, 128, 600)))
    prompt = [5, 6, 7, 8, 9]
    hot_counts = []
    for budget in ("90%", "80%"):
        res = make_deploy(src, budget, tmp_path / budget, device_profile="snapdragon-8gen3-ufs4", calibration=cal,
                          threads=1)
        plan = json.loads((res.path / "plan.json").read_text())
        assert plan["execution"]["weights"] == "flash"
        llm = load(res.path, threads=1)
        flash = flash_ffn.store_of(llm.model.executors)
        F = flash.bundles.ffn
        hot_counts.append([L.H for L in flash.layers])
        assert sum(hot_counts[-1]) < LAYERS * F                    # some neurons really come from flash
        got = greedy(llm.model, prompt)
        assert flash.stats.misses > 0
        runs = {}
        for name, hot, cache in (("cached", None, F // 3), ("resident", F, 0)):
            store = FlashFFN(flash.bundles, [LayerPlan(L.mode, hot=L.H if hot is None else hot, cache=cache)
                                             for L in flash.layers], flash.act, io_threads=1)
            with llm.model.running(layer_by_layer(llm.model, store.layer_ffns(False), store.layer_ffns(True))):
                runs[name] = greedy(llm.model, prompt)
            assert store.stats.hits > 0 if name == "cached" else store.stats.misses == 0
            store.close()
        flash.close()
        want_tokens, want_logits = runs["resident"]
        for tokens, logits in (got, runs["cached"]):
            assert tokens == want_tokens, budget
            np.testing.assert_array_equal(logits, want_logits, err_msg=budget)
    assert hot_counts[0] != hot_counts[1]                          # two budgets, two different splits
