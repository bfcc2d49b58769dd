"""`pocketinfer prune` (planner/prune.py) end to end: a pruned float32 checkpoint's logits against the
reference model with the same zeros, a 4-bit GGUF's matrices in the S4 layout through the one-region
decode, the quality budget, deterministic output, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.errors import ModelFormatError, PlanError
from engine.formats.pruned import FILE
from engine.loader import load
from engine.model.weights import S24Weight
from planner.pipeline import make_deploy
from planner.prune import PruneSpec

pytestmark = pytest.mark.slow
PROFILE = "snapdragon-8gen3-ufs4"
FIELDS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}
OURS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo", "gate_proj": "w_gate", "up_proj": "w_up",
        "down_proj": "w_down"}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A random Llama checkpoint whose matrices all have columns in blocks of 64, its torch model and a
    calibration text of its word tokens."""
    from model_factory import make_hf_model

    d = tmp_path_factory.mktemp("prune")
    src = d / "src"
    ref = make_hf_model("llama", src, seed=0, intermediate_size=128)
    cal = d / "cal.txt"
    cal.write_text(" ".join(f"w{i}" for i in np.random.default_rng(0).integers(3, 128, 900)))
    return src, ref, cal


def _deploy(source, out, **spec):
    src, _, cal = source
    return make_deploy(src, "100%", out, device_profile=PROFILE, calibration=cal, threads=1, prune=PruneSpec(**spec))


def test_f32_deploy_equals_the_reference_with_the_same_zeros(source, tmp_path):
    """Every group pruned (wanda): the deploy keeps float32 matrices with exactly two zeros in each four,
    and its prefill logits and cached decode steps equal the torch model's with those zeros within 1e-4."""
    import torch
    from model_factory import torch_cached_steps, torch_logits

    _, ref, _ = source
    res = _deploy(source, tmp_path / "d")
    sec = res.plan["sparsity"]
    assert sec["pruned_units"] == sec["total_units"] == 8 and all(m["form"] == "f32" for m in sec["matrices"])
    with np.load(res.path / FILE) as z:
        arrays = {k: z[k] for k in z.files}
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            for group, names in FIELDS.items():
                for name in names:
                    mod = (layer.self_attn if group in ("qkv", "o") else layer.mlp)
                    w = arrays[f"layers.{i}.{OURS[name]}.w"]
                    dense = getattr(mod, name).weight.numpy()
                    zeros = (w == 0).reshape(w.shape[0], -1, 4).sum(axis=2)
                    assert np.all(zeros >= 2)
                    np.testing.assert_array_equal(w[w != 0], dense[w != 0])
                    getattr(mod, name).weight.copy_(torch.from_numpy(w))
    llm = load(res.path, threads=1, prefill="f32")
    ids = np.array([1, 5, 9, 17, 33, 65, 100, 7, 3, 44], np.int64)
    got = llm.model.forward(ids, llm.model.new_cache(len(ids)), all_logits=True)
    want = torch_logits(ref, ids)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    prompt, steps = [1, 5, 9], [17, 33, 65, 100]
    cache = llm.model.new_cache(len(prompt) + len(steps))
    llm.model.forward(np.array(prompt), cache)
    want_steps = torch_cached_steps(ref, prompt, steps)
    for t, tok in enumerate(steps):
        lg = llm.model.forward(np.array([tok]), cache)[-1]
        np.testing.assert_allclose(lg, want_steps[t], rtol=1e-4, atol=1e-4 * np.abs(want_steps[t]).max())


def test_same_inputs_same_bytes(source, tmp_path):
    a = _deploy(source, tmp_path / "a", method="magnitude", values="int8")
    b = _deploy(source, tmp_path / "b", method="magnitude", values="int8")
    assert (a.path / FILE).read_bytes() == (b.path / FILE).read_bytes()
    assert json.dumps(a.plan["sparsity"], sort_keys=True) == json.dumps(b.plan["sparsity"], sort_keys=True)


def test_q4_gguf_runs_s4_in_the_one_region_decode(stories_dir, tmp_path):
    """From a Q4_0 GGUF every pruned group is S4, the one-region decode runs them, and its decode logits
    match the prefill's (f32 tiles of the same values) as closely as the int8 rounding of x allows. The
    random model takes stories260K's vocabulary, so that English calibration text tokenizes."""
    from model_factory import hf_to_gguf, make_hf_model
    from test_stories260k import _vocab_meta

    src = tmp_path / "src"
    make_hf_model("llama", src, seed=2, intermediate_size=128, vocab_size=512)
    gguf = tmp_path / "m.gguf"
    hf_to_gguf(src, gguf, qtype="Q4_0", vocab_meta=_vocab_meta(stories_dir))
    cal = tmp_path / "cal.txt"
    cal.write_text("Once upon a time, there was a little dog who liked to play in the park with his friends. " * 30)
    res = make_deploy(gguf, "100%", tmp_path / "d", device_profile=PROFILE, calibration=cal, threads=1,
                      prune=PruneSpec(method="wanda"))
    assert {m["form"] for m in res.plan["sparsity"]["matrices"]} == {"s4"}
    llm = load(res.path, threads=1, prefill="f32")
    assert isinstance(llm.model.weights.layers[0].w_gate_up, S24Weight)
    assert "one parallel region per token" in llm.describe()
    ids = [1, 5, 9, 17, 33, 65]
    full = llm.model.forward(np.array(ids), llm.model.new_cache(len(ids)), all_logits=True)
    cache = llm.model.new_cache(len(ids))
    llm.model.forward(np.array(ids[:1]), cache)
    for t in range(1, len(ids)):
        step = llm.model.forward(np.array(ids[t:t + 1]), cache)[-1]
        assert np.abs(step - full[t]).max() <= 0.03 * np.abs(full[t]).max()


def test_quality_budget_prunes_within_it(source, tmp_path):
    """With a budget the chosen groups' joint KL on the held-out split is within it, and a 0% budget
    prunes nothing (the deploy then loads as the dense model)."""
    res = _deploy(source, tmp_path / "d", quality_budget=0.05)
    sec = res.plan["sparsity"]
    assert 0 <= sec["pruned_units"] <= sec["total_units"]
    assert sec["measured_ppl_change"] <= 0.05 + 1e-9
    none = _deploy(source, tmp_path / "z", quality_budget=0.0)
    assert none.plan["sparsity"]["pruned_units"] == 0
    llm = load(none.path, threads=1)
    assert llm.model.weights.layers[0].w_gate is not None and not isinstance(llm.model.weights.layers[0].w_gate, S24Weight)


@pytest.mark.parametrize("spec, match", [
    (dict(pattern="3:4"), "only 2:4"),
    (dict(method="sparsegpt"), "--method"),
    (dict(values="int2"), "--values"),
    (dict(quality_budget=5.0), "more than double"),
])
def test_bad_spec(source, tmp_path, spec, match):
    with pytest.raises(PlanError, match=match):
        _deploy(source, tmp_path / "d", **spec)
    assert not (tmp_path / "d").exists()


def test_bad_calibration_and_columns(source, tmp_path):
    from model_factory import make_hf_model

    src, _, cal = source
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(PlanError, match="empty"):
        make_deploy(src, "100%", tmp_path / "d", device_profile=PROFILE, calibration=empty, prune=PruneSpec())
    odd = tmp_path / "odd"
    make_hf_model("llama", odd, seed=1)                  # intermediate 96: down has 96 columns
    with pytest.raises(PlanError, match="w_down: 96 columns"):
        make_deploy(odd, "100%", tmp_path / "d", device_profile=PROFILE, calibration=cal, prune=PruneSpec())
    assert not (tmp_path / "d").exists()


def test_cli_reports_one_line(source, tmp_path, capsys):
    from engine.cli import main

    src, _, cal = source
    assert main(["prune", str(src), "--pattern", "3:4", "-o", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only 2:4" in err[0]


def test_bad_sparsity_section(source, tmp_path):
    """A plan whose sparsity section names a bad group or another byte layout, or a deploy missing its
    file, fails at load with a message naming the field or the file."""
    res = _deploy(source, tmp_path / "d", method="magnitude")
    plan = json.loads((res.path / "plan.json").read_text())
    plan["sparsity"]["layout"] = 1
    (res.path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ModelFormatError, match=r"sparsity.layout is 1: .* re-run `pocketinfer prune`"):
        load(res.path, threads=1)
    plan["sparsity"]["layout"] = 2
    plan["sparsity"]["matrices"][0]["group"] = "ffn"
    (res.path / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ModelFormatError, match=r"sparsity.matrices\[0\]"):
        load(res.path, threads=1)
    plan["sparsity"]["matrices"][0]["group"] = "qkv"
    (res.path / "plan.json").write_text(json.dumps(plan))
    (res.path / FILE).unlink()
    with pytest.raises(ModelFormatError, match="pruned matrices are missing"):
        load(res.path, threads=1)


def test_eval_prune_reports_against_dense(source, tmp_path, capsys):
    """eval-prune on a pruned deploy: perplexity, bytes and speed beside the dense weights; a deploy with
    nothing pruned is refused in one line."""
    from engine.cli import main

    src, _, cal = source
    res = _deploy(source, tmp_path / "d", method="magnitude", values="int8")
    cal_text = tmp_path / "text.txt"
    cal_text.write_text(cal.read_text())
    assert main(["eval-prune", "-m", str(res.path), "-f", str(cal_text), "-c", "64", "--windows", "2",
                 "-n", "4", "--rounds", "2", "-t", "1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["pruned_groups"] == r["total_groups"] == 8 and r["rounds"] == 2
    assert r["bytes_per_token"] < r["dense_bytes_per_token"] and r["decode_tps"] > 0 and r["dense_ppl"] > 0
    plain = _deploy(source, tmp_path / "z", quality_budget=0.0)
    assert main(["eval-prune", "-m", str(plain.path)]) == 1
    assert "no 2:4-pruned matrices" in capsys.readouterr().err


@pytest.mark.parametrize("values", ["int8", "4bit"])
def test_onnx_prefill_runs_pruned_matrices(source, tmp_path, values):
    """The ONNX Runtime prefill maps S8 and S4 weights (dense 8-bit values, zeros where pruned) and gives
    the f32 prefill's logits."""
    pytest.importorskip("onnxruntime")
    res = _deploy(source, tmp_path / "d", method="magnitude", values=values)
    ids = np.arange(3, 40)
    out = {}
    for name in ("onnx", "f32"):
        llm = load(res.path, threads=1, prefill=name)
        if name == "onnx":
            assert "ONNX Runtime session" in llm.describe() and "not used" not in llm.describe()
        out[name] = llm.model.forward(ids, llm.model.new_cache(64))
    a, b = out["onnx"], out["f32"]
    assert np.abs(a - b).max() <= 1e-3 * (b.max() - b.min())
