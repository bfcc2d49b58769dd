"""Exact parity with transformers (fp32) on random-weight checkpoints made inside the test."""

import numpy as np
import pytest
from model_factory import VARIANTS, hf_to_gguf, make_hf_model, torch_cached_steps, torch_logits

pytest.importorskip("torch", reason="parity tests need the [test] extra (torch==2.13.0)")
pytest.importorskip("transformers", reason="parity tests need the [test] extra (transformers)")

import engine  # noqa: E402

TOL = 1e-4
PROMPT = [1, 17, 93, 5, 64, 33, 120, 7, 45, 88]
STEPS = [3, 99, 14, 51, 76, 20, 8, 111, 42, 60, 27, 9, 101, 36, 70, 12]   # 16 cached decode steps


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    ref = make_hf_model(request.param, d)
    return request.param, ref, engine.load(str(d), threads=2)


def test_prefill_logits_match(pair):
    name, ref, llm = pair
    want = torch_logits(ref, PROMPT)
    got = llm.logits(PROMPT)
    assert got.shape == want.shape and got.dtype == np.float32
    assert want.std() > 0.3, "logits too flat for the tolerance to mean anything"
    assert np.abs(got - want).max() < TOL, name


def test_cached_decode_matches_transformers_and_uncached(pair):
    assert_cached_decode_matches(*pair)


def assert_cached_decode_matches(name, ref, llm):
    """16 cached decode steps of `llm` against transformers' `ref` and against its own uncached pass."""
    want = torch_cached_steps(ref, PROMPT, STEPS)
    cache = llm.model.new_cache(64)
    llm.model.forward(np.array(PROMPT), cache)
    uncached = llm.logits(PROMPT + STEPS)
    for i, t in enumerate(STEPS):
        got = llm.model.forward(np.array([t]), cache, all_logits=False)[0]
        assert np.abs(got - want[i]).max() < TOL, f"{name}: step {i} differs from transformers"
        assert np.abs(got - uncached[len(PROMPT) + i]).max() < TOL, f"{name}: step {i} cached != uncached"


def test_windows_are_exercised():
    # 10 prompt + 16 steps against windows of 6-12: later steps must not see the early tokens.
    for name in ("mistral", "phi3", "gemma3"):
        assert VARIANTS[name][1]["sliding_window"] < len(PROMPT) + len(STEPS), name


# GGUF carries no layer_types or attention scale: llama.cpp's rules apply (every sixth layer global,
# 1/sqrt(head_dim)), so the Gemma checkpoint converted here follows them.
GGUF_OVERRIDES = {"qwen3": {}, "phi3": {},
                  "gemma3": {"num_hidden_layers": 6, "query_pre_attn_scalar": 16,
                             "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}}


@pytest.mark.parametrize("name", sorted(GGUF_OVERRIDES))
def test_gguf_architectures_match_transformers(name, tmp_path):
    """qwen3, phi3 and gemma3 GGUF files (tensor names, fused tensors, Gemma's stored 1 + w norms, the
    window from metadata) against transformers: prefill and 16 cached decode steps, f32 weights and cache."""
    ref = make_hf_model(name, tmp_path / "hf", **GGUF_OVERRIDES[name])
    path = hf_to_gguf(tmp_path / "hf", tmp_path / f"{name}.gguf", arch=name)
    llm = engine.load(str(path), threads=2, kv_cache="f32", prefill="f32")
    assert llm.config.model_type == {"gemma3": "gemma3_text"}.get(name, name)
    assert np.abs(llm.logits(PROMPT) - torch_logits(ref, PROMPT)).max() < TOL, name
    assert_cached_decode_matches(name, ref, llm)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints(tmp_path, dtype):
    import torch
    import transformers

    make_hf_model("llama", tmp_path, dtype=dtype)
    # Reload in fp32: the reference then sees exactly the rounded weights, while its RoPE buffers stay
    # fp32 (casting a live model to half would round inv_freq too).
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    llm = engine.load(str(tmp_path), threads=2)
    assert type(llm.model.weights.layers[0].wq).__name__ == ("F16Weight" if dtype == "float16" else "BF16Weight")
    assert np.abs(llm.logits(PROMPT) - torch_logits(ref, PROMPT)).max() < TOL


def test_sharded_checkpoint(tmp_path):
    ref = make_hf_model("llama", tmp_path, shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    llm = engine.load(str(tmp_path), threads=2)
    assert np.abs(llm.logits(PROMPT) - torch_logits(ref, PROMPT)).max() < TOL


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_onnx_prefill_matches_transformers(name, tmp_path):
    """The ONNX Runtime prefill engine (f32 arithmetic, Gemm on these f32 weights) within the same
    tolerance, then 16 cached decode steps continuing from the K/V it wrote. (The int8 engine multiplies
    f32 weights through BLAS like f32: its tolerance on quantized weights is tests/test_gemm.py's.)"""
    pytest.importorskip("onnxruntime")
    ref = make_hf_model(name, tmp_path)
    llm = engine.load(str(tmp_path), threads=2, prefill="onnx")
    if llm.config.llama_layers:
        assert "all layers in one ONNX Runtime session" in llm.describe(), llm.describe()
    else:  # the graph builds Llama layers only: the fallback runs the prompt, and says why
        assert "ONNX Runtime not used: the graph builds Llama layers" in llm.describe(), llm.describe()
    assert np.abs(llm.logits(PROMPT) - torch_logits(ref, PROMPT)).max() < TOL, name
    want = torch_cached_steps(ref, PROMPT, STEPS)
    cache = llm.model.new_cache(64)
    llm.model.forward(np.array(PROMPT), cache)
    for i, t in enumerate(STEPS):
        got = llm.model.forward(np.array([t]), cache, all_logits=False)[0]
        assert np.abs(got - want[i]).max() < TOL, f"{name}: step {i} after the ONNX prefill differs from transformers"


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "F16"])
def test_gguf_tensors_converted_in_row_chunks_are_the_same(tmp_path, monkeypatch, qtype):
    """gguf_loader converts large tensors a chunk of rows at a time (releasing each chunk's file pages):
    the arrays equal a whole-tensor conversion's, down to the last chunk's partial size."""
    from engine.formats import gguf_loader
    from engine.formats.gguf_file import GGUFFile
    from engine.formats.gguf_quants import weight_from_gguf

    make_hf_model("llama", tmp_path / "hf")
    path = hf_to_gguf(tmp_path / "hf", tmp_path / "m.gguf", qtype)
    g = GGUFFile(path)
    t = g.tensors["token_embd.weight"]                 # 128 rows
    whole = weight_from_gguf(t.ggml_type, g.raw("token_embd.weight"), t.shape, "t", str(path))
    monkeypatch.setattr(gguf_loader, "CHUNK_BYTES", 3 * (t.nbytes // t.shape[0]))   # 3 rows per chunk
    chunked = gguf_loader._converted_in_row_chunks(g, "token_embd.weight", str(path))
    assert type(chunked) is type(whole)
    for a, b in zip(chunked._arrays(), whole._arrays()):
        assert a.dtype == b.dtype and np.array_equal(a, b)
