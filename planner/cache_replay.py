"""Cold-cache hit rates, by replaying calibration activation traces through the cache policy.

The policy is PowerInfer-2's for cold neurons (section 4.3): least recently used, at the granularity of
one token (every neuron a token uses is touched at once). Under it, a cold neuron is in a cache of
capacity C exactly when it is among the C most recently used cold neurons, so one pass that ranks
neurons by last use gives the hit rate for every capacity at once.
"""

from __future__ import annotations

import numpy as np


def lru_hit_rates(active: np.ndarray, hot: np.ndarray, capacities: list[int]) -> tuple[list[float], float]:
    """active (n, ffn) bool: neurons each token fetches; hot (ffn,) bool: resident, never fetched.
    Returns the hit rate of the cold accesses for each capacity, and cold accesses per token.
    The first quarter of the tokens warms the cache and is not counted."""
    cold = ~hot
    idx = np.flatnonzero(cold)                                    # (n_cold,) neuron ids
    n = len(active)
    if idx.size == 0 or n == 0:
        return [1.0 for _ in capacities], 0.0
    acc = active[:, idx]                                          # (n, n_cold) bool
    last = np.full(idx.size, -1, dtype=np.int64)                  # (n_cold,) token of last use, -1 never
    # hist[r] counts counted accesses whose neuron had recency rank r (0 = most recent) before the token.
    hist = np.zeros(idx.size + 1, dtype=np.int64)
    warm = n // 4
    counted = 0
    for t in range(n):
        used = acc[t]
        if t >= warm:
            # Rank by last use, most recent first; never-used neurons rank last (always a miss).
            order = np.argsort(-last, kind="stable")
            rank = np.empty(idx.size, dtype=np.int64)
            rank[order] = np.arange(idx.size)
            r = np.where(last[used] >= 0, rank[used], idx.size)
            hist += np.bincount(r, minlength=idx.size + 1)
            counted += int(used.sum())
        last[used] = t
    cum = np.cumsum(hist)
    rates = [float(cum[min(c, idx.size) - 1]) / counted if c > 0 and counted else (1.0 if not counted else 0.0)
             for c in capacities]
    return rates, float(acc[warm:].sum()) / max(1, n - warm)
