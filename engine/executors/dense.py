"""The dense FFN executor: every neuron, gate|up as one matmul where the layout fused them, the gated
activation, then down. One token goes through the matvec kernels, several through BLAS tiles
(engine/model/weights.py).

`observe` wraps it for measurement: the planner's activation statistics (planner/model_profile.py)
and the oracle thresholds of sparse decode see each layer's FFN input and activations through it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from engine.executors.base import Executor
from kernels.activation import glu


class DenseFFN(Executor):
    kind = "dense"

    def __init__(self, lw, act_kind: int):
        self.lw = lw
        self.act = act_kind
        self.ffn_size = lw.w_down.shape[1]

    def gate_up(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """h (n, hidden) f32 -> gate, up (n, ffn) f32 before the activation."""
        lw, f = self.lw, self.ffn_size
        if lw.w_gate_up is not None:
            gu = lw.w_gate_up.matmul(h)                                  # (n, 2*ffn) f32
            return gu[:, :f], gu[:, f:]
        return lw.w_gate.matmul(h), lw.w_up.matmul(h)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        gate, up = self.gate_up(h)
        glu(gate, up, self.act, gate)
        return self.lw.w_down.matmul(gate)                               # (n, hidden) f32


class ObservedFFN(DenseFFN):
    """A dense FFN that hands layer `index`'s FFN input h (n, hidden) and its pre-activation gate, up
    and activation product (n, ffn), all f32 and read-only, to observer(index, h, gate, up, act)."""

    kind = "dense, observed"

    def __init__(self, lw, act_kind: int, index: int, observer: Callable):
        super().__init__(lw, act_kind)
        self.index = index
        self.observer = observer

    def __call__(self, h: np.ndarray) -> np.ndarray:
        gate, up = self.gate_up(h)
        act = np.empty_like(gate)
        glu(gate, up, self.act, act)
        self.observer(self.index, h, gate, up, act)
        return self.lw.w_down.matmul(act)
