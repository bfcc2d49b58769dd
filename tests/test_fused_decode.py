"""The fused one-call-per-layer decode (kernels/fused.py) against the unfused path it replaces."""

import numpy as np
import pytest

import engine
from kernels.backend import NUMBA
from model_factory import hf_to_gguf, make_hf_model

pytest.importorskip("torch", reason="the test model is made with the [test] extra (torch, transformers)")


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_fused_decode_equals_unfused(tmp_path, qtype):
    make_hf_model("llama", tmp_path)      # hidden 64, FFN 96: every matrix quantizes to the Q4 layout
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)]
    vocab = {"model": "llama", "tokens": tokens, "scores": [0.0] * 128, "types": [2, 3, 3] + [1] * 125}
    llm = engine.load(str(hf_to_gguf(tmp_path, tmp_path / "m.gguf", qtype, vocab)), threads=2)
    m = llm.model
    assert m._fused_decode == NUMBA       # all-Q4 layers use it whenever numba is on
    prompt, steps = [1, 17, 93, 5, 64], [3, 99, 14, 51, 76, 20, 8, 111]

    stacked = m._stacked                  # the one-region decode, tested in tests/test_rowdot_sync.py

    def decode(fused: bool) -> list[np.ndarray]:
        m._fused_decode = fused and NUMBA
        m._stacked = None
        cache = m.new_cache(32)
        m.forward(np.array(prompt), cache)
        out = [m.forward(np.array([t]), cache, all_logits=False)[0] for t in steps]
        assert cache.length == len(prompt) + len(steps)
        return out

    fused, unfused = decode(True), decode(False)
    m._stacked = stacked
    uncached = llm.logits(prompt + steps)                 # prefill path: float activations throughout
    for i, (got, want) in enumerate(zip(fused, unfused)):
        assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max()), f"step {i}"
        # Decode's Q4 matvecs round x to int8 per block (kernels/intdot.py), prefill's do not: on this
        # random 64-wide model that moves logits by up to ~6% of their range (a wrong kernel: ~100%).
        ref = uncached[len(prompt) + i]
        assert np.abs(got - ref).max() < 0.15 * max(1.0, np.abs(ref).max()), f"step {i} against prefill"
