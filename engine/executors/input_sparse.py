"""Input sparsity for SwiGLU models, the plain-numpy reference (TEAL, Liu et al. 2024, arXiv 2408.14690):
before each linear layer, the entries of each token's input vector whose magnitude is below a per-layer,
per-group threshold are set to zero, so a decode kernel need not read the weight columns they meet.

The groups of a layer, each with one threshold because its matrices share one input:
  qkv      wq, wk, wv (or wqkv)        input: the attention-normed hidden state  (n, hidden)
  o        wo                          input: the attention output               (n, heads*head_dim)
  gate_up  w_gate, w_up (or w_gate_up) input: the FFN-normed hidden state        (n, hidden)
  down     w_down                      input: act = act_fn(gate) * up            (n, ffn)
and, separately, the LM head's input (the final-normed hidden state).

`InputMask` is a matmul(weight, x) for the layer-by-layer stack and the dense FFN: it finds the weight's
(layer, group), masks x row by row (one row is one token, so a batched prefill masks exactly as token-by-
token decode would), counts what it zeroed, and multiplies through f32 BLAS. A threshold of 0 leaves x
untouched, so all-zero thresholds are the dense f32 path exactly. `MaskedStack` and `MaskedHead` run the
model's own stack and LM head through it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from engine.executors import prefill
from engine.executors.dense import DenseFFN
from engine.executors.stack import LayerStack

GROUPS = ("qkv", "o", "gate_up", "down")
# The LayerWeights fields of each group: fused or separate, whichever the layout kept (engine/model/layout.py).
GROUP_WEIGHTS = {"qkv": ("wqkv", "wq", "wk", "wv"), "o": ("wo",),
                 "gate_up": ("w_gate_up", "w_gate", "w_up"), "down": ("w_down",)}


def group_weights(lw, group: str) -> list:
    """The weights a layer multiplies group's input by: the fused one where the layout made it (its
    separate weights are then row views of it), else the separate ones."""
    names = GROUP_WEIGHTS[group]
    fused = len(names) > 1
    if fused and getattr(lw, names[0]) is not None:
        return [getattr(lw, names[0])]
    return [getattr(lw, f) for f in names[fused:] if getattr(lw, f) is not None]


def unit_weights(layers):
    """(layer index, group index in GROUPS, weight) for every weight of every layer's groups, fused and
    separate alike (the stacks multiply by whichever the layout kept)."""
    for i, lw in enumerate(layers):
        for g, name in enumerate(GROUPS):
            for field in GROUP_WEIGHTS[name]:
                w = getattr(lw, field)
                if w is not None:
                    yield i, g, w


def mask_rows(x: np.ndarray, threshold: float) -> np.ndarray:
    """x (n, cols) f32 -> a copy with |x| < threshold set to 0 (x itself when threshold <= 0)."""
    if threshold <= 0.0:
        return x
    return np.where(np.abs(x) >= np.float32(threshold), x, np.float32(0.0))


class InputMask:
    """matmul(weight, x) with the weight's group input masked; counts zeroed and seen inputs per unit.

    Units are flat indices: layer * 4 + group for the layers' groups (GROUPS order), and
    n_layers * 4 for the LM head. observer(unit, x), when given, sees every unmasked input (calibration)."""

    def __init__(self, layers, thresholds: np.ndarray, head_threshold: float = 0.0,
                 observer: Callable[[int, np.ndarray], None] | None = None):
        """layers: the model's LayerWeights; thresholds (n_layers, 4) on |input|, 0 for dense."""
        n = len(layers)
        thresholds = np.asarray(thresholds, dtype=np.float64)
        if thresholds.shape != (n, len(GROUPS)):
            raise ValueError(f"thresholds have shape {thresholds.shape}, expected ({n}, {len(GROUPS)})")
        self.thresholds = np.append(thresholds.ravel(), float(head_threshold))   # (n*4 + 1,) f64
        self.head_unit = n * len(GROUPS)
        self.observer = observer
        self.unit = {id(w): i * len(GROUPS) + g for i, g, w in unit_weights(layers)}   # id(weight) -> unit
        self.zeroed = np.zeros(self.head_unit + 1, np.int64)   # inputs set to 0 by the mask, per unit
        self.seen = np.zeros(self.head_unit + 1, np.int64)     # inputs that went through, per unit

    def apply(self, unit: int, x: np.ndarray) -> np.ndarray:
        """x (n, cols) f32, the input of `unit` -> masked x, counted."""
        if self.observer is not None:
            self.observer(unit, x)
        thr = self.thresholds[unit]
        self.seen[unit] += x.size
        if thr > 0.0:
            x = mask_rows(x, thr)
            self.zeroed[unit] += x.size - np.count_nonzero(x)
        return x

    def __call__(self, w, x: np.ndarray) -> np.ndarray:
        """x (n, cols) f32 -> (n, rows) f32 = mask(x) @ w.T through f32 BLAS."""
        return prefill.f32(w, self.apply(self.unit[id(w)], x))

    def sparsity(self) -> np.ndarray:
        """(n_layers*4 + 1,) f64: the share of each unit's inputs the mask zeroed so far."""
        return self.zeroed / np.maximum(self.seen, 1)


class MaskedStack(LayerStack):
    """The layer-by-layer prefill stack (attention and dense FFNs) with every matmul through `mask`."""

    kind = "layer by layer, input-sparse"

    def __init__(self, config, layers, mask: InputMask, first: int = 0):
        """layers: the model's layers first.. (a suffix when measuring from a saved residual)."""
        ffns = [DenseFFN(lw, config.act_kind, mask) for lw in layers]
        super().__init__(config, layers, ffns, batched=True, engine="f32", first=first, matmul=mask)


class MaskedHead:
    """The LM head weight with its input masked: the `matmul` the forward pass calls on lm_head."""

    def __init__(self, weight, mask: InputMask):
        self.weight = weight
        self.mask = mask
        self.shape = weight.shape

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (n, hidden) f32 -> (n, vocab) f32."""
        return self.weight.matmul(self.mask.apply(self.mask.head_unit, x))
