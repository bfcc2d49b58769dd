"""Cost model and solver on a synthetic model shape and the shipped phone profile (no model needed)."""

import json

import numpy as np
import pytest

from engine.errors import PlanError
from planner import device, plan_json
from planner.cost_model import CostModel, ModelShape
from planner.predictors import PredictorReport
from planner.solver import CACHE_SHARES, H_STEPS, LayerEvidence, minimum_bytes, solve

F = 1024


def shape():
    # 4096-wide rows at Q4 make 7.5 KiB neuron bundles, as in a 7B model: worth reading one by one.
    return ModelShape(n_layers=4, hidden=4096, ffn=F, vocab=1000, fmt="q4_1", attn_bytes=2_000_000, ffn_bytes=3 * F * 2560,
                      embed_bytes=5_000_000, lm_head_bytes=0, norm_bytes=9 * 1024, kv_bytes_per_token=4096,
                      attn_matrix_bytes=700_000)


def evidence(sparse_ok: bool, active: float = 0.2):
    out = []
    for i in range(4):
        hits = {}
        for k in range(H_STEPS + 1):
            hot = round(F * k / H_STEPS)
            for s in CACHE_SHARES:
                c = round(F * s)
                cold = F - hot
                hits[(hot, c)] = (min(1.0, c / cold) if cold else 1.0, active * cold)
        out.append(LayerEvidence(layer=i, sparse_ok=sparse_ok, reason="test", predicted_active=active, recall=0.99,
                                 precision=0.8, predictor_bytes=20_000, predictor_threshold=0.5, predictor_rank=16,
                                 label_sparsity=0.8, hits=hits if sparse_ok else {}))
    return out


def cost(name="snapdragon-8gen3-ufs4"):
    return CostModel(device.load_profile(device.resolve_profile(name)), shape())


def plan_text(c, sol):
    reports = [PredictorReport(i, 16, 0.99, 0.8, 0.2, 0.18, 0.2, 20_000) for i in range(4)]
    bundles = None
    if sol.budget_bytes < c.shape.weight_bytes:   # what planner/bundles.py's header says of the file it wrote
        bundles = {"file_bytes": 1 << 20, "record_bytes": 4096, "down_format": "i8",
                   "layers": [{"offset": i << 18} for i in range(4)]}
    return plan_json.dumps(plan_json.build(sol, cost=c, device=c.dev, fingerprint="f" * 64, model_name="synthetic",
                                           budget_text="x", weights_file="model.gguf", copied=["model.gguf"],
                                           recall_floor=0.99, predictor_reports=reports, bundles=bundles))


def test_full_budget_keeps_everything_resident_and_dense():
    c = cost()
    sol = solve(c, evidence(False), c.shape.weight_bytes, 0.99)
    assert all(l.mode == "dense" and l.hot == F for l in sol.layers)
    assert sol.flash_bytes_per_token == 0 and sol.resident_bytes == c.shape.weight_bytes


@pytest.mark.parametrize("share", [0.95, 0.8, 0.65])
def test_plans_fit_the_budget(share):
    c = cost()
    budget = int(c.shape.weight_bytes * share)
    for ok in (False, True):
        sol = solve(c, evidence(ok), budget, 0.99)
        assert sol.resident_bytes <= budget
        assert sol.flash_bytes_per_token > 0


def test_sparse_wins_when_the_predictor_is_good():
    c = cost()
    budget = int(c.shape.weight_bytes * 0.7)
    dense = solve(c, evidence(False), budget, 0.99)
    sparse = solve(c, evidence(True, active=0.1), budget, 0.99)
    assert any(l.mode == "sparse" for l in sparse.layers)
    assert sparse.decode_s < dense.decode_s
    assert sparse.flash_bytes_per_token < dense.flash_bytes_per_token


def test_below_minimum_states_the_minimum():
    c = cost()
    m = minimum_bytes(c)
    with pytest.raises(PlanError, match=f"minimum resident set of .*{m} bytes"):
        solve(c, evidence(False), m - 1, 0.99)
    solve(c, evidence(False), m, 0.99)   # exactly the minimum is fine


def test_same_inputs_give_identical_plan_json():
    c = cost()
    budget = int(c.shape.weight_bytes * 0.7)
    a = plan_text(c, solve(c, evidence(True), budget, 0.99))
    b = plan_text(cost(), solve(cost(), evidence(True), budget, 0.99))
    assert a == b
    assert '"weights": "flash"' in a and '"bundles": "ffn.bundles"' in a   # below 100%: FFNs from the bundle file


def test_phone_and_laptop_profiles_give_different_speeds():
    fast, mid = cost("snapdragon-8gen3-ufs4"), cost("snapdragon-7gen3-ufs31")
    b = fast.shape.weight_bytes
    assert solve(fast, evidence(False), b, 0.99).decode_s < solve(mid, evidence(False), b, 0.99).decode_s


def test_calibrate_scales_compute_to_the_measured_step():
    """CostModel.calibrate makes the dense all-resident prediction equal the measured step and scales the
    sparse and fixed terms by the same factor; flash reads are not compute and stay as they were."""
    cm = cost()
    s = cm.shape
    before = cm.fixed_decode_s() + s.n_layers * cm.dense_ffn_s()
    sparse_before = cm.sparse_ffn_s(0.3, 1000)
    read_before = cm.read_s(1 << 20, 1 << 16)
    cm.calibrate(2.5 * before)
    assert cm.fixed_decode_s() + s.n_layers * cm.dense_ffn_s() == pytest.approx(2.5 * before)
    assert cm.sparse_ffn_s(0.3, 1000) == pytest.approx(2.5 * sparse_before)
    assert cm.read_s(1 << 20, 1 << 16) == read_before
    assert cm.kernel_step_s == pytest.approx(before)


def test_a_budget_below_the_lm_head_streams_it_from_flash():
    """A GGUF source whose embeddings / LM head do not fit beside attention streams them (SmolLM2 at 30%);
    the plan says so, stays within the budget and costs their reads; without the streaming path (a
    safetensors source) the same budget is refused with the minimum."""
    from dataclasses import replace

    streamable = CostModel(cost().dev, replace(shape(), head_streamable=True))
    s = streamable.shape
    staging = streamable.staging_bytes()
    budget = s.fixed_bytes_head_on_flash + staging + 500_000   # room for a few hot neurons
    assert budget < s.fixed_bytes + staging                       # but not for the resident head
    sol = solve(streamable, evidence(False), budget, 0.99)
    assert sol.head_on_flash and sol.resident_bytes <= budget
    assert sol.head_flash_bytes >= s.embed_bytes and sol.flash_bytes_per_token > sol.head_flash_bytes
    plan = json.loads(plan_text(streamable, sol))
    assert plan["execution"]["lm_head"] == "flash" and plan["memory"]["resident_bytes"] == s.fixed_bytes_head_on_flash
    assert any("stream from the weights file" in r for r in plan["rationale"])
    # With room for the head, it stays resident (PowerInfer-2's choice), whatever the source.
    assert not solve(streamable, evidence(False), int(s.weight_bytes * 0.8), 0.99).head_on_flash
    with pytest.raises(PlanError, match="minimum resident set"):
        solve(cost(), evidence(False), budget, 0.99)


def test_weight_format_labels_the_storage_not_the_kernel_family():
    """plan.json's model.format: Q4_0 and Q4_1 both run the Q4 kernels (ModelShape.fmt "q4_1"), but a
    reader of the plan is told which one the model is."""
    from engine.model.weights import BF16Weight, F32Weight, I8Weight, Q4Weight
    from planner.cost_model import weight_format
    z = np.zeros
    assert weight_format(Q4Weight(z((2, 16), np.uint8), z((2, 1), np.uint16), z((2, 0), np.uint16))) == "q4_0"
    assert weight_format(Q4Weight(z((2, 16), np.uint8), z((2, 1), np.uint16), z((2, 1), np.uint16))) == "q4_1"
    assert weight_format(I8Weight(z((2, 64), np.int8), z((2, 2), np.uint16), z((2, 0), np.uint16))) == "int8/32"
    assert weight_format(I8Weight(z((2, 64), np.int8), z((2, 4), np.uint16), z((2, 4), np.uint16))) == "int8/16+min"
    assert weight_format(BF16Weight(z((2, 4), np.uint16))) == "bf16"
    assert weight_format(F32Weight(z((2, 4), np.float32))) == "f32"


def test_prefill_engine_is_the_fastest_measured_and_recorded():
    """The solver picks the prefill engine the device profile measured fastest at the model's width, f32
    where the profile has no int8 figure (no numba); plan.json records it with the figures."""
    from planner.solver import prefill_engine

    from planner.solver import onnx_providers

    g = {"numpy": 50.0, "int8": 40.0, "numpy@2048": 60.0, "int8@2048": 90.0}
    assert prefill_engine(g, 576) == ("f32", 50.0, "f32")          # narrow: BLAS measured faster
    assert prefill_engine(g, 2048) == ("int8", 90.0, "int8")       # wide: the int8 GEMM
    assert prefill_engine({"numpy": 50.0, "int8": 120.0}, 4096) == ("int8", 120.0, "int8")   # one width measured
    # ONNX Runtime when it is the fastest and the budget holds its prepacked copy; the faster of the
    # others behind it
    g = {"numpy": 50.0, "int8": 60.0, "onnx": 80.0, "onnx:CPUExecutionProvider": 80.0}
    assert prefill_engine(g, 576) == ("onnx", 80.0, "int8")
    assert prefill_engine(g, 576, spare_bytes=10e6, onnx_bytes=20e6) == ("int8", 60.0, "int8")
    assert prefill_engine(g, 576, spare_bytes=30e6, onnx_bytes=20e6) == ("onnx", 80.0, "int8")
    assert onnx_providers({"onnx:CPUExecutionProvider": 80.0, "onnx:XnnpackExecutionProvider": 95.0,
                           "onnx:QNNExecutionProvider": 300.0, "onnx:QNNExecutionProvider@2048": 1.0}) == (
        "QNNExecutionProvider", "XnnpackExecutionProvider", "CPUExecutionProvider")
    c = cost()
    sol = solve(c, evidence(False), c.shape.weight_bytes, 0.99)
    assert sol.prefill_engine == "f32"                            # the shipped phone profile has no int8 figure
    doc = json.loads(plan_text(c, sol))
    assert doc["prefill"]["engine"] == "f32"
    assert doc["prefill"]["fallback"] == "f32" and doc["prefill"]["providers"] == ["CPUExecutionProvider"]
    assert any(line.startswith("prefill: the f32 engine") for line in doc["rationale"])


def test_merge_gap_follows_the_device_profile():
    """A gap is read through while one longer request is predicted to cost no more than two short ones:
    on a device whose reads cost the same at any size up to 64 KiB, several bundles; on one where speed
    is proportional to request size (a fixed cost per request dominates), the largest gap allowed."""
    from dataclasses import replace

    c = cost()
    st = c.dev.storage

    def with_speed(mbps_of):
        reads = tuple(device.ReadPoint("random", b, 1, mbps_of(b)) for b in (4096, 16384, 65536, 262144, 1 << 20))
        return CostModel(replace(c.dev, storage=replace(st, reads=reads)), shape())

    flat = with_speed(lambda b: 400.0)                     # bandwidth-bound: extra bytes cost full price
    per_request = with_speed(lambda b: b / 4096 * 40.0)    # IOPS-bound: a request costs the same at any size
    assert flat.merge_gap() == 0
    assert per_request.merge_gap() == 8
    sol = solve(c, evidence(True), int(c.shape.weight_bytes * 0.65), 0.99)
    assert json.loads(plan_text(c, sol))["io"]["max_gap_records"] == sol.max_gap == c.merge_gap()


def test_a_mapped_untied_table_counts_only_its_looked_up_rows():
    """An untied GGUF token table stays in the file mapping (engine/formats/mapped_rows.py): the budget
    counts the pages of KV_TOKENS looked-up rows, and the rest of its bytes go to hot neurons."""
    from dataclasses import replace

    from planner.cost_model import KV_TOKENS

    base = replace(shape(), lm_head_bytes=5_000_000, head_streamable=True)
    mapped = replace(base, embed_mapped=True)
    allowance = min(base.embed_bytes, KV_TOKENS * 2 * 4096)
    assert mapped.fixed_bytes == base.fixed_bytes - base.embed_bytes + allowance
    assert mapped.fixed_bytes_head_on_flash == base.fixed_bytes_head_on_flash
    budget = int(base.weight_bytes * 0.6)
    a = solve(CostModel(cost().dev, base), evidence(False), budget, 0.99)
    b = solve(CostModel(cost().dev, mapped), evidence(False), budget, 0.99)
    assert sum(c.hot for c in b.layers) > sum(c.hot for c in a.layers)
    assert b.resident_bytes <= budget and b.flash_bytes_per_token < a.flash_bytes_per_token
    plan = json.loads(plan_text(CostModel(cost().dev, mapped), b))
    assert any("looked-up rows of the mapped token table" in r for r in plan["rationale"])
