"""Bad input gets a one-line error naming the file, field or value and what to do — from the library as
an exception, from the CLI as one stderr line and a non-zero exit, never a traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import hf_to_gguf

import engine
from engine.errors import ConfigError, ContextLengthError, ModelFormatError, RegistryError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def stories_copy(stories_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(stories_dir, d)
    return d


def cli(*args, stdin=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300, cwd=str(ROOT))


def assert_one_line_error(result, *needles):
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("pocketinfer: error: ") and "Traceback" not in result.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.slow
def test_missing_safetensors(stories_copy):
    (stories_copy / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no model.safetensors"):
        engine.load(str(stories_copy))
    assert_one_line_error(cli("generate", "-m", str(stories_copy), "-p", "hi"), "model.safetensors")


@pytest.mark.slow
def test_truncated_safetensors(stories_copy):
    f = stories_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ModelFormatError, match="truncated"):
        engine.load(str(stories_copy))
    assert_one_line_error(cli("generate", "-m", str(stories_copy), "-p", "hi"), "model.safetensors", "truncated")


def test_corrupt_safetensors_header(stories_copy):
    f = stories_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:16] = b"\xff\xfe garb"
    f.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="corrupt"):
        engine.load(str(stories_copy))


@pytest.mark.slow
def test_config_missing_required_field(stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    del cfg["hidden_size"]
    (stories_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="'hidden_size' is missing"):
        engine.load(str(stories_copy))
    assert_one_line_error(cli("generate", "-m", str(stories_copy), "-p", "hi"), "config.json", "hidden_size")


def test_config_unsupported_architecture_and_activation(stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    (stories_copy / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"],
                                                          "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel"):
        engine.load(str(stories_copy))
    (stories_copy / "config.json").write_text(json.dumps({**cfg, "hidden_act": "swiglu_oai"}))
    with pytest.raises(ConfigError, match="hidden_act='swiglu_oai'"):
        engine.load(str(stories_copy))


def test_weights_that_do_not_match_the_config(stories_copy):
    cfg = json.loads((stories_copy / "config.json").read_text())
    (stories_copy / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 200}))
    with pytest.raises(ModelFormatError, match="mlp.gate_proj.weight.*expected"):
        engine.load(str(stories_copy))


@pytest.fixture
def stories_gguf(stories_dir, tmp_path):
    from test_stories260k import _vocab_meta

    return hf_to_gguf(stories_dir, tmp_path / "stories.gguf", "Q8_0", _vocab_meta(stories_dir))


@pytest.mark.slow
def test_truncated_gguf(stories_gguf):
    data = stories_gguf.read_bytes()
    stories_gguf.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ModelFormatError, match="truncated"):
        engine.load(str(stories_gguf))
    assert_one_line_error(cli("generate", "-m", str(stories_gguf), "-p", "hi"), "stories.gguf", "truncated")


def test_gguf_truncated_inside_header(stories_gguf):
    stories_gguf.write_bytes(stories_gguf.read_bytes()[:100])
    with pytest.raises(ModelFormatError, match="truncated GGUF header"):
        engine.load(str(stories_gguf))


def test_corrupt_gguf_magic(stories_gguf):
    data = bytearray(stories_gguf.read_bytes())
    data[:4] = b"GGML"
    stories_gguf.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        engine.load(str(stories_gguf))


@pytest.mark.slow
def test_missing_gguf_file(tmp_path):
    with pytest.raises(RegistryError, match="nothere.gguf"):
        engine.load(str(tmp_path / "nothere.gguf"))
    assert_one_line_error(cli("generate", "-m", str(tmp_path / "nothere.gguf"), "-p", "hi"), "nothere.gguf")


@pytest.mark.slow
def test_gguf_unsupported_architecture(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(path), "gpt2")
    w.add_block_count(1)
    import numpy as np
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFormatError, match="general.architecture='gpt2' is not supported"):
        engine.load(str(path))
    assert_one_line_error(cli("generate", "-m", str(path), "-p", "hi"), "general.architecture")


def test_gguf_unsupported_tensor_type(stories_dir, tmp_path):
    """A quantization type pocketinfer has no kernel for names the tensor and the type."""
    from test_stories260k import _vocab_meta

    path = hf_to_gguf(stories_dir, tmp_path / "s.gguf", "Q4_0", _vocab_meta(stories_dir))
    data = bytearray(path.read_bytes())
    # Rewrite the first tensor-info type field that says Q4_0 (2) into IQ4_NL (20): same block size.
    from engine.formats.gguf_file import GGUFFile
    g = GGUFFile(path)
    name = next(n for n, t in g.tensors.items() if t.ggml_type == 2)
    key = name.encode()
    at = data.index(key) + len(key)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == 2
    data[type_at:type_at + 4] = (20).to_bytes(4, "little")
    del g
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError, match=name.replace(".", r"\.")):
        engine.load(str(path))


@pytest.mark.slow
def test_prompt_longer_than_context(stories_dir):
    llm = engine.load(str(stories_dir), n_ctx=32)
    with pytest.raises(ContextLengthError, match="32"):
        llm.generate("Once upon a time " * 20, max_tokens=4)
    r = cli("generate", "-m", str(stories_dir), "--ctx", "32", "-p", "Once upon a time " * 20)
    assert_one_line_error(r, "context")


def test_generation_stops_at_full_context(stories_dir):
    llm = engine.load(str(stories_dir), n_ctx=24)
    r = llm.generate([1], max_tokens=100, temperature=0)
    assert r.finish_reason == "length" and len(r.tokens) == 23


@pytest.mark.slow
def test_unknown_alias():
    with pytest.raises(RegistryError, match="unknown|not a file"):
        engine.load("no-such-model-alias")
    assert_one_line_error(cli("generate", "-m", "no-such-model-alias", "-p", "hi"), "no-such-model-alias")


@pytest.mark.slow
def test_bad_sampling_values(stories_dir):
    llm = engine.load(str(stories_dir))
    with pytest.raises(ValueError, match="top_p"):
        llm.generate("Once", top_p=0.0)
    with pytest.raises(TypeError, match="temprature"):
        llm.generate("Once", temprature=0.5)
    assert_one_line_error(cli("generate", "-m", str(stories_dir), "-p", "hi", "--top-p", "0"), "top_p")


@pytest.mark.slow
def test_perplexity_text_too_short(stories_dir, tmp_path):
    f = tmp_path / "short.txt"
    f.write_text("Once upon a time.")
    assert_one_line_error(cli("perplexity", "-m", str(stories_dir), "-f", str(f), "--ctx", "64"), "fewer than one window")
    assert_one_line_error(cli("perplexity", "-m", str(stories_dir), "-f", str(tmp_path / "none.txt")), "none.txt")
