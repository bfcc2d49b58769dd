"""Causal grouped-query attention of new queries over a per-layer KV cache.

Query i sits at position start+i and sees cache positions lo..start+i, where lo = 0, or
start+i-window+1 with a sliding window (Mistral). Query head h reads KV head h // (H / Hkv).
"""

import math

import numpy as np

from kernels.backend import NUMBA, jit, pick
from kernels.kv import load, to_f32

if NUMBA:
    from numba import prange


def allowed_positions(start: int, n: int, window: int) -> np.ndarray:
    """(n, start+n) bool: which cached positions query start+i attends to (causal, and within `window`
    positions when window > 0)."""
    end = start + n
    pos_q = np.arange(start, end)[:, None]             # (n, 1)
    pos_k = np.arange(end)[None, :]                    # (1, end)
    allowed = pos_k <= pos_q
    if window > 0:
        allowed &= pos_k > pos_q - window
    return allowed


def attention_numpy(q, k_cache, v_cache, start, window, out):
    """q (n, H, hd) f32; k_cache, v_cache (Hkv, max_seq, hd) f32 or uint16 half bits (kernels/kv.py)
    holding positions 0..start+n-1;
    start int; window int (0 = unlimited) -> out (n, H, hd) f32. BLAS-backed: the prefill path."""
    n, n_heads, hd = q.shape
    n_kv = k_cache.shape[0]
    group = n_heads // n_kv
    end = start + n
    scale = np.float32(1.0 / math.sqrt(hd))
    allowed = allowed_positions(start, n, window)      # (n, end)
    for g in range(n_kv):
        qg = q[:, g * group:(g + 1) * group].transpose(1, 0, 2)          # (group, n, hd)
        scores = (qg @ to_f32(k_cache[g, :end]).T) * scale                # (group, n, end)
        scores = np.where(allowed[None], scores, -np.inf)
        scores -= scores.max(axis=2, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=2, keepdims=True)
        out[:, g * group:(g + 1) * group] = (p @ to_f32(v_cache[g, :end])).transpose(1, 0, 2)
    return out


@jit(inline=True)
def attend_head(q, k_cache, v_cache, i, h, g, pos, window, scale, scores, out):
    """out[i, h] = softmax(q[i, h] . keys) . values over cache positions lo..pos of KV head g (lo from
    the window), the caches f32 or uint16 half bits; scores (>= pos + 1,) f32 scratch. One query head: _attention_numba's job, and a work
    item of kernels/decode_token.py."""
    hd = q.shape[2]
    lo = 0
    if window > 0 and pos - window + 1 > 0:
        lo = pos - window + 1
    span = pos + 1 - lo
    best = np.float32(-np.inf)
    for t in range(span):
        s = np.float32(0.0)
        for j in range(hd):
            s += q[i, h, j] * load(k_cache[g, lo + t, j])
        s *= scale
        scores[t] = s
        if s > best:
            best = s
    total = np.float32(0.0)
    for t in range(span):
        e = np.float32(math.exp(scores[t] - best))
        scores[t] = e
        total += e
    for j in range(hd):
        out[i, h, j] = 0.0
    for t in range(span):
        w = scores[t] / total
        for j in range(hd):
            out[i, h, j] += w * load(v_cache[g, lo + t, j])


@jit(parallel=True)
def _attention_numba(q, k_cache, v_cache, start, window, out):
    n, n_heads, hd = q.shape
    n_kv = k_cache.shape[0]
    group = n_heads // n_kv
    scale = np.float32(1.0 / math.sqrt(hd))
    for job in prange(n * n_heads):
        i = job // n_heads
        h = job % n_heads
        scores = np.empty(start + i + 1, dtype=np.float32)
        attend_head(q, k_cache, v_cache, i, h, h // group, start + i, window, scale, scores, out)
    return out


attention = pick(_attention_numba, attention_numpy)
