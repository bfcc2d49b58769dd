"""Input sparsity (engine/executors/input_sparse.py) and its planner (planner/input_sparsity.py) on a
random-weight checkpoint made in the test: zero thresholds are the dense path, the masks equal the same
thresholds applied in transformers by input hooks, a suffix from saved residuals equals the full pass, and
bad budgets and short calibration texts fail with PlanError."""

from __future__ import annotations

import numpy as np
import pytest
from model_factory import make_hf_model, torch_logits

pytest.importorskip("torch", reason="the test models are made with the [test] extra (torch, transformers)")

import engine  # noqa: E402
from engine.errors import PlanError  # noqa: E402
from engine.executors.choose import layer_by_layer  # noqa: E402
from engine.executors.dense import DenseFFN  # noqa: E402
from engine.executors.input_sparse import GROUPS, InputMask  # noqa: E402
from engine.measure.input_sparsity import (log_softmax, masked, residuals, suffix_nll, token_kl,  # noqa: E402
                                           window_logits, window_nll)
from planner import input_sparsity as plan  # noqa: E402

IDS = np.array([1, 17, 93, 5, 64, 33, 120, 7, 45, 88, 3, 99, 14, 51, 76, 20, 8, 111, 42, 60])
TOL = 1e-4
# (layer, group) -> threshold on |input|; the head's separately. Chosen to zero roughly a third to a half
# of each input of this model.
THRESHOLDS = np.array([[0.5, 0.3, 0.6, 0.05], [0.8, 0.4, 0.3, 0.1]])
HEAD = 0.7


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    return make_hf_model("llama", d), engine.load(str(d), threads=2)


def dense_logits(model, ids=IDS):
    ffns = [DenseFFN(lw, model.config.act_kind) for lw in model.weights.layers]
    with model.running(layer_by_layer(model, ffns, ffns)):
        return model.forward(ids, model.new_cache(len(ids)))


def masked_logits(model, mask, ids=IDS):
    with masked(model, mask):
        return model.forward(ids, model.new_cache(len(ids)))


def test_zero_thresholds_are_dense(pair):
    _, llm = pair
    m = llm.model
    want = dense_logits(m)
    mask = InputMask(m.weights.layers, np.zeros((2, 4)))
    got = masked_logits(m, mask)
    assert np.abs(got - want).max() < TOL
    assert not mask.zeroed.any() and mask.seen.all()
    assert m.weights.lm_head is not None and type(m.weights.lm_head).__name__ != "MaskedHead", "head restored"


def torch_masked_logits(ref, thresholds, head, ids=IDS):
    """transformers' logits with every linear layer's input masked by a forward pre-hook: the plain reference."""
    import torch

    def hook(thr):
        return lambda module, args: (torch.where(args[0].abs() >= thr, args[0], torch.zeros_like(args[0])),)

    names = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
             "down": ("down_proj",)}
    handles = []
    for i, layer in enumerate(ref.model.layers):
        for g, group in enumerate(GROUPS):
            for name in names[group]:
                parent = layer.self_attn if group in ("qkv", "o") else layer.mlp
                handles.append(getattr(parent, name).register_forward_pre_hook(hook(float(thresholds[i, g]))))
    handles.append(ref.lm_head.register_forward_pre_hook(hook(head)))
    try:
        return torch_logits(ref, ids)
    finally:
        for h in handles:
            h.remove()


def test_masks_equal_the_plain_reference(pair):
    ref, llm = pair
    m = llm.model
    mask = InputMask(m.weights.layers, THRESHOLDS, HEAD)
    got = masked_logits(m, mask)
    want = torch_masked_logits(ref, THRESHOLDS, HEAD)
    assert np.abs(got - want).max() < TOL
    assert np.abs(got - dense_logits(m)).max() > 0.1, "the thresholds must change the logits"
    s = mask.sparsity()
    assert ((s > 0.1) & (s < 0.9)).all(), s


def test_suffix_from_residuals_equals_full_pass(pair):
    _, llm = pair
    m = llm.model
    res = residuals(m, IDS)
    for layer, group in ((0, 2), (1, 0), (1, 3)):
        thr = np.zeros((2, 4))
        thr[layer, group] = THRESHOLDS[layer, group]
        full = window_nll(m, [IDS], InputMask(m.weights.layers, thr))
        assert np.abs(suffix_nll(m, IDS, res[layer], layer, InputMask(m.weights.layers, thr)) - full).max() < 1e-9
    head = window_nll(m, [IDS], InputMask(m.weights.layers, np.zeros((2, 4)), HEAD))
    suffix = suffix_nll(m, IDS, res[2], 2, InputMask(m.weights.layers, np.zeros((2, 4)), HEAD))
    assert np.abs(suffix - head).max() < 1e-9


def test_kl_is_zero_for_dense_and_positive_when_masked(pair):
    _, llm = pair
    m = llm.model
    dense = log_softmax(dense_logits(m))
    assert np.abs(token_kl(dense, dense_logits(m))).max() < 1e-6
    kl = token_kl(dense, masked_logits(m, InputMask(m.weights.layers, THRESHOLDS, HEAD)))
    assert kl.shape == (len(IDS) - 1,) and (kl > 0).all()


def calibration_text(n_words=300, seed=0):
    rng = np.random.default_rng(seed)
    return " ".join(f"w{i}" for i in rng.integers(3, 128, n_words))


@pytest.fixture(scope="module")
def calibrated(pair):
    _, llm = pair
    return plan.calibrate(llm, calibration_text())


def test_bad_budgets_fail(pair, calibrated):
    _, llm = pair
    for bad in (-0.01, 1.5, float("nan"), float("inf")):
        with pytest.raises(PlanError, match="budget"):
            plan.allocate(llm, calibrated, bad)
        with pytest.raises(PlanError, match="budget"):
            plan.plan(llm, calibration_text(), bad)


def test_short_calibration_text_fails(pair):
    _, llm = pair
    with pytest.raises(PlanError, match="calibration text has 50 tokens; give at least"):
        plan.calibrate(llm, calibration_text(50))


def test_tiny_budget_is_dense(pair, calibrated):
    _, llm = pair
    a = plan.allocate(llm, calibrated, 0.0)
    assert a.rationale[0] == "dense: budget too small for any sparsity"
    assert not a.thresholds.any() and a.head_threshold == 0.0
    assert a.bytes_per_token == a.dense_bytes_per_token


def test_allocation_keeps_its_budget(pair, calibrated):
    _, llm = pair
    m = llm.model
    a = plan.allocate(llm, calibrated, 0.10)
    assert a.sparsity.shape == a.thresholds.shape == (2, len(GROUPS))
    assert a.sparsity.any() and a.bytes_per_token < a.dense_bytes_per_token
    assert a.measured_ppl_change <= 0.10
    # the budgeted change is the mask's KL from dense on the calibration's held-out split, beside its NLL change
    lg = window_logits(m, calibrated.windows, a.mask(m.weights.layers))
    kl = np.concatenate([token_kl(lp, g) for lp, g in zip(calibrated.dense_logp, lg)]).mean()
    assert abs(np.expm1(kl) - a.measured_ppl_change) < 1e-9
    nll = window_nll(m, calibrated.windows, a.mask(m.weights.layers)).mean()
    assert abs(np.expm1(nll - calibrated.dense_nll) - a.split_ppl_change) < 1e-9
    assert ((a.thresholds > 0) == (a.sparsity > 0)).all()
