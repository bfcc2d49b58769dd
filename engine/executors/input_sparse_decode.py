"""Input-sparse decode: the layer-by-layer stack for one token with each linear layer's input thresholded
by the plan's per-layer, per-group thresholds (planner/input_sparsity.py; the groups and the numpy
reference are engine/executors/input_sparse.py). A group whose weights engine/model/layout.to_columns
turned into the Q4C layout reads only its kept columns (kernels/input_sparse.py); a group left in another
layout (Q5, Q6, int8, float) gets the same threshold applied to its input and runs its dense kernel,
the same result without the saving. Thresholds of 0 are the dense decode.
"""

from __future__ import annotations

import numpy as np

from engine.executors.dense import DenseFFN
from engine.executors.input_sparse import GROUPS, group_weights, mask_rows, unit_weights
from engine.executors.stack import LayerStack
from engine.model.weights import Q4CWeight


class SparseInputs:
    """matmul(weight, x) for one token, x (1, cols) f32 -> (1, rows) f32, with the weight's group input
    thresholded: through the input-sparse kernel for Q4C weights, else masked and dense."""

    def __init__(self, layers, thresholds):
        """thresholds (n_layers, 4) on |input| in GROUPS order, 0 for dense."""
        self.threshold = {id(w): np.float32(thresholds[i][g]) for i, g, w in unit_weights(layers)}

    def __call__(self, w, x: np.ndarray) -> np.ndarray:
        assert x.shape[0] == 1, "decode: one token"
        thr = self.threshold.get(id(w), np.float32(0.0))
        if thr > 0 and isinstance(w, Q4CWeight):
            return w.matvec_sparse(np.ascontiguousarray(x[0]), thr, np.empty(w.shape[0], np.float32))[None, :]
        return w.matmul(mask_rows(x, float(thr)))


class InputSparseDecode(LayerStack):
    """The one-token layer-by-layer stack (attention, dense FFN) with every linear layer's input
    thresholded (SparseInputs)."""

    kind = "input-sparse"

    def __init__(self, config, layers, thresholds):
        thresholds = np.asarray(thresholds, dtype=np.float64)
        inputs = SparseInputs(layers, thresholds)
        ffns = [DenseFFN(lw, config.act_kind, inputs) for lw in layers]
        super().__init__(config, layers, ffns, batched=False, matmul=inputs)
        self.thresholds = thresholds

    def layer_descriptions(self):
        out = []
        for i, (lw, row) in enumerate(zip(self.layers, self.thresholds)):
            parts = []
            for group, thr in zip(GROUPS, row):
                if thr <= 0:
                    continue
                kernel = all(isinstance(w, Q4CWeight) for w in group_weights(lw, group))
                parts.append(f"{group} |x|>={thr:.3g}" + ("" if kernel else " (masked, dense kernel)"))
            out.append((i, f"input-sparse ({', '.join(parts)}), attention and FFN dense" if parts
                        else "attention dense, FFN dense (no input threshold)"))
        return out
