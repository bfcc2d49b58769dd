"""The co-activation order of cold neurons (planner/coactivation.py): a permutation that keeps the hot
head, is deterministic, and puts neurons that fire together next to each other, so that a token's misses
need fewer requests than in frequency order."""

import numpy as np

from planner.bundles import hot_to_cold
from planner.coactivation import coactivation_order, requests_per_token


def clustered(n_tokens=600, groups=40, size=8, seed=0):
    """(n, groups*size) bool: neurons in groups of `size` that fire together, groups drawn per token,
    neuron ids shuffled so that groups are scattered in id (and frequency) order."""
    rng = np.random.default_rng(seed)
    g = rng.random((n_tokens, groups)) < rng.uniform(0.05, 0.3, groups)
    active = np.repeat(g, size, axis=1)
    active &= rng.random(active.shape) < 0.95                    # a little noise inside a group
    return active[:, rng.permutation(groups * size)]


def test_keeps_the_hot_head_and_is_a_deterministic_permutation():
    a = clustered()
    order = hot_to_cold(a.mean(0))
    co = coactivation_order(a, order, hot=50)
    np.testing.assert_array_equal(co[:50], order[:50])
    assert sorted(co.tolist()) == list(range(a.shape[1]))
    np.testing.assert_array_equal(co, coactivation_order(a, order, hot=50))


def test_fewer_requests_than_frequency_order_on_held_out_tokens():
    a = clustered()
    fit, held = a[:400], a[400:]
    order = hot_to_cold(fit.mean(0))
    co = coactivation_order(fit, order, hot=40)
    freq_req = requests_per_token(held, order, 40, max_gap=0, max_len=64)
    co_req = requests_per_token(held, co, 40, max_gap=0, max_len=64)
    assert co_req < 0.5 * freq_req                               # groups of 8 become runs


def test_tiny_cold_sets_are_left_alone():
    a = clustered()
    order = hot_to_cold(a.mean(0))
    np.testing.assert_array_equal(coactivation_order(a, order, hot=len(order) - 2), order)
