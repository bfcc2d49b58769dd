"""Device profile schema: round trip, shipped examples, bad and foreign files, interpolation."""

import json

import pytest

from engine.errors import PlanError
from planner import device
from planner.budget import parse_budget


def test_examples_load_and_round_trip(tmp_path):
    examples = device.example_profiles()
    assert {"snapdragon-8gen3-ufs4", "snapdragon-7gen3-ufs31"} <= set(examples)
    for name, path in examples.items():
        p = device.load_profile(path)
        assert p.kind == "example" and p.sources, f"{name} must cite its sources"
        out = device.save_profile(p, tmp_path / f"{name}.json")
        assert device.load_profile(out) == p
        assert json.loads(out.read_text()) == p.to_dict()
        assert "device profile" in device.format_summary(p)


def test_paper_figures_in_the_8gen3_profile():
    p = device.load_profile(device.resolve_profile("snapdragon-8gen3-ufs4"))
    assert p.memory.read_gbps == 43.9
    assert [len(c.cores) for c in p.cpu.clusters] == [1, 5, 2]
    assert p.storage.mbps(4096, 1) == pytest.approx(1000)
    assert p.storage.mbps(512 << 10, None, "sequential") == pytest.approx(4000)


def test_read_throughput_interpolates_between_sizes():
    st = device.load_profile(device.resolve_profile("snapdragon-8gen3-ufs4")).storage
    lo, hi = st.mbps(4096, 1), st.mbps(16384, 1)
    assert lo < st.mbps(8192, 1) < hi
    assert st.mbps(1, 1) == lo and st.mbps(1 << 30, 1) == st.mbps(1 << 20, 1)


@pytest.mark.parametrize("mutate, words", [
    (lambda d: d.update(schema="something.else"), "not a pocketinfer device profile"),
    (lambda d: d.update(schema_version=99), "schema_version 99"),
    (lambda d: d.pop("memory"), "lacks the field 'memory'"),
    (lambda d: d["memory"].update(read_gbps=-1), "malformed"),
    (lambda d: d["cpu"].update(physical_cores="many"), "malformed"),
])
def test_bad_profiles_are_refused(tmp_path, mutate, words):
    d = device.load_profile(device.resolve_profile("snapdragon-8gen3-ufs4")).to_dict()
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(PlanError, match=words):
        device.load_profile(path)


def test_unreadable_and_non_json_profiles(tmp_path):
    with pytest.raises(PlanError, match="cannot read"):
        device.load_profile(tmp_path / "missing.json")
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(PlanError, match="not JSON"):
        device.load_profile(tmp_path / "x.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(PlanError, match="not a pocketinfer device profile"):
        device.load_profile(tmp_path / "list.json")
    with pytest.raises(PlanError, match="no such file, nor a shipped example"):
        device.resolve_profile("no-such-phone")


@pytest.mark.parametrize("text, expected", [
    ("1.5GB", 1_500_000_000), ("800MB", 800_000_000), ("512MiB", 512 << 20), ("2e9", 2_000_000_000),
    ("60%", 600), ("100 %", 1000), ("1g", 1 << 30), ("4096", 4096),
])
def test_budget_parsing(text, expected):
    assert parse_budget(text, 1000) == expected


@pytest.mark.parametrize("text", ["", "lots", "10 parsecs", "-5MB", "0%", "0"])
def test_bad_budgets(text):
    with pytest.raises(PlanError):
        parse_budget(text, 1000)


def test_cached_profile_is_measured_again_when_the_code_or_cpu_changed(tmp_path, monkeypatch):
    """A cached profile serves only the code version and CPU that measured it: a home folder can outlive
    both (a profile from older kernels chose the wrong prefill engine)."""
    import dataclasses

    from planner import device, device_probe, pipeline

    monkeypatch.setenv("POCKETINFER_HOME", str(tmp_path))
    example = device.load_profile(device.example_profiles()["snapdragon-8gen3-ufs4"])
    here = dataclasses.replace(example, kind="measured", cpu=device_probe.cpu_info(),
                               probe_version=device_probe.PROBE_VERSION)
    fresh = dataclasses.replace(here, name="fresh")
    calls = []
    monkeypatch.setattr(device_probe, "profile_device", lambda *a, **k: calls.append(1) or fresh)
    for cached, measured in ((here, False), (dataclasses.replace(here, probe_version=0), True),
                             (dataclasses.replace(here, cpu=example.cpu), True)):
        calls.clear()
        device.save_profile(dataclasses.replace(cached, name="cached"), device.default_path())
        got = pipeline.load_device(None)
        assert (got.name, bool(calls)) == (("fresh", True) if measured else ("cached", False))
