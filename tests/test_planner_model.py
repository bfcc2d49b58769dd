"""Model profile, predictor training and the deploy directory, on small random-weight checkpoints."""

import json

import numpy as np
import pytest
from model_factory import make_hf_model

from engine.errors import ModelFormatError, PlanError

PHONE = "snapdragon-8gen3-ufs4"   # a shipped profile, so no test measures this machine


FFN = 1024     # the test model's FFN width (relu_model)

@pytest.fixture(scope="module")
def relu_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("relu")
    # An FFN wide enough that its bundles outweigh the flash FFN's read buffers and staging ring
    # (engine/flash_ffn.io_bytes), as in any real model: otherwise no budget below 100% is feasible.
    make_hf_model("llama-relu", d, seed=0, intermediate_size=FFN)
    return d


@pytest.fixture(scope="module")
def calibration(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cal") / "cal.txt"
    path.write_text(" ".join(f"w{i}" for i in rng.integers(3, 128, 1200)))
    return path


@pytest.fixture(scope="module")
def profile(relu_model, calibration):
    from engine.loader import load
    from planner.model_profile import profile_model

    return profile_model(load(relu_model, threads=1), calibration)


def test_profile_statistics(profile):
    assert 800 < profile.n_tokens <= 1024   # MAX_TOKENS, spread over the text
    assert profile.h.shape == (2, profile.n_tokens, 64) and profile.active.shape == (2, profile.n_tokens, FFN)
    for st in profile.layers:
        # ReLU: about half the products are exact zeros, and "active" means nonzero, which drops nothing.
        assert 0.3 < st.exact_zero < 0.7
        assert st.label_threshold == 0.0 and st.label_dropped_energy == 0.0
        assert st.freq.shape == (FFN,) and np.all((st.freq >= 0) & (st.freq <= 1))
        sp = [c.sparsity for c in st.candidates]
        en = [c.dropped_energy for c in st.candidates]
        assert sp == sorted(sp) and en == sorted(en)
        # Down is read exactly when act is nonzero, which needs relu(gate) > 0: P(gate | down) = 1.
        assert st.coactivation["gate_given_down"] == pytest.approx(1.0, abs=0.005)   # f16 traces round tiny values to 0


def test_predictors_beat_chance(profile):
    from planner.predictors import train_all

    preds, reports = train_all(profile, recall_floor=0.95)
    assert set(preds) == {0, 1}
    for r in reports:
        assert r.recall > 0.85
        # At the same share of neurons marked active, a random guess has precision = the active share.
        assert r.precision > r.label_active + 0.05
        assert r.recall > r.chance_recall + 0.1


def test_predictor_training_is_deterministic(profile):
    from planner.predictors import train_all

    a, _ = train_all(profile, rank=8)
    b, _ = train_all(profile, rank=8)
    for i in a:
        assert np.array_equal(a[i].w2, b[i].w2) and a[i].threshold == b[i].threshold


def test_empty_calibration_is_an_error(tmp_path, relu_model):
    from planner.model_profile import read_calibration

    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(PlanError, match="calibration file is empty"):
        read_calibration(tmp_path / "empty.txt")


def _deploy(src, out, cal, budget="100%", **kw):
    from planner.pipeline import make_deploy

    return make_deploy(src, budget, out, device_profile=PHONE, calibration=cal, threads=1, **kw)


def test_deploy_twice_is_byte_identical_and_loads(tmp_path, relu_model, calibration):
    from engine.loader import load

    a = _deploy(relu_model, tmp_path / "a", calibration, "90%")
    b = _deploy(relu_model, tmp_path / "b", calibration, "90%")
    assert (a.path / "plan.json").read_bytes() == (b.path / "plan.json").read_bytes()
    plan = json.loads((a.path / "plan.json").read_text())
    assert plan["schema_version"] == 1 and len(plan["model"]["fingerprint"]) == 64
    # Below 100% the FFNs run from the bundle file (engine/executors/plan.py, flash_ffn.py).
    assert plan["execution"]["weights"] == "flash" and (a.path / plan["files"]["bundles"]).exists()
    assert set(plan["predicted"]) == {"ttft_s", "decode_tps", "peak_rss_mb", "flash_bytes_per_token"}
    assert len(plan["decode"]["layers"]) == 2
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temporary leftovers
    llm = load(a.path, threads=1)
    assert llm.plan["model"]["fingerprint"] == plan["model"]["fingerprint"]
    ref = load(relu_model, threads=1)
    assert llm.generate("w5 w6 w7", max_tokens=5, temperature=0).tokens == \
        ref.generate("w5 w6 w7", max_tokens=5, temperature=0).tokens


def test_fingerprint_mismatch_is_refused(tmp_path, relu_model, calibration):
    from engine.loader import load

    r = _deploy(relu_model, tmp_path / "d", calibration)
    other = tmp_path / "other"
    make_hf_model("llama-relu", other, seed=1, intermediate_size=FFN)
    (r.path / "model" / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ModelFormatError, match="fingerprint .* does not match"):
        load(r.path, threads=1)


def test_budget_below_minimum_states_it(tmp_path, relu_model, calibration):
    with pytest.raises(PlanError, match=r"below the minimum resident set of .*\(\d+ bytes\)"):
        _deploy(relu_model, tmp_path / "d", calibration, "10%")
    assert not (tmp_path / "d").exists()


def test_interrupted_deploy_leaves_nothing(tmp_path, relu_model, calibration, monkeypatch):
    from planner import deploy

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(deploy, "save_predictors", boom)
    with pytest.raises(KeyboardInterrupt):
        _deploy(relu_model, tmp_path / "d", calibration)
    assert list(tmp_path.iterdir()) == []


def test_existing_target_needs_force(tmp_path, relu_model, calibration):
    (tmp_path / "d").mkdir()
    with pytest.raises(PlanError, match="already exists"):
        _deploy(relu_model, tmp_path / "d", calibration)
    r = _deploy(relu_model, tmp_path / "d", calibration, overwrite=True)
    assert (r.path / "plan.json").exists()


def test_cli_plan_json_and_bad_profile(tmp_path, relu_model, calibration, capsys):
    from engine.cli import main

    out = tmp_path / "d"
    assert main(["plan", str(relu_model), "--memory-budget", "100%", "-o", str(out), "--device-profile", PHONE,
                 "--calibration", str(calibration), "-t", "1", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan == json.loads((out / "plan.json").read_text())
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    assert main(["plan", str(relu_model), "--memory-budget", "100%", "-o", str(tmp_path / "e"),
                 "--device-profile", str(bad), "--calibration", str(calibration)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a pocketinfer device profile" in err[0]


def test_fingerprint_ignores_the_renamed_copy(tmp_path):
    """A .gguf source is copied into DEPLOY as model.gguf: the copy must keep the source's fingerprint,
    and another file of the same size must not."""
    import shutil

    from engine.formats.deploy import fingerprint

    rng = np.random.default_rng(0)
    src = tmp_path / "SmolLM2.Q4_1.gguf"
    src.write_bytes(rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    shutil.copy(src, tmp_path / "model.gguf")
    assert fingerprint([src]) == fingerprint([tmp_path / "model.gguf"])
    other = tmp_path / "other.gguf"
    other.write_bytes(rng.integers(0, 256, 3 << 20, dtype=np.uint8).tobytes())
    assert fingerprint([other]) != fingerprint([src])


def test_flash_io_fields_are_read_and_checked(tmp_path, relu_model, calibration):
    """plan.json io.max_gap_records reaches the flash FFN; out-of-range io fields are refused by name."""
    from engine.executors.flash_ffn import store_of
    from engine.loader import load

    d = _deploy(relu_model, tmp_path / "d", calibration, "90%")
    path = d.path / "plan.json"
    plan = json.loads(path.read_text())
    assert isinstance(plan["io"]["max_gap_records"], int)
    plan["io"]["max_gap_records"] = 5
    path.write_text(json.dumps(plan))
    assert store_of(load(d.path, threads=1).model.executors).max_gap == 5
    for field, bad in (("max_gap_records", -1), ("reader_threads", 10_000), ("reader_threads", "many")):
        broken = json.loads(json.dumps(plan))
        broken["io"][field] = bad
        path.write_text(json.dumps(broken))
        with pytest.raises(ModelFormatError, match=f"io.{field}"):
            load(d.path, threads=1)
