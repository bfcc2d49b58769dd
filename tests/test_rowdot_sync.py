"""kernels/rowdot.py (four-block row dots, x rearranged once per matvec) and kernels/sync.py (work
sharing inside one parallel region) against their numpy twins, and the one-region decode
(kernels/decode_token.py) against the per-layer path on several thread counts."""

from __future__ import annotations

import numpy as np
import pytest

from kernels import backend, rowdot, sync
from tests.test_kernels import _i8, _q4, _q5, _q6, ref_q6

NB = (1, 2, 3, 4, 5, 6, 7, 8, 18, 48, 49)     # every tail: fours, then a two and/or a one


@pytest.mark.parametrize("nb", NB)
def test_prepare_and_corrections_twins(nb):
    """The Q4 step order puts each group's first halves before its second halves; both versions agree,
    and it is a permutation of xq. Lane corrections are -128 times each four values' sum."""
    rng = np.random.default_rng(nb)
    xq = rng.integers(-127, 128, 32 * nb, dtype=np.int8)
    want = rowdot.prepare_q4_x_numpy(xq, np.empty_like(xq))
    got = rowdot.prepare_q4_x(xq, np.empty_like(xq))
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.sort(want), np.sort(xq))
    b, k = list(rowdot._groups(nb))[0]
    assert (b, k) == (0, min(4, nb) if nb != 3 else 2)
    np.testing.assert_array_equal(want[: 16 * k], xq.reshape(-1, 32)[:k, :16].reshape(-1))
    xc = rowdot.lane_corrections(xq, np.empty(8 * nb, np.int32))
    np.testing.assert_array_equal(xc, rowdot.lane_corrections_numpy(xq, np.empty(8 * nb, np.int32)))
    assert xc[0] == -128 * int(xq[:4].astype(np.int32).sum())


def test_row_dots_against_numpy(simd_code):
    """q4_dot, q5_dot, q6_dot and i8_dot on the AVX-512 VNNI, AVX2 and generic-vector code, the last with
    hardware or integer half conversion (each forced by compiling with the other flags off:
    tests/conftest.py), both scale dtypes, every tail length, extreme values (q = 15, 31, 63, Q6's 0 and -128 with
    x = +-127: the i16 and VNNI bias bounds)."""
    if not backend.NUMBA:
        pytest.skip("the four-block row dots are LLVM intrinsics: numba only")
    from numba import njit

    @njit(cache=False)
    def q4_rows(qs, d, xq, xp, xc, dx, out):
        for r in range(qs.shape[0]):
            out[r] = rowdot.q4_dot(qs, d, r, xq, xp, xc, dx)
        return out

    @njit(cache=False)
    def q5_rows(qs, d, xq, xp, xc, dx, out):
        for r in range(qs.shape[0]):
            out[r] = rowdot.q5_dot(qs, d, r, xq, xp, xc, dx)
        return out

    @njit(cache=False)
    def q6_rows(qs, d, xq, xp, xc, dx, out):
        for r in range(qs.shape[0]):
            out[r] = rowdot.q6_dot(qs, d, r, xq, xp, xc, dx)
        return out

    @njit(cache=False)
    def i8_rows(q, d, xq, xp, xc, dx, out):
        for r in range(q.shape[0]):
            out[r] = rowdot.i8_dot(q, d, r, xq, xp, xc, dx)
        return out

    rng, rng6 = np.random.default_rng(5), np.random.default_rng(6)
    for nb in NB:
        for kind in ("f32", "f16"):
            qs, d, _ = _q4(rng, 5, 32 * nb, kind, sym=True)
            qs[0] = 0xFF                                  # every nibble 15
            xq = rng.integers(-127, 128, 32 * nb, dtype=np.int8)
            xq[:32] = 127
            dx = rng.uniform(0.001, 0.1, nb).astype(np.float32)
            xp = rowdot.prepare_q4_x_numpy(xq, np.empty_like(xq))
            got = q4_rows(qs, d, xq, xp, np.zeros(8 * nb, np.int32), dx, np.empty(5, np.float32))
            want = np.array([rowdot.q4_dot_numpy(qs, d, r, xq, dx) for r in range(5)])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"q4 nb={nb} {kind}")
            q5, d5, _ = _q5(rng, 5, 32 * nb, kind, sym=True)
            q5[0] = 0xFFFFFFFF                            # every value 31
            got = q5_rows(q5, d5, xq, xp, np.zeros(8 * nb, np.int32), dx, np.empty(5, np.float32))
            want = np.array([rowdot.q5_dot_numpy(q5, d5, r, xq, dx) for r in range(5)])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"q5 nb={nb} {kind}")
            q6, d6, _ = _q6(rng6, 5, 32 * nb)             # its own stream: the others' draws stay as they were
            q6[0] = np.uint64(2**64 - 1)                  # every value 63
            q6[1] = 0                                     # every value 0: -32 after the offset
            got = q6_rows(q6, d6, xq, xp, np.zeros(8 * nb, np.int32), dx, np.empty(5, np.float32))
            want = np.array([rowdot.q6_dot_numpy(q6, d6, r, xq, dx) for r in range(5)])
            # scales of both signs: the float sums cancel, so the bound is relative to the sum of |terms|
            mag = np.abs(ref_q6(q6, d6, None)) @ np.abs(xq.reshape(-1, 32) * dx[:, None]).reshape(-1)
            assert (np.abs(got - want) <= 1e-6 * mag + 1e-6).all(), f"q6 nb={nb}"
            q, d8, _ = _i8(rng, 5, 32 * nb, 32, False, kind)
            q[0] = -128
            q[1, :32] = 127
            xq[32:64] = -127
            xc = rowdot.lane_corrections_numpy(xq, np.empty(8 * nb, np.int32))
            got = i8_rows(q, d8, xq, np.zeros_like(xq), xc, dx, np.empty(5, np.float32))
            want = np.array([rowdot.i8_dot_numpy(q, d8, r, xq, dx) for r in range(5)])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"i8 nb={nb} {kind}")


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 2, 7, 64])
def test_take_hands_out_every_item_once_serial(threads, n):
    """The serial twin, threads taking in turn (and one thread taking all of another's region): every
    item exactly once, then -1 for everyone."""
    c = sync.new_counters(3, threads)
    seen = []
    order = [t for _ in range(n + threads) for t in range(threads)] + [0] * (n + 1)
    for t in order:
        i = sync.take_numpy(c, 1, t, threads, n)
        if i >= 0:
            seen.append(i)
            sync.finish_numpy(c, 1, threads)
    assert sorted(seen) == list(range(n))
    sync.wait_step_numpy(c, 1, threads, n)
    assert not c[: threads + 1].any() and not c[2 * (threads + 1):].any()      # other steps untouched
    # One thread alone takes its own region front to back, then the others' from their back end.
    c = sync.new_counters(1, threads)
    alone = [sync.take_numpy(c, 0, 0, threads, n) for _ in range(n + 1)]
    own = list(range(n // threads))
    assert alone[: len(own)] == own and sorted(alone[:n]) == list(range(n)) and alone[n] == -1


@pytest.mark.slow
def test_take_in_a_parallel_region():
    """The numba version with real threads: every item of many steps claimed exactly once, each
    finished before wait returns (each item's mark is visible to the thread that waited)."""
    if not backend.NUMBA:
        pytest.skip("numba only")
    import numba
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def run(threads, steps, n, marks, seen):
        c = np.zeros((threads + 1) * steps, np.int64)
        for t in prange(threads):
            for s in range(steps):
                i = sync.take(c, s, t, threads, n)
                while i >= 0:
                    marks[s, i] += 1
                    sync.finish(c, s, threads)
                    i = sync.take(c, s, t, threads, n)
                sync.wait_step(c, s, threads, n)
                k = 0
                for j in range(n):
                    k += marks[s, j]
                seen[t, s] = k
        return marks

    threads = numba.get_num_threads()
    steps, n = 200, 37
    marks = np.zeros((steps, n), np.int64)
    seen = np.zeros((threads, steps), np.int64)
    run(threads, steps, n, marks, seen)
    assert (marks == 1).all()
    assert (seen == n).all()


# Gemma 3 as a Q4_K_M file has it: 5-bit q/k/gate/up, Q8_0 or Q5_0 v, Q4_K o, and down projections that
# alternate between Q4_K (the Q4 layout) and Q6_K (the Q6 layout) across layers; local and global layers.
GEMMA_MIX = {"blk.[024].ffn_down.weight": "Q4_K", "*ffn_down.weight": "Q6_K", "*attn_output.weight": "Q4_K",
             "blk.[135].attn_v.weight": "Q8_0", "blk.*": "Q5_0", "*": "Q8_0"}
GEMMA_SHAPE = dict(hidden_size=256, intermediate_size=256, head_dim=64, num_hidden_layers=6, query_pre_attn_scalar=64,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"])

# A Llama Q4_K_M file: Q4_K matrices with a Q6_K v and down in some layers; here also a Q5_0 up beside
# a Q4_K gate. The fused q|k|v and gate|up of those layers mix layouts (layout.match_fused_layouts).
LLAMA_MIX = {"blk.[13].attn_v.weight": "Q6_K", "blk.[02].ffn_down.weight": "Q6_K", "blk.2.ffn_up.weight": "Q5_0",
             "blk.*": "Q4_K", "*": "Q8_0"}


@pytest.mark.parametrize("threads,qtype", [(1, "Q4_1"), (2, "Q4_1"), (1, "Q8_0"), (2, "Q8_0"), (2, "Q4_0"),
                                           (1, "gemma3-mix"), (2, "gemma3-mix"), (2, "llama-mix")])
def test_one_region_decode_matches_layer_by_layer(tmp_path, threads, qtype):
    """The one-region decode (engine/executors/one_region.py, kernels/decode_token.py: the default for Q4
    and Q8_0 models) against dense decode layer by layer, its numpy twin, on 1 and 2 threads: the same
    logits within float rounding over 8 cached steps, and near the uncached prefill's. gemma3-mix: q/k and
    output norms, two RoPE bases, windows shorter than the 13 tokens, and two layouts of down."""
    pytest.importorskip("torch", reason="the test model is made with the [test] extra (torch, transformers)")
    from model_factory import hf_to_gguf, make_hf_model

    import engine
    from engine.executors.choose import layer_by_layer
    from engine.executors.dense import DenseFFN
    from engine.executors.one_region import AVAILABLE, OneRegionDecode

    if not AVAILABLE:
        pytest.skip("numba only")
    tokens = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)]
    vocab = {"model": "llama", "tokens": tokens, "scores": [0.0] * 128, "types": [2, 3, 3] + [1] * 125}
    if qtype == "gemma3-mix":
        make_hf_model("gemma3", tmp_path, **GEMMA_SHAPE)
        path = hf_to_gguf(tmp_path, tmp_path / "m.gguf", "Q8_0", vocab, arch="gemma3", qtypes=GEMMA_MIX)
    elif qtype == "llama-mix":
        make_hf_model("llama", tmp_path, hidden_size=256, intermediate_size=512, num_hidden_layers=4)
        path = hf_to_gguf(tmp_path, tmp_path / "m.gguf", "Q8_0", vocab, qtypes=LLAMA_MIX)
    else:
        make_hf_model("llama", tmp_path)      # hidden 64, FFN 96: every matrix quantizes to the Q4 or I8 layout
        path = hf_to_gguf(tmp_path, tmp_path / "m.gguf", qtype, vocab)
    llm = engine.load(str(path), threads=threads)
    m = llm.model
    assert isinstance(m.executors.decode, OneRegionDecode)
    if qtype == "gemma3-mix":
        downs = {type(lw.w_down).__name__ for lw in m.weights.layers}
        assert downs == {"Q4Weight", "Q6Weight"} and len(set(m.config.layer_rope)) == 2
    if qtype == "llama-mix":
        qkv = [type(lw.wqkv).__name__ for lw in m.weights.layers]
        gate_up = [type(lw.w_gate_up).__name__ for lw in m.weights.layers]
        assert qkv == ["Q4Weight", "I8Weight"] * 2 and gate_up == ["Q4Weight", "Q4Weight", "I8Weight", "Q4Weight"]
    prompt, steps = [1, 17, 93, 5, 64], [3, 99, 14, 51, 76, 20, 8, 111]

    def decode():
        cache = m.new_cache(32)
        m.forward(np.array(prompt), cache)
        out = [m.forward(np.array([t]), cache, all_logits=False)[0] for t in steps]
        assert cache.length == len(prompt) + len(steps)
        return out

    got = decode()
    with m.running(layer_by_layer(m, [DenseFFN(lw, m.config.act_kind) for lw in m.weights.layers])):
        plain = decode()
    uncached = llm.logits(prompt + steps)                 # prefill path: float activations throughout
    for i, (a, c) in enumerate(zip(got, plain)):
        scale = max(1.0, np.abs(c).max())
        assert np.abs(a - c).max() < 1e-4 * scale, f"step {i}"
        # Decode's matvecs round x to int8 per block (kernels/intdot.py), prefill's do not: on this
        # random 64-wide model that moves logits by up to ~6% of their range (a wrong kernel: ~100%).
        ref = uncached[len(prompt) + i]
        assert np.abs(a - ref).max() < 0.15 * max(1.0, np.abs(ref).max()), f"step {i} against prefill"
