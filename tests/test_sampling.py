"""Sampling: parameter validation, each filter against a brute-force reference, and the chain."""

import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from engine.text.sampling import (
    SamplingParams,
    apply_repeat_penalty,
    draw,
    greedy,
    make_sampler,
    min_p_filter,
    softmax,
    top_k_filter,
    top_p_filter,
)

NEG_INF = -np.inf

logit_arrays = arrays(
    np.float32,
    st.integers(1, 600),
    elements=st.floats(-30, 30, width=32),
)


def kept(x: np.ndarray) -> set[int]:
    return set(np.flatnonzero(np.isfinite(x)).tolist())


# --- SamplingParams --------------------------------------------------------------------------

def test_defaults_are_llama_cpp_like():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p, p.repeat_penalty, p.repeat_last_n, p.seed) == (
        0.8, 40, 0.95, 0.05, 1.0, 64, None)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", float("inf")),
    ("top_k", -1), ("top_k", 2.5), ("top_p", 0.0), ("top_p", 1.01), ("top_p", float("nan")),
    ("min_p", -0.01), ("min_p", 1.0), ("repeat_penalty", 0.0), ("repeat_penalty", -1.0),
    ("repeat_last_n", -1), ("seed", -3), ("seed", 1.5),
])
def test_invalid_params_name_field_and_value(field, value):
    with pytest.raises(ValueError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_params_are_frozen():
    with pytest.raises(Exception):
        SamplingParams().temperature = 1.0  # type: ignore[misc]


# --- repeat penalty --------------------------------------------------------------------------

def test_repeat_penalty_divides_positive_and_multiplies_negative():
    logits = np.array([2.0, -2.0, 0.0, 1.0], dtype=np.float32)
    out = apply_repeat_penalty(logits, [0, 1, 2, 1, 1], 2.0)
    np.testing.assert_allclose(out, [1.0, -4.0, 0.0, 1.0])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 0.0, 1.0])  # input untouched
    assert out is not logits and out.dtype == np.float32


def test_repeat_penalty_always_lowers_penalised_tokens_probability():
    logits = np.array([-1.0, -3.0, 0.5], dtype=np.float32)
    before = softmax(logits)[1]
    after = softmax(apply_repeat_penalty(logits, [1], 1.5))[1]
    assert after < before


def test_repeat_penalty_noop_and_bad_ids():
    logits = np.arange(4, dtype=np.float32)
    out = apply_repeat_penalty(logits, [1, 2], 1.0)
    np.testing.assert_array_equal(out, logits)
    assert out is not logits
    np.testing.assert_array_equal(apply_repeat_penalty(logits, [], 3.0), logits)
    with pytest.raises(ValueError, match="recent token ids"):
        apply_repeat_penalty(logits, [4], 1.1)
    with pytest.raises(ValueError, match="recent token ids"):
        apply_repeat_penalty(logits, [-1], 1.1)


def test_repeat_last_n_window_only():
    logits = np.array([5.0, 4.9, 0.0], dtype=np.float32)
    # token 0 was produced long ago, outside the 2-token window: it stays the arg-max.
    sampler = make_sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=2))
    assert sampler(logits, [0, 2, 2]) == 0
    assert sampler(logits, [2, 0]) == 1
    off = make_sampler(SamplingParams(temperature=0, repeat_penalty=2.0, repeat_last_n=0))
    assert off(logits, [0]) == 0


# --- top_k -----------------------------------------------------------------------------------

def test_top_k_one_keeps_only_the_max():
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert kept(top_k_filter(logits, 1)) == {1}


def test_top_k_off_and_ties():
    logits = np.array([1.0, 2.0, 2.0, 0.0], dtype=np.float32)
    assert top_k_filter(logits, 0) is logits
    assert top_k_filter(logits, 10) is logits
    assert kept(top_k_filter(logits, 1)) == {1, 2}  # ties with the k-th value all survive


@settings(max_examples=200, deadline=None)
@given(logit_arrays, st.integers(1, 700))
def test_top_k_matches_sort_reference(logits, k):
    out = top_k_filter(logits, k)
    if k >= logits.size:
        assert kept(out) == set(range(logits.size))
        return
    kth = np.sort(logits)[::-1][k - 1]
    assert kept(out) == set(np.flatnonzero(logits >= kth).tolist())
    assert out.dtype == logits.dtype
    np.testing.assert_array_equal(out[np.isfinite(out)], logits[np.isfinite(out)])


# --- top_p -----------------------------------------------------------------------------------

def top_p_reference(logits: np.ndarray, p: float) -> int:
    """How many tokens a plain full sort keeps."""
    probs = np.sort(softmax(logits))[::-1]
    return int(np.searchsorted(np.cumsum(probs), p)) + 1


def test_top_p_tiny_keeps_only_the_max():
    logits = np.array([1.0, 1.5, 0.2, 1.49], dtype=np.float32)
    assert kept(top_p_filter(logits, 1e-9)) == {1}


def test_top_p_keeps_smallest_set_reaching_p():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    assert kept(top_p_filter(logits, 0.5)) == {0}
    assert kept(top_p_filter(logits, 0.6)) == {0, 1}
    assert kept(top_p_filter(logits, 0.9)) == {0, 1, 2}
    assert top_p_filter(logits, 1.0) is logits


@settings(max_examples=200, deadline=None)
@given(logit_arrays, st.floats(0.001, 0.999))
def test_top_p_matches_sort_reference(logits, p):
    out = top_p_filter(logits, p)
    got = kept(out)
    probs = softmax(logits)
    # Equal-probability ties at the cut may be broken either way; the kept set must be a top set.
    assert abs(len(got) - top_p_reference(logits, p)) <= np.sum(probs == probs[list(got)].min())
    assert min(probs[list(got)]) >= max(np.delete(probs, list(got)), default=0.0)
    assert probs[list(got)].max() == probs.max()


def test_top_p_on_large_flat_tail_widens_its_window():
    # 150k-token vocab, nearly flat: the nucleus is far larger than the first window.
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 0.01, size=150_000).astype(np.float32)
    out = top_p_filter(logits, 0.5)
    assert abs(len(kept(out)) - top_p_reference(logits, 0.5)) <= 1


def test_top_p_respects_earlier_filters():
    logits = np.array([3.0, 2.0, 1.0, 0.0], dtype=np.float32)
    after_k = top_k_filter(logits, 2)
    assert kept(top_p_filter(after_k, 0.999)) <= {0, 1}


# --- min_p -----------------------------------------------------------------------------------

def test_min_p_threshold_relative_to_max():
    probs = np.array([0.5, 0.3, 0.1, 0.04, 0.06], dtype=np.float64)
    logits = np.log(probs).astype(np.float32)
    assert kept(min_p_filter(logits, 0.1)) == {0, 1, 2, 4}  # >= 0.05
    assert kept(min_p_filter(logits, 0.5)) == {0, 1}         # >= 0.25
    assert kept(min_p_filter(logits, 0.99)) == {0}
    assert min_p_filter(logits, 0.0) is logits


@settings(max_examples=100, deadline=None)
@given(logit_arrays, st.floats(0.001, 0.999))
def test_min_p_matches_probability_rule(logits, min_p):
    got = kept(min_p_filter(logits, min_p))
    probs = softmax(logits)
    ref = set(np.flatnonzero(probs >= min_p * probs.max() * (1 - 1e-5)).tolist())
    strict = set(np.flatnonzero(probs >= min_p * probs.max() * (1 + 1e-5)).tolist())
    assert strict <= got <= ref  # float32 round-off only at the boundary


# --- choosing --------------------------------------------------------------------------------

def test_greedy_ties_go_to_lowest_id():
    assert greedy(np.array([0.0, 2.0, 2.0, 1.0], dtype=np.float32)) == 1
    sampler = make_sampler(SamplingParams(temperature=0, seed=None))
    assert sampler(np.array([5.0, 5.0, 5.0], dtype=np.float32), []) == 0


def test_all_neg_inf_but_one_always_picks_it():
    logits = np.full(1000, NEG_INF, dtype=np.float32)
    logits[637] = -50.0
    for params in [SamplingParams(seed=1), SamplingParams(temperature=5.0, top_k=0, top_p=1.0, min_p=0.0, seed=2),
                   SamplingParams(temperature=0)]:
        sampler = make_sampler(params)
        assert {sampler(logits, []) for _ in range(50)} == {637}


def test_invalid_logits_raise():
    sampler = make_sampler(SamplingParams(seed=0))
    with pytest.raises(ValueError, match="-inf"):
        sampler(np.full(4, NEG_INF, dtype=np.float32), [])
    with pytest.raises(ValueError, match="NaN"):
        sampler(np.array([0.0, np.nan], dtype=np.float32), [])
    with pytest.raises(ValueError, match="1-D"):
        sampler(np.zeros((2, 3), dtype=np.float32), [])


def test_draw_never_picks_masked_tokens():
    rng = np.random.default_rng(0)
    logits = np.array([NEG_INF, 0.0, NEG_INF, 0.0, NEG_INF])
    assert {draw(logits, rng) for _ in range(500)} == {1, 3}


def test_draw_follows_softmax_distribution():
    rng = np.random.default_rng(123)
    logits = np.log(np.array([0.6, 0.3, 0.1]))
    n = 20_000
    counts = np.bincount([draw(logits, rng) for _ in range(n)], minlength=3) / n
    np.testing.assert_allclose(counts, [0.6, 0.3, 0.1], atol=0.015)


def test_temperature_sharpens_and_flattens():
    logits = np.array([1.0, 0.0], dtype=np.float32)
    base = dict(top_k=0, top_p=1.0, min_p=0.0)

    def freq_of_top(temp: float) -> float:
        sampler = make_sampler(SamplingParams(temperature=temp, seed=7, **base))
        return sum(sampler(logits, []) == 0 for _ in range(4000)) / 4000

    cold, warm, hot = freq_of_top(0.25), freq_of_top(1.0), freq_of_top(10.0)
    assert cold > warm > hot
    assert abs(warm - 1 / (1 + math.exp(-1))) < 0.03


def test_top_k_one_sampler_is_greedy():
    rng = np.random.default_rng(5)
    sampler = make_sampler(SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    for _ in range(20):
        logits = rng.normal(size=500).astype(np.float32)
        assert sampler(logits, []) == int(np.argmax(logits))


def test_chain_order_filters_before_temperature():
    # top_p at temperature 1 keeps only token 0 (p=0.88 >= 0.8); a high temperature must not revive token 1.
    logits = np.array([2.0, 0.0], dtype=np.float32)
    sampler = make_sampler(SamplingParams(temperature=100.0, top_k=0, top_p=0.8, min_p=0.0, seed=0))
    assert {sampler(logits, []) for _ in range(200)} == {0}


def test_same_seed_same_tokens_and_different_seeds_differ():
    flat = np.zeros(1000, dtype=np.float32)
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)

    def run(seed: int) -> list[int]:
        sampler = make_sampler(SamplingParams(seed=seed, **params))
        return [sampler(flat, []) for _ in range(30)]

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert len(set(run(42))) > 20  # a flat distribution really is sampled broadly


def test_default_chain_reproducible_on_realistic_logits():
    rng = np.random.default_rng(9)
    steps = [rng.normal(0, 3, size=32_000).astype(np.float32) for _ in range(20)]

    def run() -> list[int]:
        sampler = make_sampler(SamplingParams(seed=2024, repeat_penalty=1.1))
        out: list[int] = []
        for logits in steps:
            out.append(sampler(logits, out))
        return out

    assert run() == run()


def test_sampler_does_not_mutate_logits():
    logits = np.random.default_rng(1).normal(size=300).astype(np.float32)
    copy = logits.copy()
    make_sampler(SamplingParams(seed=0, repeat_penalty=1.3))(logits, [1, 2, 3])
    np.testing.assert_array_equal(logits, copy)


def test_tiny_temperature_is_greedy_without_overflow():
    logits = np.random.default_rng(4).normal(size=2000).astype(np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        for params in [SamplingParams(temperature=1e-300, seed=0),
                       SamplingParams(temperature=1e-300, top_k=0, top_p=1.0, min_p=0.0, seed=0)]:
            assert make_sampler(params)(logits, []) == int(np.argmax(logits))


def test_previous_tokens_may_be_a_numpy_array():
    logits = np.array([5.0, 4.9, 0.0], dtype=np.float32)
    sampler = make_sampler(SamplingParams(temperature=0, repeat_penalty=2.0))
    assert sampler(logits, np.array([0, 0], dtype=np.int32)) == 1
