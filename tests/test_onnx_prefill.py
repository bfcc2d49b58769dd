"""The ONNX Runtime prefill executor (engine/executors/onnx_prefill.py, graph in onnx_graph.py): the same
logits and KV cache as the f32 prefill on every weight format it maps, with earlier turns as its past;
prompts of any length in one session; engines alternating in one process; and each fallback (no
onnxruntime, no graph for the model, no session, a failed run) running the next engine with its reason
in describe()."""

from __future__ import annotations

import sys

import numpy as np
import pytest

import engine

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module", params=["Q4_0", "Q4_1", "Q8_0", "Q5_0", "Q5_1"])
def gguf_model(request, stories_dir, tmp_path_factory):
    """stories260K (a real model) converted to a GGUF in the format of the parameter."""
    from tests.model_factory import hf_to_gguf
    from tests.test_stories260k import _vocab_meta

    out = tmp_path_factory.mktemp("onnx_model") / f"stories.{request.param}.gguf"
    return hf_to_gguf(stories_dir, out, request.param, _vocab_meta(stories_dir))


def _turns(model, ids, split):
    """Logits of ids[:split] on a fresh cache, then of ids[split:] with the first part as the past;
    and the cache."""
    cache = model.new_cache(256)
    first = model.forward(ids[:split], cache)
    second = model.forward(ids[split:], cache)
    return first, second, cache


@pytest.mark.parametrize("kv", ["f16", "f32"])
def test_same_logits_and_cache_as_f32(gguf_model, kv):
    """MatMulNBits computes in f32 on the stored blocks (accuracy level 0): the logits and the cache
    match the f32 prefill's to f32 rounding, for a first prompt and a second one with the first as past."""
    ids = np.arange(3, 60)
    out = {}
    for name in ("onnx", "f32"):
        llm = engine.load(str(gguf_model), threads=2, prefill=name, kv_cache=kv)
        out[name] = _turns(llm.model, ids, 23)
    (a1, a2, ca), (b1, b2, cb) = out["onnx"], out["f32"]
    for a, b in ((a1, b1), (a2, b2)):
        assert np.abs(a - b).max() <= 1e-4 * (b.max() - b.min())
    kf = ca.k_all.view(np.float16) if kv == "f16" else ca.k_all
    kg = cb.k_all.view(np.float16) if kv == "f16" else cb.k_all
    ka, kb = kf[:, :, :len(ids)].astype(np.float32), kg[:, :, :len(ids)].astype(np.float32)
    assert np.abs(ka - kb).max() <= 1e-3 * np.abs(kb).max()      # a half's last bit, where the cache is half


def test_describe_and_greedy_tokens(gguf_model):
    """describe() names the session; greedy tokens after the ONNX prefill equal those after f32's."""
    tokens = {}
    for name in ("onnx", "f32"):
        llm = engine.load(str(gguf_model), threads=2, prefill=name)
        if name == "onnx":
            assert "all layers in one ONNX Runtime session (CPU;" in llm.describe()
        tokens[name] = llm.generate("Once upon a time", max_tokens=24, temperature=0).tokens
    assert tokens["onnx"] == tokens["f32"]


def test_any_prompt_length_and_engines_alternating(stories_dir):
    """One session takes prompts of any length (the graph's token and past axes are symbolic), and an
    ONNX-prefill model and an int8 one used in turn give what each gives alone."""
    onnx_llm = engine.load(str(stories_dir), threads=2, prefill="onnx")
    int8_llm = engine.load(str(stories_dir), threads=2, prefill="int8")
    f32_llm = engine.load(str(stories_dir), threads=2, prefill="f32")
    for n in (2, 7, 150, 30):
        ids = np.arange(1, n + 1)
        ref = f32_llm.logits(ids)
        a = onnx_llm.logits(ids)
        b = int8_llm.logits(ids)
        assert np.abs(a - ref).max() <= 1e-4 * (ref.max() - ref.min()), n
        assert np.array_equal(b, int8_llm.logits(ids)), n
        assert np.array_equal(a, onnx_llm.logits(ids)), n


def _fallback_matches(source, reason: str, **load):
    """Without a plan the fallback is the default engine."""
    from engine.executors.prefill import LABELS, default_engine

    llm = engine.load(source, threads=2, prefill="onnx", **load)
    assert reason in llm.describe()
    assert f"attention dense, FFN dense, {LABELS[default_engine()]}" in llm.describe()
    ref = engine.load(source, threads=2, prefill=default_engine(), **load)
    ids = np.arange(3, 30)
    assert np.array_equal(llm.logits(ids), ref.logits(ids))
    return llm


def test_fallback_without_onnxruntime(stories_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)        # import raises ImportError, as on Termux
    _fallback_matches(str(stories_dir), "ONNX Runtime not used: onnxruntime is not installed")


def test_fallback_when_the_graph_cannot_express_the_model(stories_dir, tmp_path):
    from tests.model_factory import hf_to_gguf
    from tests.test_stories260k import _vocab_meta

    f16 = hf_to_gguf(stories_dir, tmp_path / "stories.F16.gguf", "F16", _vocab_meta(stories_dir))
    _fallback_matches(str(f16), "the graph cannot express the model: l0.wqkv: F16Weight")


def test_fallback_when_the_session_fails(stories_dir, monkeypatch):
    import onnxruntime as ort

    def refuse(*args, **kwargs):
        raise ort.capi.onnxruntime_pybind11_state.NotImplemented("Could not find an implementation for RotaryEmbedding")

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    _fallback_matches(str(stories_dir), "ONNX Runtime could not make the session: Could not find an implementation")


def test_fallback_when_a_run_fails(stories_dir):
    import onnxruntime as ort

    from engine.executors.prefill import default_engine

    llm = engine.load(str(stories_dir), threads=2, prefill="onnx")
    prefill = llm.model.executors.prefill
    (session,) = prefill.sessions.values()

    class Failing:
        def run(self, *args, **kwargs):
            raise ort.capi.onnxruntime_pybind11_state.Fail("out of memory")

    prefill.sessions = {key: Failing() for key in prefill.sessions}
    ids = np.arange(3, 30)
    ref = engine.load(str(stories_dir), threads=2, prefill=default_engine()).logits(ids)
    assert np.array_equal(llm.logits(ids), ref)
    assert "ONNX Runtime failed to run the prompt: out of memory" in llm.describe()
    assert np.array_equal(llm.logits(ids), ref)           # and it stays on the fallback


def test_plan_reads_fallback_and_providers(stories_dir, tmp_path):
    import json

    from engine.errors import ModelFormatError
    from engine.executors.plan import read_plan
    from engine.formats.hf_loader import load_config

    config = load_config(stories_dir)
    layers = [{"mode": "dense"}] * config.num_hidden_layers
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"decode": {"layers": layers}, "prefill": {
        "engine": "onnx", "fallback": "int8", "providers": ["XnnpackExecutionProvider", "CPUExecutionProvider"]}}))
    plan = read_plan(p, config)
    assert (plan.prefill, plan.prefill_fallback) == ("onnx", "int8")
    assert plan.providers == ("XnnpackExecutionProvider", "CPUExecutionProvider")
    p.write_text(json.dumps({"decode": {"layers": layers}, "prefill": {"engine": "onnx", "fallback": "onnx"}}))
    with pytest.raises(ModelFormatError, match="prefill.fallback is 'onnx', expected one of int8, f32"):
        read_plan(p, config)
    p.write_text(json.dumps({"decode": {"layers": layers}, "prefill": {"engine": "onnx", "providers": "CPU"}}))
    with pytest.raises(ModelFormatError, match="prefill.providers is 'CPU'"):
        read_plan(p, config)


def test_q6_k_matrices_match_f32(tmp_path):
    """Q6_K matrices (the Q6 layout: MatMulNBits' 8-bit values in blocks of 16, one scale per 16 as the
    layout holds them) give the f32 prefill's logits, on a random-weight Llama wide enough for Q6_K's
    256-element blocks."""
    pytest.importorskip("torch", reason="the test model is made with the [test] extra (torch, transformers)")
    from tests.model_factory import hf_to_gguf, make_hf_model

    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)]
    vocab = {"model": "llama", "tokens": tokens, "scores": [0.0] * 128, "types": [2, 3, 3] + [1] * 125}
    make_hf_model("llama", tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    path = hf_to_gguf(tmp_path, tmp_path / "m.gguf", "Q8_0", vocab, qtypes={"blk.*": "Q6_K", "*": "Q8_0"})
    ids = np.arange(3, 40)
    out = {}
    for name in ("onnx", "f32"):
        llm = engine.load(str(path), threads=2, prefill=name)
        assert type(llm.model.weights.layers[0].w_down).__name__ == "Q6Weight"
        if name == "onnx":
            assert "all layers in one ONNX Runtime session (CPU;" in llm.describe()
        out[name] = llm.model.forward(ids, llm.model.new_cache(64))
    a, b = out["onnx"], out["f32"]
    # Float rounding only: one Q6 matmul matches its float64 product to ~1e-6, and this wider random
    # model's two layers take the logits' differences to ~2e-4 of their range (Q4_K: ~1e-4); a wrong
    # mapping moves them by their whole range.
    assert np.abs(a - b).max() <= 1e-3 * (b.max() - b.min())
