"""Quality of input sparsity (engine/executors/input_sparse.py), teacher-forced through the batched
prefill path: each window runs as one prefill from an empty cache, its NLL scored like
engine/measure/perplexity.py's windows. Masking is per row (token), so this equals decoding the window
token by token with the same masks.

- `masked(model, mask)`: the model's own forward pass with its stack and LM head masked;
- `window_nll(model, windows, mask)`: the per-token NLL over windows;
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
from kernels.norm import rmsnorm


@contextmanager
def masked(model, mask: InputMask):
    """Inside the block, model.forward runs every matmul of its layers (both phases) and its LM head
    through `mask`."""
    stack = MaskedStack(model.config, model.weights.layers, mask)
    head = model.weights.lm_head
    model.weights.lm_head = MaskedHead(head, mask)
    try:
        with model.running(Executors(stack, stack, model.executors.extra)):
            yield model
    finally:
        model.weights.lm_head = head


def window_nll(model, windows: list[np.ndarray], mask: InputMask) -> np.ndarray:
    """(sum of len(w)-1,) float64 NLL of every window's tokens 1.. through the masked model."""
    with masked(model, mask):
        return np.concatenate([nll_of(model.forward(w, model.new_cache(len(w))), w) for w in windows])


def residuals(model, ids: np.ndarray) -> list[np.ndarray]:
    """The dense residual stream of one window: n_layers + 1 arrays (n, hidden) f32, the input of each
    layer and, last, the output of the last layer (before the final norm)."""
    c, layers = model.config, model.weights.layers
    dense = InputMask(layers, np.zeros((len(layers), 4)))
    x = model.weights.embed.rows_f32(np.asarray(ids))                       # (n, hidden) f32
    if c.embed_scale != 1.0:
        x *= np.float32(c.embed_scale)
    cache = model.new_cache(len(ids))
    cos, sin = model.rope.table(0, len(ids))
    out = [x.copy()]
    for i in range(len(layers)):
        MaskedStack(c, layers[i:i + 1], dense, first=i).run(x, cache, 0, cos, sin)
        out.append(x.copy())
    return out


def suffix_nll(model, ids: np.ndarray, x: np.ndarray, first: int, mask: InputMask) -> np.ndarray:
    """(len(ids)-1,) float64 NLL of one window whose layers before `first` are dense and whose residual
    at layer `first`'s input is x (n, hidden) f32, from residuals(); layers first.. and the head masked.
    The tail is Transformer._forward's: final norm, LM head, soft-capping."""
    c, layers = model.config, model.weights.layers
    x = x.copy()
    cos, sin = model.rope.table(0, len(ids))
    MaskedStack(c, layers[first:], mask, first=first).run(x, model.new_cache(len(ids)), 0, cos, sin)
    rmsnorm(x, model.weights.norm, c.rms_norm_eps, x)
    logits = MaskedHead(model.weights.lm_head, mask).matmul(x)               # (n, vocab) f32
    if c.final_logit_softcapping:
        cap = np.float32(c.final_logit_softcapping)
        np.tanh(logits / cap, out=logits)
        logits *= cap
    return nll_of(logits, ids)
