"""Preallocated per-layer KV cache.

Each layer holds k and v of shape (n_kv_heads, max_seq, head_dim) float32: heads outermost, so one
head's keys are one contiguous (positions, head_dim) matrix for the attention kernel. The buffers come
from np.zeros, whose pages the OS maps lazily: resident memory grows with the positions actually used,
not with max_seq.
"""

from __future__ import annotations

import numpy as np


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, max_seq: int, head_dim: int):
        self.max_seq = max_seq
        # (layers, n_kv_heads, max_seq, head_dim) f32 each, and per layer a view: kernels/decode_token.py
        # takes all layers in one array.
        self.k_all = np.zeros((n_layers, n_kv_heads, max_seq, head_dim), dtype=np.float32)
        self.v_all = np.zeros((n_layers, n_kv_heads, max_seq, head_dim), dtype=np.float32)
        self.k = list(self.k_all)
        self.v = list(self.v_all)
        self.length = 0  # positions 0..length-1 are filled

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (n, n_kv_heads, head_dim) f32 for positions start..start+n-1."""
        n = k.shape[0]
        self.k[layer][:, start:start + n] = k.transpose(1, 0, 2)
        self.v[layer][:, start:start + n] = v.transpose(1, 0, 2)

    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        """Keep the first n positions (reuse a shared prompt prefix)."""
        self.length = min(self.length, n)
