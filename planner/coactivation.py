"""Placing cold neurons in the bundle file so that the ones a token needs together sit together.

Why: a sparse layer on flash reads each token's missing cold neurons, and misses that are neighbours in
the file merge into one request (engine/flash/reader.merge_runs). In frequency order the misses of one
token are scattered, so a token costs about one request per miss; the I/O engine's cost is per request
on this kind of storage (BENCHMARKS.md, flash readers). "LLM in a flash" (arXiv 2312.11514) bundles by
co-activation for the same reason.

The order: the hot positions [0, hot) keep their frequency order (the plan makes exactly those
resident); the cold neurons are chained greedily, starting from the most frequent one, each next
neuron the not yet placed one most often active with the one just placed, by the cosine of their
activity over the calibration tokens (counts of joint activity over the root of the product of each
one's count, so frequent neurons do not attract everything), ties to the more frequent, then the lower
id. Deterministic: the same traces give the same order.
"""

from __future__ import annotations

import numpy as np

MAX_COLD = 16384     # the similarity matrix is cold x cold f32, 1 GiB at this size; layers with more
                     # cold neurons keep the frequency order (planner/pipeline.py)


def coactivation_order(active: np.ndarray, order: np.ndarray, hot: int) -> np.ndarray:
    """active (n_tokens, ffn) bool: which neurons fired on each calibration token; order (ffn,) int32
    neuron ids hot to cold; hot: how many lead the order as the resident segment. Returns (ffn,) int32,
    the same first `hot` ids, then the cold ids chained by co-activation (module docstring)."""
    order = np.asarray(order, dtype=np.int32)
    cold = order[hot:]
    m = len(cold)
    if m <= 2:
        return order.copy()
    if m > MAX_COLD:
        raise ValueError(f"{m} cold neurons: more than the {MAX_COLD} the co-activation order is built for")
    a = np.ascontiguousarray(active[:, cold], dtype=np.float32)      # (n, m) 0/1
    count = a.sum(axis=0)                                             # (m,) tokens each fired on
    joint = a.T @ a                                                   # (m, m) tokens both fired on
    norm = np.sqrt(np.maximum(count, 1.0))
    sim = joint / norm[:, None] / norm[None, :]                       # (m, m) cosine of activity
    # Ties: the more frequent, then the earlier in `order` (a tiny bias below any real difference).
    rank = np.arange(m, dtype=np.float64)
    tie = (count / max(1.0, count.max()) * 1e-3 - rank * 1e-9).astype(np.float32)
    placed = np.zeros(m, dtype=bool)
    chain = np.empty(m, dtype=np.int64)
    cur = int(np.lexsort((rank, -count))[0])                          # the most frequent cold neuron
    for k in range(m):
        chain[k] = cur
        placed[cur] = True
        if k == m - 1:
            break
        score = sim[cur] + tie
        score[placed] = -np.inf
        cur = int(np.argmax(score))
    return np.concatenate([order[:hot], cold[chain]]).astype(np.int32)


def requests_per_token(active: np.ndarray, order: np.ndarray, hot: int, max_gap: int, max_len: int) -> float:
    """Mean read requests per token when the neurons active on each token (n, ffn) bool are fetched from
    a file in `order` with positions below `hot` resident, misses merged as the runtime merges them."""
    from engine.flash.reader import merge_runs

    pos_of = np.empty(len(order), dtype=np.int64)
    pos_of[order] = np.arange(len(order))
    total = 0
    for row in active:
        p = np.sort(pos_of[np.flatnonzero(row)])
        total += len(merge_runs(p[p >= hot], max_gap, max_len))
    return total / max(1, len(active))
