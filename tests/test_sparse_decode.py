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
from model_factory import hf_to_gguf, make_hf_model

import engine
from engine.errors import ConfigError, ModelFormatError
from engine.executors.choose import layer_by_layer
from engine.executors.dense import DenseFFN
from engine.executors.one_region import OneRegionDecode
from engine.executors.plan import Plan, default_plan, read_plan
from engine.executors.predictor import LayerPredictor, save_predictors
from engine.executors.sparse import LayerStats, SparseFFN, decode_ffns
from engine.measure.sparsity import oracle_thresholds
from engine.model.layout import quantize_i8, quantize_q4, transpose_down
from engine.model.transformer import build
from engine.model.weights import F32Weight, Q4Weight

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


def dense_ffns(m):
    return [DenseFFN(lw, m.config.act_kind) for lw in m.weights.layers]


def sparse_run(m, modes, **kw):
    """Decode executors beside the model's own (records copied unless `records` says otherwise): the
    FFN executors, and executors that decode with them and prefill dense, both for the model's config
    as it is now (tests give a GGUF model back its ReLU)."""
    ffns = decode_ffns(m.config, m.weights.layers, modes, **{"records": "copy", **kw})
    return ffns, layer_by_layer(m, ffns, dense_ffns(m))


def dense_run(m):
    """Dense FFNs run layer by layer in both phases: the path sparse layers ride on."""
    return layer_by_layer(m, dense_ffns(m), dense_ffns(m))


@pytest.mark.parametrize("name", ["llama-relu", "bamboo-drelu"])
def test_relu_exact_equals_dense(models, name):
    llm = engine.load(str(models[name]), threads=2)
    m = llm.model
    ffns = m.executors.decode.ffns
    assert {f.mode for f in ffns} == {"relu-exact"}                 # the default
    assert "FFN sparse (relu-exact, clusters of 1)" in llm.describe()
    for f in ffns:
        f.stats = LayerStats()                                      # load's warm-up decoded a token
    sparse = decode_logits(m)
    f = m.config.intermediate_size
    realized = [ex.stats.sparsity(f) for ex in ffns]
    assert all(ex.stats.tokens == len(STEPS) for ex in ffns)
    assert all(0.2 < s < 0.8 for s in realized), realized      # random weights: about half the gates are <= 0
    with m.running(dense_run(m)):
        dense = decode_logits(m)
    assert max_rel(sparse, dense) < 1e-4


def test_swiglu_defaults_to_dense(models):
    llm = engine.load(str(models["llama"]), threads=2)
    assert all(isinstance(f, DenseFFN) for f in llm.model.executors.decode.ffns)
    assert "SparseFFN" not in repr(llm.model.executors.decode.ffns) and "sparse" not in llm.describe()
    with pytest.raises(ConfigError, match="relu-exact needs a ReLU"):
        sparse_run(llm.model, ["relu-exact"] * llm.config.num_hidden_layers)


def _dequantized(m):
    """The same model with every matrix expanded to F32: the exact math of the stored weights."""
    w = m.weights
    mats = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    layers = [dataclasses.replace(lw, wqkv=None, w_gate_up=None,
                                  **{n: F32Weight(getattr(lw, n).to_float32()) for n in mats}) for lw in w.layers]
    emb = F32Weight(w.embed.to_float32())
    head = emb if w.lm_head is w.embed else F32Weight(w.lm_head.to_float32())
    dense = Plan(decode=("dense",) * m.config.num_hidden_layers)
    return build(m.config, dataclasses.replace(w, layers=layers, embed=emb, lm_head=head), dense, m.kv_dtype)


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
    # Dense FFNs layer by layer: the kernels the sparse layers share (gate matvec, row products).
    with m.running(dense_run(m)):
        dense_err = max_rel(decode_logits(m), ref)
    out = {}
    for fmt in ("f32", "i8", "q4"):
        with m.running(sparse_run(m, default_plan(m.config).decode, down_format=fmt)[1]):
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
    llm = engine.load(str(models[name]), threads=2, sparse=False)
    m = llm.model
    L = m.config.num_hidden_layers
    dense = decode_logits(m)
    # predicting every neuron active is the dense FFN
    with m.running(sparse_run(m, ["predicted"] * L, predictors=_predictors(m, -1e30))[1]):
        assert max_rel(decode_logits(m), dense) < 1e-4
    # a real threshold: some neurons skipped, output differs but stays finite; clusters widen the set
    path = tmp_path / "predictors.npz"
    save_predictors(path, _predictors(m, 0.0), m.config.hidden_size, m.config.intermediate_size)
    plan = read_plan(path, m.config)
    assert plan.decode == ("predicted",) * L and plan.cluster == 1
    chosen = {}
    for c in (1, 8):
        ffns, run = sparse_run(m, plan.decode, predictors=plan.predictors, cluster=c)
        for f in ffns:
            f.track_truth = True
        with m.running(run):
            out = decode_logits(m)
        assert np.isfinite(out).all() and max_rel(out, dense) > 1e-4
        chosen[c] = sum(f.stats.chosen for f in ffns)
        assert all(0 < f.stats.hits <= min(f.stats.chosen, f.stats.true_active) for f in ffns)
    assert chosen[8] > chosen[1]


def test_oracle_mode(models):
    llm = engine.load(str(models["llama"]), threads=2)
    m = llm.model
    L, f = m.config.num_hidden_layers, m.config.intermediate_size
    dense = decode_logits(m)
    calib = list(range(3, 67))
    with m.running(sparse_run(m, ["oracle"] * L, oracle_thresholds=oracle_thresholds(m, calib, 0.0))[1]):
        assert max_rel(decode_logits(m), dense) < 1e-4
    ffns, run = sparse_run(m, ["oracle"] * L, oracle_thresholds=oracle_thresholds(m, calib, 0.5))
    for ex in ffns:
        ex.track_truth = True
    with m.running(run):
        out = decode_logits(m)
    for st in (ex.stats for ex in ffns):
        assert 0.2 < st.sparsity(f) < 0.8 and st.hits == st.chosen == st.true_active   # exact by construction
    assert max_rel(out, dense) > 1e-4
    with pytest.raises(ConfigError, match="oracle needs a threshold"):
        sparse_run(m, ["oracle"] * L)


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
    doc = {"decode": {"predictors": "p.npz", "cluster_size": 4,
                      "layers": [{"mode": "predicted", "threshold": 2.5}, {"mode": "dense"}]}}
    (tmp_path / "plan.json").write_text(json.dumps(doc))
    plan = read_plan(tmp_path / "plan.json", m.config)
    assert plan.decode == ("predicted", "dense") and plan.cluster == 4 and plan.predictors[0].threshold == 2.5
    # `pocketinfer plan`'s own words: "sparse" layers, the predictors named in files
    planner = {"decode": {"layers": [{"mode": "dense"}, {"mode": "sparse"}]}, "files": {"predictors": "p.npz"}}
    (tmp_path / "deploy.json").write_text(json.dumps(planner))
    plan = read_plan(tmp_path / "deploy.json", m.config)
    assert plan.decode == ("dense", "predicted") and plan.cluster == 1 and sorted(plan.predictors) == [0, 1]
    doc["decode"]["layers"][1]["mode"] = "fast"
    (tmp_path / "bad.json").write_text(json.dumps(doc))
    with pytest.raises(ModelFormatError, match=r"decode.layers\[1\].mode"):
        read_plan(tmp_path / "bad.json", m.config)
    with pytest.raises(FileNotFoundError):
        read_plan(tmp_path / "missing.json", m.config)


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(ROOT))


@pytest.mark.slow
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


@pytest.mark.slow
def test_eval_sparsity_bad_input(models, tmp_path):
    r = cli("eval-sparsity", "-m", str(models["llama"]), "--mode", "relu-exact", "-n", "4")
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and "relu-exact needs a ReLU" in r.stderr
    r = cli("eval-sparsity", "-m", str(models["llama"]), "--plan", str(tmp_path / "nope.npz"))
    assert r.returncode == 1 and "nope.npz: no such plan" in r.stderr and r.stderr.strip().count("\n") == 0


def test_neuron_records(tmp_path):
    """Neuron records (engine/model/layout.sparse_arrays) change addresses only: "off", "copy" and "move"
    give the same logits, for relu-exact (records without gate) and predicted layers (with it). "move",
    what a load with sparse layers does, hands the layers' gate and up over to the records, and the
    model still prefills, and decodes dense. Q4_0 only: every compiled form of the sparse kernel costs
    the cold suite ~15 s, and tests/test_sparse_ffn.py checks the Q8_0 layout's records bit for bit."""
    from engine.formats.gguf_file import GGUFFile
    from engine.formats.gguf_loader import load_weights

    hf = tmp_path / "hf"
    make_hf_model("llama-relu", hf, num_hidden_layers=3)
    gguf = hf_to_gguf(hf, tmp_path / "m.gguf", "Q4_0", VOCAB)
    llm = engine.load(str(gguf), threads=2)
    m = llm.model
    m.config = dataclasses.replace(m.config, hidden_act="relu")   # GGUF's llama loads as SiLU
    assert isinstance(m.executors.decode, OneRegionDecode)          # Q4/I8 everywhere, dense: one region
    modes = ["relu-exact", "predicted", "dense"]
    preds = _predictors(m, 0.0)
    with m.running(dense_run(m)):
        prefill = m.forward(np.array(PROMPT), m.new_cache(len(PROMPT)), all_logits=True)
        dense = decode_logits(m)
    out, extra = {}, {}
    for records in ("off", "copy"):
        ffns, run = sparse_run(m, modes, predictors=preds, records=records)
        with m.running(run):
            out[records] = decode_logits(m)
        assert all(f.stats.tokens == len(STEPS) for f, mode in zip(ffns, modes) if mode != "dense")
        extra[records] = sum(f.extra_bytes for f in ffns if isinstance(f, SparseFFN))
    # "move": the model built for a plan with these modes, as engine.load builds it
    moved = build(m.config, load_weights(GGUFFile(gguf), m.config),      # prefill through f32, as sparse_run's
                  Plan(decode=tuple(modes), predictors=preds, prefill="f32"), m.kv_dtype)
    ffns = moved.executors.decode.ffns
    out["move"] = decode_logits(moved)
    extra["move"] = sum(f.extra_bytes for f in ffns if isinstance(f, SparseFFN))
    assert np.array_equal(out["copy"], out["off"]) and np.array_equal(out["move"], out["off"])
    # what the executor adds to the model: downT either way (records pad to cache lines); "copy" counts
    # what "move" would cost, not its convenience copy of gate and up
    assert extra["copy"] == extra["move"] >= extra["off"]
    lw = moved.weights.layers
    assert lw[0].w_gate_up is None and lw[1].w_gate_up is None and lw[2].w_gate_up is not None
    assert np.shares_memory(lw[1].w_gate._arrays()[0], ffns[1].arrays.records)      # predicted: gate moved
    assert not np.shares_memory(lw[0].w_gate._arrays()[0], ffns[0].arrays.records)  # relu-exact: its own
    assert np.shares_memory(lw[0].w_up._arrays()[0], ffns[0].arrays.records)
    # sparse layers: no layer stack was built (it would have held a second copy of gate|up)
    assert lw[2].w_gate_up._arrays()[0].base is None and lw[0].wqkv._arrays()[0].base is None
    cache = moved.new_cache(len(PROMPT))
    assert max_rel(moved.forward(np.array(PROMPT), cache, all_logits=True), prefill) < 1e-5   # prefill on records
    with moved.running(dense_run(moved)):
        assert max_rel(decode_logits(moved), dense) < 1e-6


def test_default_plan(models):
    llm = engine.load(str(models["llama-relu"]), threads=2, sparse=False)
    assert all(isinstance(f, DenseFFN) for f in llm.model.executors.decode.ffns)   # the default: relu-exact
    plan = default_plan(llm.config)
    assert plan.decode == ("relu-exact",) * llm.config.num_hidden_layers and plan.predictors == {}
    assert plan.cluster == 1 and plan.flash is None and not plan.head_on_flash
