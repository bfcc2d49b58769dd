"""Perplexity over non-overlapping windows, the quality measure llama.cpp and the papers report.

Each window of `ctx` tokens is evaluated from an empty cache; the score is the mean negative
log-likelihood of tokens 1..ctx-1 of every window given the tokens before them, and ppl = exp(mean).
Like llama.cpp's perplexity tool, a model that wants BOS gets it as the first token of every window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.errors import ContextLengthError


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float            # mean negative log-likelihood per scored token (nats)
    windows: int
    scored_tokens: int
    ctx: int


def window_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """logits (n, vocab) f32 for ids (n,) -> (n-1,) float64 NLL of ids[1:] given the prefix."""
    lg = logits[:-1].astype(np.float64)
    top = lg.max(axis=1, keepdims=True)
    lse = np.log(np.exp(lg - top).sum(axis=1)) + top[:, 0]
    return lse - lg[np.arange(len(ids) - 1), ids[1:]]


def perplexity(llm, ids: list[int], ctx: int, max_windows: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    if ctx > llm.n_ctx:
        raise ContextLengthError(f"ctx {ctx} exceeds the model's context of {llm.n_ctx}; pass a smaller --ctx")
    ids = np.asarray(ids, dtype=np.int64)
    bos = llm.tokenizer.bos_token_id
    if llm.tokenizer.add_bos and bos is not None and len(ids) and ids[0] == bos:
        ids = ids[1:]  # the stream's own leading BOS; each window gets one below
    n = len(ids) // ctx
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}; "
                         "use a longer text or a smaller --ctx")
    total, count = 0.0, 0
    for w in range(n):
        window = ids[w * ctx:(w + 1) * ctx].copy()
        if llm.tokenizer.add_bos and bos is not None:
            window[0] = bos
        nll = window_nll(llm.logits(window), window)
        total += float(nll.sum())
        count += len(nll)
        if progress:
            progress(w + 1, n)
    mean = total / count
    return PerplexityResult(ppl=math.exp(mean), nll=mean, windows=n, scored_tokens=count, ctx=ctx)
