"""Input-sparse decode (engine/executors/input_sparse_decode.py) on a random-weight Q4_1 GGUF made in the
test: near-zero thresholds give the dense decode's logits, thresholds give what the dense kernels give on
the same masked inputs, plan.json's thresholds are checked, and bad quality budgets fail."""

from __future__ import annotations

import json

import numpy as np
import pytest
from model_factory import hf_to_gguf, make_hf_model

pytest.importorskip("torch", reason="the test models are made with the [test] extra (torch, transformers)")

import engine  # noqa: E402
from engine.errors import ModelFormatError, PlanError  # noqa: E402
from engine.executors.choose import choose  # noqa: E402
from engine.executors.input_sparse_decode import InputSparseDecode  # noqa: E402
from engine.executors.plan import Plan, read_plan  # noqa: E402
from engine.model.weights import Q4CWeight  # noqa: E402
from planner.budget import parse_quality_budget  # noqa: E402
from planner.input_sparsity import check_budget  # noqa: E402

PROMPT = [1, 17, 93, 5, 64, 33]
STEPS = 16
TOL = 1e-4
# (layer, group) thresholds on |input| (qkv, o, gate_up, down), zeroing about a third to a half of each
THRESHOLDS = ((0.5, 0.3, 0.6, 0.05), (0.8, 0.4, 0.3, 0.1))


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    make_hf_model("llama", d)
    return hf_to_gguf(d, d / "model.q4_1.gguf", "Q4_1")


def decode_logits(model, steps=STEPS) -> np.ndarray:
    """(len(PROMPT) + steps, vocab) f32: the logits of single-token decode steps over the prompt, then over
    `steps` more tokens (teacher-forced), so that every step is decode (prefill runs another engine)."""
    ids = PROMPT + [(7 * t + 3) % model.config.vocab_size for t in range(steps)]
    cache = model.new_cache(len(ids))
    return np.stack([model.forward(np.array([i]), cache, all_logits=False)[0] for i in ids])


def with_inputs(path, thresholds, convert=True):
    """A fresh load of the model, decoding input-sparse with `thresholds` (the weights in Q4C where
    convert, else every input masked in front of the dense kernels)."""
    llm = engine.load(str(path), threads=2)
    m = llm.model
    n = m.config.num_hidden_layers
    if convert:
        m.executors = choose(m.config, m.weights, Plan(decode=("dense",) * n, input_thresholds=thresholds))
    else:
        m.executors.decode = InputSparseDecode(m.config, m.weights.layers, thresholds)
    return llm


def test_near_zero_thresholds_are_the_dense_decode(gguf_path):
    """Every group in the Q4C layout, nothing dropped but exact zeros: the dense decode's logits."""
    want = decode_logits(engine.load(str(gguf_path), threads=2).model)
    llm = with_inputs(gguf_path, ((1e-30,) * 4,) * 2)
    lw = llm.model.weights.layers[0]
    assert all(isinstance(w, Q4CWeight) for w in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down))
    assert "input-sparse" in llm.describe()
    got = decode_logits(llm.model)
    assert np.abs(got - want).max() < TOL


def test_thresholds_equal_the_dense_kernels_on_masked_inputs(gguf_path):
    """The column kernels with thresholds equal the row kernels fed the same thresholded inputs (a
    different kernel on a different layout; kernels/input_sparse.py's numpy twin is tested apart)."""
    want = decode_logits(with_inputs(gguf_path, THRESHOLDS, convert=False).model)
    dense = decode_logits(engine.load(str(gguf_path), threads=2).model)
    got = decode_logits(with_inputs(gguf_path, THRESHOLDS).model)
    assert np.abs(got - want).max() < TOL
    assert np.abs(got - dense).max() > 100 * TOL, "the thresholds change the logits"


def _plan_file(tmp_path, section, layers=2):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"decode": {"layers": [{"mode": "dense"}] * layers, "input_sparsity": section}}))
    return p


def test_plan_thresholds_are_read_and_checked(gguf_path, tmp_path):
    config = engine.load(str(gguf_path), threads=2).config
    plan = read_plan(_plan_file(tmp_path, {"thresholds": [list(r) for r in THRESHOLDS]}), config)
    assert plan.input_thresholds == THRESHOLDS
    assert read_plan(_plan_file(tmp_path, {"thresholds": [[0, 0, 0, 0]] * 2}), config).input_thresholds is None
    for bad in ([[0.1, 0.2, 0.3]] * 2, [[0.1] * 4], [[-1, 0, 0, 0]] * 2, [[float("nan"), 0, 0, 0]] * 2, "x", None):
        with pytest.raises(ModelFormatError, match="input_sparsity.thresholds"):
            read_plan(_plan_file(tmp_path, {"thresholds": bad}), config)


@pytest.mark.parametrize("text", ["2", "two%", "", "2 percent"])
def test_quality_budget_must_be_a_percentage(text):
    with pytest.raises(PlanError, match="quality budget"):
        parse_quality_budget(text)


@pytest.mark.parametrize("text", ["-1%", "150%", "nan%"])
def test_quality_budget_out_of_range(text):
    with pytest.raises(PlanError, match="quality budget"):
        check_budget(parse_quality_budget(text))


def test_quality_budget_parses():
    assert parse_quality_budget("2%") == pytest.approx(0.02)
    assert parse_quality_budget(" 0.5 % ") == pytest.approx(0.005)
