"""Gated FFN activations: out = act(gate) * up, or dReLU's relu(gate) * relu(up).

kind: 0 silu, 1 gelu (erf), 2 gelu (tanh approximation), 3 relu, 4 dReLU (TurboSparse / Bamboo:
ReLU on both gate and up, arXiv 2406.05955).
"""

import math

import numpy as np

from kernels.backend import NUMBA, jit

if NUMBA:
    from numba import prange


SILU, GELU, GELU_TANH, RELU, DRELU = 0, 1, 2, 3, 4

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _erf_numpy(x):
    # numpy has no erf; math.erf per element is exact and only used on the numpy path.
    return np.vectorize(math.erf, otypes=[np.float64])(x)


def glu_numpy(gate, up, kind, out):
    """gate, up (n, ffn) f32, kind int -> out (n, ffn) f32 (may alias gate)."""
    g = gate.astype(np.float64)
    if kind == SILU:
        a = g / (1.0 + np.exp(-g))
    elif kind == GELU:
        a = 0.5 * g * (1.0 + _erf_numpy(g / math.sqrt(2.0)))
    elif kind == GELU_TANH:
        a = 0.5 * g * (1.0 + np.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g**3)))
    elif kind == RELU:
        a = np.maximum(g, 0.0)
    elif kind == DRELU:
        out[:] = np.maximum(gate, 0.0) * np.maximum(up, 0.0)
        return out
    else:
        raise ValueError(f"unknown activation kind {kind}")
    out[:] = a.astype(np.float32) * up
    return out


@jit()
def act_scalar(g, u, kind):
    """act(g) * u for one neuron, in float64 then rounded like glu_numpy: shared by _glu_numba and the
    sparse FFN kernels (kernels/sparse_ffn.py), so sparse and dense round alike."""
    g = np.float64(g)
    if kind == 0:
        a = g / (1.0 + math.exp(-g))
    elif kind == 1:
        a = 0.5 * g * (1.0 + math.erf(g / math.sqrt(2.0)))
    elif kind == 2:
        a = 0.5 * g * (1.0 + math.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)))
    elif kind == 3:
        a = g if g > 0.0 else 0.0
    else:
        a = g if g > 0.0 else 0.0
        u = u if u > 0.0 else np.float32(0.0)
    return np.float32(a) * u


@jit(inline=True)
def _glu_row(g, u, kind, o):
    """One token's row: g, u, o (ffn,) f32."""
    for k in range(g.shape[0]):
        o[k] = act_scalar(g[k], u[k], kind)


@jit(parallel=False)
def _glu_row_numba(gate, up, kind, out):
    """One token: tiny work, which a parallel launch (~3 us) would cost more than it saves."""
    for i in range(gate.shape[0]):
        _glu_row(gate[i], up[i], kind, out[i])
    return out


@jit(parallel=True)
def _glu_rows_numba(gate, up, kind, out):
    """Several tokens (prefill): rows in parallel."""
    for i in prange(gate.shape[0]):
        _glu_row(gate[i], up[i], kind, out[i])
    return out


def _glu_numba(gate, up, kind, out):
    return (_glu_row_numba if gate.shape[0] == 1 else _glu_rows_numba)(gate, up, kind, out)


glu = _glu_numba if NUMBA else glu_numpy
