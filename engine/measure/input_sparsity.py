"""Quality of input sparsity (engine/executors/input_sparse.py), teacher-forced through the batched
prefill path: each window runs as one prefill from an empty cache, its NLL scored like
engine/measure/perplexity.py's windows. Masking is per row (token), so this equals decoding the window
token by token with the same masks.

- `masked(model, mask)`: the model's own forward pass with its stack and LM head masked;
- `window_nll(model, windows, mask)`: the per-token NLL over windows;
- `token_kl(logp_dense, logits)`: the per-token KL divergence of a masked pass from the dense one, the
  planner's sensitivity measure: never negative, and far less noisy on a few hundred tokens than the
  NLL change, which a perturbation can lower by chance on one text and raise on another;
- `residuals` and `suffix_nll`: the dense residual stream at every layer's input, saved once, so that
  sparsifying one layer's group re-runs only that layer and those after it (the planner's sensitivity
  pass costs about half of the full passes it replaces).
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from engine.executors.base import Executors
from engine.executors.input_sparse import InputMask, MaskedHead, MaskedStack
from engine.measure.perplexity import window_nll as nll_of


@contextmanager
def masked_head(model, mask: InputMask):
    """Inside the block, the model's LM head multiplies its input masked by `mask`."""
    head = model.weights.lm_head
    model.weights.lm_head = MaskedHead(head, mask)
    try:
        yield model
    finally:
        model.weights.lm_head = head


@contextmanager
def masked(model, mask: InputMask):
    """Inside the block, model.forward runs every matmul of its layers (both phases) and its LM head
    through `mask`."""
    stack = MaskedStack(model.config, model.weights.layers, mask)
    with masked_head(model, mask), model.running(Executors(stack, stack, model.executors.extra)):
        yield model


def window_logits(model, windows: list[np.ndarray], mask: InputMask) -> list[np.ndarray]:
    """Per window, (len(w), vocab) f32 logits through the masked model."""
    with masked(model, mask):
        return [model.forward(w, model.new_cache(len(w))) for w in windows]


def window_nll(model, windows: list[np.ndarray], mask: InputMask) -> np.ndarray:
    """(sum of len(w)-1,) float64 NLL of every window's tokens 1.. through the masked model."""
    return np.concatenate([nll_of(lg, w) for lg, w in zip(window_logits(model, windows, mask), windows)])


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """(n, vocab) f32 logits -> (n-1, vocab) f32 log-probabilities of the positions that predict a
    scored token (all but the last)."""
    lg = logits[:-1].astype(np.float64)
    lg -= lg.max(axis=1, keepdims=True)
    return (lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))).astype(np.float32)


def token_kl(logp_dense: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """(n-1,) float64 KL(dense || masked) per scored position; logp_dense from log_softmax."""
    lp = log_softmax(logits).astype(np.float64)
    return (np.exp(logp_dense.astype(np.float64)) * (logp_dense - lp)).sum(axis=1)


def residuals(model, ids: np.ndarray) -> list[np.ndarray]:
    """The dense residual stream of one window: n_layers + 1 arrays (n, hidden) f32, the input of each
    layer and, last, the output of the last layer (before the final norm)."""
    c, layers = model.config, model.weights.layers
    dense = InputMask(layers, np.zeros((len(layers), 4)))
    x = model.embed(np.asarray(ids))                                          # (n, hidden) f32
    cache = model.new_cache(len(ids))
    cos, sin = model.rope.table(0, len(ids))
    out = [x.copy()]
    for i in range(len(layers)):
        MaskedStack(c, layers[i:i + 1], dense, first=i).run(x, cache, 0, cos, sin)
        out.append(x.copy())
    return out


def suffix_nll(model, ids: np.ndarray, x: np.ndarray, first: int, mask: InputMask) -> np.ndarray:
    """(len(ids)-1,) float64 NLL of one window from suffix_logits."""
    return nll_of(suffix_logits(model, ids, x, first, mask), ids)


def suffix_logits(model, ids: np.ndarray, x: np.ndarray, first: int, mask: InputMask) -> np.ndarray:
    """(len(ids), vocab) f32 logits of one window whose layers before `first` are dense and whose
    residual at layer `first`'s input is x (n, hidden) f32, from residuals(); layers first.. and the head
    masked, the head through the model's own (Transformer.head)."""
    x = x.copy()
    cos, sin = model.rope.table(0, len(ids))
    MaskedStack(model.config, model.weights.layers[first:], mask, first=first).run(x, model.new_cache(len(ids)), 0,
                                                                                   cos, sin)
    with masked_head(model, mask):
        return model.head(x)                                                  # (n, vocab) f32
