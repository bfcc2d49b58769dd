"""Preallocated per-layer KV cache.

Each layer holds k and v of shape (n_kv_heads, max_seq, head_dim), float32 or IEEE half bits
(kernels/kv.py): heads outermost, so one head's keys are one contiguous (positions, head_dim) matrix
for the attention kernel. The buffers come
from np.zeros, whose pages the OS maps lazily: resident memory grows with the positions actually used,
not with max_seq.
"""

from __future__ import annotations

import numpy as np

from engine.memory import small_pages
from kernels.kv import to_storage


class KVCache:
    def __init__(self, n_layers: int, n_kv_heads: int, max_seq: int, head_dim: int, dtype=np.float32):
        """dtype: np.float32, or np.uint16 for IEEE half bits (kernels/kv.py; llama.cpp's default)."""
        self.max_seq = max_seq
        self.dtype = np.dtype(dtype)
        # (layers, n_kv_heads, max_seq, head_dim) of dtype each, and per layer a view: kernels/decode_token.py
        # takes all layers in one array.
        self.k_all = np.zeros((n_layers, n_kv_heads, max_seq, head_dim), dtype=self.dtype)
        self.v_all = np.zeros((n_layers, n_kv_heads, max_seq, head_dim), dtype=self.dtype)
        small_pages(self.k_all)     # grown a position at a time: no huge pages (engine/memory.py)
        small_pages(self.v_all)
        self.k = list(self.k_all)
        self.v = list(self.v_all)
        self.length = 0  # positions 0..length-1 are filled

    def write(self, layer: int, start: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v (n, n_kv_heads, head_dim) f32 for positions start..start+n-1."""
        n = k.shape[0]
        self.k[layer][:, start:start + n] = to_storage(k.transpose(1, 0, 2), self.dtype)
        self.v[layer][:, start:start + n] = to_storage(v.transpose(1, 0, 2), self.dtype)

    def reset(self) -> None:
        self.length = 0

    def truncate(self, n: int) -> None:
        """Keep the first n positions (reuse a shared prompt prefix)."""
        self.length = min(self.length, n)
