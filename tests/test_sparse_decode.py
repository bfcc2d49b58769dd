"""Sparse decode (engine/executors/sparse.py) in the model: relu-exact equals dense on ReLU and dReLU checkpoints,
predicted and oracle modes run and degrade gracefully to dense at their limits, plans are read and
checked, and `pocketinfer eval-sparsity` reports (or fails with one line)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import ConfigError, ModelFormatError
from engine.executors.predictor import LayerPredictor, save_predictors
from engine.executors.sparse import SparseFFN, attach, oracle_thresholds, quantize_i8, quantize_q4, read_plan, transpose_down
from engine.model.transformer import Transformer
from engine.model.weights import F32Weight, Q4Weight
from model_factory import hf_to_gguf, make_hf_model

pytest.importorskip("torch", reason="the test models are made with the [test] extra (torch, transformers)")

ROOT = Path(__file__).resolve().parents[1]
PROMPT, STEPS = [1, 17, 93, 5, 64], [3, 99, 14, 51, 76, 20, 8, 111]
VOCAB = {"model": "llama", "tokens": ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)],
         "scores": [0.0] * 128, "types": [2, 3, 3] + [1] * 125}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for name in ("llama-relu", "bamboo-drelu", "llama"):
        d = tmp_path_factory.mktemp(name)
        make_hf_model(name, d)
        out[name] = d
    return out


def decode_logits(model, prompt=PROMPT, steps=STEPS):
    """Logits of each single-token decode step after prefilling `prompt`: (len(steps), vocab) f32."""
    cache = model.new_cache(len(prompt) + len(steps))
    model.forward(np.array(prompt), cache)
    return np.stack([model.forward(np.array([t]), cache, all_logits=False)[0] for t in steps])


def max_rel(a, b):
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("name", ["llama-relu", "bamboo-drelu"])
def test_relu_exact_equals_dense(models, name):
    llm = engine.load(str(models[name]), threads=2)
    m = llm.model
    assert m.sparse is not None and {layer.mode for layer in m.sparse.layers} == {"relu-exact"}  # the default
    m.sparse.reset_stats()                                   # load's warm-up decoded a token
    sparse = decode_logits(m)
    f = m.config.intermediate_size
    realized = [st.sparsity(f) for st in m.sparse.stats]
    assert all(st.tokens == len(STEPS) for st in m.sparse.stats)
    assert all(0.2 < s < 0.8 for s in realized), realized      # random weights: about half the gates are <= 0
    m.sparse = None
    dense = decode_logits(m)
    assert max_rel(sparse, dense) < 1e-4


def test_swiglu_defaults_to_dense(models):
    llm = engine.load(str(models["llama"]), threads=2)
    assert llm.model.sparse is None
    assert attach(llm.model, ["dense"] * llm.config.num_hidden_layers) is None
    with pytest.raises(ConfigError, match="relu-exact needs a ReLU"):
        SparseFFN(llm.model, ["relu-exact"] * llm.config.num_hidden_layers)


def _dequantized(m):
    """The same model with every matrix expanded to F32: the exact math of the stored weights."""
    w = m.weights
    mats = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    layers = [dataclasses.replace(lw, wqkv=None, w_gate_up=None,
                                  **{n: F32Weight(getattr(lw, n).to_float32()) for n in mats}) for lw in w.layers]
    emb = F32Weight(w.embed.to_float32())
    head = emb if w.lm_head is w.embed else F32Weight(w.lm_head.to_float32())
    return Transformer(m.config, dataclasses.replace(w, layers=layers, embed=emb, lm_head=head))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_relu_exact_quantized(models, tmp_path, qtype):
    """Quantized gate/up through the sparse kernels; downT exact (f32) or re-quantized (i8, q4). The
    reference is the stored weights' exact math (dequantized to F32); the dense quantized path is held
    to the same reference, since its kernels may round the activations (int8 x)."""
    llm = engine.load(str(hf_to_gguf(models["llama-relu"], tmp_path / "m.gguf", qtype, VOCAB)), threads=2)
    m = llm.model
    # GGUF's llama architecture has no activation field (the file loads as SiLU): put ReLU back.
    m.config = dataclasses.replace(m.config, hidden_act="relu")
    ref = decode_logits(_dequantized(m))
    m.sparse = None
    # The unfused dense path: the kernels the sparse layers share (gate matvec, row products). The
    # fused one may run numba code cached before those kernels changed, so it is not the yardstick.
    m._fused_decode = False
    dense_err = max_rel(decode_logits(m), ref)
    out = {}
    for fmt in ("f32", "i8", "q4"):
        attach(m, down_format=fmt)
        out[fmt] = decode_logits(m)
    assert max_rel(out["f32"], ref) <= max(1e-4, 1.5 * dense_err), dense_err
    # what re-quantizing the transposed down costs, against the exact transposed copy
    errs = {fmt: max_rel(out[fmt], out["f32"]) for fmt in ("i8", "q4")}
    assert 0 < errs["i8"] < 5e-2 and errs["q4"] < 3e-1, errs   # random weights amplify rounding
    assert errs["i8"] < errs["q4"], errs                  # the reason downT defaults to i8


def _predictors(m, threshold, rank=4, seed=0):
    rng = np.random.default_rng(seed)
    c = m.config
    return {i: LayerPredictor.from_float(rng.standard_normal((c.hidden_size, rank)).astype(np.float32),
                                         rng.standard_normal(rank).astype(np.float32),
                                         rng.standard_normal((rank, c.intermediate_size)).astype(np.float32),
                                         rng.standard_normal(c.intermediate_size).astype(np.float32), threshold, 0.0)
            for i in range(c.num_hidden_layers)}


@pytest.mark.parametrize("name", ["llama", "bamboo-drelu"])
def test_predicted_mode(models, tmp_path, name):
    llm = engine.load(str(models[name]), threads=2)
    m = llm.model
    L = m.config.num_hidden_layers
    m.sparse = None
    dense = decode_logits(m)
    # predicting every neuron active is the dense FFN
    attach(m, ["predicted"] * L, predictors=_predictors(m, -1e30))
    assert max_rel(decode_logits(m), dense) < 1e-4
    # a real threshold: some neurons skipped, output differs but stays finite; clusters widen the set
    path = tmp_path / "predictors.npz"
    save_predictors(path, _predictors(m, 0.0), m.config.hidden_size, m.config.intermediate_size)
    modes, preds, cluster = read_plan(path, m.config)
    assert modes == ["predicted"] * L and cluster == 1
    chosen = {}
    for c in (1, 8):
        attach(m, modes, predictors=preds, cluster=c, track_truth=True)
        out = decode_logits(m)
        assert np.isfinite(out).all() and max_rel(out, dense) > 1e-4
        chosen[c] = sum(st.chosen for st in m.sparse.stats)
        assert all(0 < st.hits <= min(st.chosen, st.true_active) for st in m.sparse.stats)
    assert chosen[8] > chosen[1]


def test_oracle_mode(models):
    llm = engine.load(str(models["llama"]), threads=2)
    m = llm.model
    L, f = m.config.num_hidden_layers, m.config.intermediate_size
    m.sparse = None
    dense = decode_logits(m)
    calib = list(range(3, 67))
    attach(m, ["oracle"] * L, oracle_thresholds=oracle_thresholds(m, calib, 0.0))
    assert max_rel(decode_logits(m), dense) < 1e-4
    attach(m, ["oracle"] * L, oracle_thresholds=oracle_thresholds(m, calib, 0.5), track_truth=True)
    out = decode_logits(m)
    for st in m.sparse.stats:
        assert 0.2 < st.sparsity(f) < 0.8 and st.hits == st.chosen == st.true_active   # exact by construction
    assert max_rel(out, dense) > 1e-4
    with pytest.raises(ConfigError, match="oracle needs a threshold"):
        SparseFFN(m, ["oracle"] * L)


def test_transposed_down_formats():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((40, 64)).astype(np.float32)
    a[3] = 0.0                                              # an all-zero row has scale 0, not NaN
    q, d = quantize_i8(a)
    back = q.reshape(40, 2, 32) * d.view(np.float16).astype(np.float32)[:, :, None]
    assert np.abs(back.reshape(40, 64) - a).max() <= np.abs(a).max() / 127 * 0.51 + 1e-6
    qs, d4, m4 = quantize_q4(a)
    w = Q4Weight(qs, d4, m4).to_float32()
    assert np.isfinite(w).all() and np.abs(w - a).max() < (a.max() - a.min()) / 15
    down = Q4Weight(*quantize_q4(rng.standard_normal((64, 96)).astype(np.float32)))   # (hidden 64, ffn 96)
    dw, dd, dm, scale, flag = transpose_down(down, "i8")
    assert dw.shape == (96, 64) and dw.dtype == np.int8 and dm.shape == (96, 0) and flag == -1
    exact = down.to_float32()
    np.testing.assert_allclose(scale, np.abs(exact).max(axis=1))
    back = dw.reshape(96, 2, 32) * dd.view(np.float16).astype(np.float32)[:, :, None]
    np.testing.assert_allclose(back.reshape(96, 64) * scale, exact.T, atol=0.02)
    with pytest.raises(ConfigError, match="down_format"):
        transpose_down(down, "q8")


def test_read_plan_json(models, tmp_path):
    llm = engine.load(str(models["llama"]), threads=2)
    m = llm.model
    save_predictors(tmp_path / "p.npz", _predictors(m, 0.0), m.config.hidden_size, m.config.intermediate_size)
    plan = {"decode": {"predictors": "p.npz", "cluster_size": 4,
                       "layers": [{"mode": "predicted", "threshold": 2.5}, {"mode": "dense"}]}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    modes, preds, cluster = read_plan(tmp_path / "plan.json", m.config)
    assert modes == ["predicted", "dense"] and cluster == 4 and preds[0].threshold == 2.5
    # `pocketinfer plan`'s own words: "sparse" layers, the predictors named in files
    planner = {"decode": {"layers": [{"mode": "dense"}, {"mode": "sparse"}]}, "files": {"predictors": "p.npz"}}
    (tmp_path / "deploy.json").write_text(json.dumps(planner))
    modes, preds, cluster = read_plan(tmp_path / "deploy.json", m.config)
    assert modes == ["dense", "predicted"] and cluster == 1 and sorted(preds) == [0, 1]
    plan["decode"]["layers"][1]["mode"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    with pytest.raises(ModelFormatError, match=r"decode.layers\[1\].mode"):
        read_plan(tmp_path / "bad.json", m.config)
    with pytest.raises(FileNotFoundError):
        read_plan(tmp_path / "missing.json", m.config)


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(ROOT))


def test_eval_sparsity_cli(models, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"w{(i * 37) % 120 + 3}" for i in range(200)))
    r = cli("eval-sparsity", "-m", str(models["bamboo-drelu"]), "-f", str(text), "--ctx", "32", "--windows", "2",
            "-n", "6", "--json", "-t", "2")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["layers"]) == 2 and all(lr["mode"] == "relu-exact" for lr in out["layers"])
    assert 0.2 < out["sparsity"] < 0.8 and out["recall"] == 1.0
    assert abs(out["ppl_change"]) < 1e-3 and out["greedy_agreement"] == 1.0 and out["greedy_prefix"] == 6
    assert out["scored_tokens"] == 62 and out["decode_tps"] > 0 and out["dense_decode_tps"] > 0
    r = cli("eval-sparsity", "-m", str(models["llama"]), "-f", str(text), "--ctx", "32", "--mode", "oracle",
            "--oracle-sparsity", "0.5", "--calib", str(text), "-n", "4")
    assert r.returncode == 0, r.stderr
    assert "overall: sparsity" in r.stdout and "perplexity" in r.stdout


def test_eval_sparsity_bad_input(models, tmp_path):
    r = cli("eval-sparsity", "-m", str(models["llama"]), "--mode", "relu-exact", "-n", "4")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "relu-exact needs a ReLU" in r.stderr
    r = cli("eval-sparsity", "-m", str(models["llama"]), "--plan", str(tmp_path / "nope.npz"))
    assert r.returncode == 1 and "nope.npz: no such plan" in r.stderr and r.stderr.strip().count("\n") == 0


def test_neuron_records(tmp_path):
    """Neuron records (engine/executors/sparse.py) change addresses only: "off", "copy" and "move" give the same
    logits, for relu-exact (records without gate) and predicted layers (with it). "move" hands the
    layers' gate and up over to the records, frees the stacked gate|up the one-call decode read, and
    the model still prefills, and decodes dense once the executor is detached. Q4_0 only: every
    compiled form of the sparse kernel costs the cold suite ~15 s, and tests/test_sparse_ffn.py checks
    the Q8_0 layout's records bit for bit."""
    hf = tmp_path / "hf"
    make_hf_model("llama-relu", hf, num_hidden_layers=3)
    llm = engine.load(str(hf_to_gguf(hf, tmp_path / "m.gguf", "Q4_0", VOCAB)), threads=2)
    m = llm.model
    m.config = dataclasses.replace(m.config, hidden_act="relu")   # GGUF's llama loads as SiLU
    assert m._stacked is not None                                  # Q4/I8 everywhere: one-call decode
    modes = ["relu-exact", "predicted", "dense"]
    preds = _predictors(m, 0.0)
    stack = m.weights.layers[0].w_gate_up._arrays()[0].base        # (layers, 2 ffn, .) one array
    assert stack is not None and stack.shape[0] == 3
    m.sparse = None
    cache = m.new_cache(len(PROMPT))
    prefill = m.forward(np.array(PROMPT), cache, all_logits=True)
    saved = m._stacked, m._fused_decode
    m._stacked, m._fused_decode = None, False                      # the unfused dense path, what "move" leaves
    dense = decode_logits(m)
    m._stacked, m._fused_decode = saved
    out, extra = {}, {}
    for records in ("off", "copy", "move"):
        attach(m, modes, predictors=preds, records=records)
        out[records] = decode_logits(m)
        assert all(st.tokens == len(STEPS) for st, mode in zip(m.sparse.stats, modes) if mode != "dense")
        extra[records] = m.sparse.extra_bytes
    assert np.array_equal(out["copy"], out["off"]) and np.array_equal(out["move"], out["off"])
    # what the executor adds to the model: downT either way (records pad to cache lines); "copy" counts
    # what "move" would cost, not its convenience copy of gate and up
    assert extra["copy"] == extra["move"] >= extra["off"]
    lw = m.weights.layers
    assert lw[0].w_gate_up is None and lw[1].w_gate_up is None and lw[2].w_gate_up is not None
    assert np.shares_memory(lw[1].w_gate._arrays()[0], m.sparse.layers[1].records)      # predicted: gate moved
    assert not np.shares_memory(lw[0].w_gate._arrays()[0], m.sparse.layers[0].records)  # relu-exact: its own
    assert np.shares_memory(lw[0].w_up._arrays()[0], m.sparse.layers[0].records)
    # nothing refers to the stacked gate|up any more (the dense layer got its own copy)
    assert m._stacked is None and not any(np.shares_memory(a, stack) for layer in lw
                                          for w in (layer.w_gate, layer.w_up) for a in w._arrays())
    m.sparse = None
    cache = m.new_cache(len(PROMPT))
    assert max_rel(m.forward(np.array(PROMPT), cache, all_logits=True), prefill) < 1e-5   # prefill on records
    assert max_rel(decode_logits(m), dense) < 1e-6


def test_decode_plan_defaults(models):
    from engine.executors.sparse import decode_plan

    llm = engine.load(str(models["llama-relu"]), threads=2, sparse=False)
    assert llm.model.sparse is None                       # the default would attach relu-exact
    modes, preds, cluster = decode_plan(None, llm.config)
    assert modes == ["relu-exact"] * llm.config.num_hidden_layers and preds == {} and cluster == 1
