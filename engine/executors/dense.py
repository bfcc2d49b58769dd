"""The dense FFN executor: every neuron, gate|up as one matmul where the layout fused them, the gated
activation, then down. One token goes through the matvec kernels, several through the prefill engine's
matmul (engine/executors/prefill.py).

`observe` wraps it for measurement: the planner's activation statistics (planner/model_profile.py)
and the oracle thresholds of sparse decode see each layer's FFN input and activations through it.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from engine.executors import prefill
from engine.executors.base import Executor
from kernels.activation import glu


class DenseFFN(Executor):
    kind = "dense"

    def __init__(self, lw, act_kind: int, matmul: Callable = prefill.f32):
        """matmul(weight, x): the prefill engine's product for several tokens (engine/executors/prefill.py)."""
        self.lw = lw
        self.act = act_kind
        self.ffn_size = lw.w_down.shape[1]
        self.matmul = matmul

    def gate_up(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """h (n, hidden) f32 -> gate, up (n, ffn) f32 before the activation."""
        lw, f = self.lw, self.ffn_size
        if lw.w_gate_up is not None:
            gu = self.matmul(lw.w_gate_up, h)                            # (n, 2*ffn) f32
            return gu[:, :f], gu[:, f:]
        return self.matmul(lw.w_gate, h), self.matmul(lw.w_up, h)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        gate, up = self.gate_up(h)
        glu(gate, up, self.act, gate)
        return self.matmul(self.lw.w_down, gate)                         # (n, hidden) f32


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
        return self.matmul(self.lw.w_down, act)
