"""The one-region decode: every layer of one token in one numba parallel region
(kernels/decode_token.py explains why one region beats a kernel launch per matrix).

It runs the decode of models whose layers are all dense, in the Q4, Q5, Q6, 32-block I8 or 2:4 layouts (at most two
per matrix group across layers), without biases and with the same shapes (engine/model/layout.py stacks
them), when numba is on; with q/k norms, output norms and per-layer windows and RoPE (Gemma 3) or not.
"""

from __future__ import annotations

import numpy as np

from engine.executors.base import Executor
from kernels.decode_token import counters_for, decode_token

AVAILABLE = decode_token is not None


class OneRegionDecode(Executor):
    kind = "one region per token"

    def __init__(self, config, stacks):
        """stacks: engine/model/layout.stack_layers's OneRegionStacks."""
        c = config
        self.config = c
        self.stacks = stacks.arrays()
        self.rope_kind = np.array(c.layer_rope, np.int64)          # (L,) each layer's row of cos/sin
        self.windows = np.array(c.layer_window, np.int64)          # (L,) each layer's window, 0 for none
        L, hidden, ffn = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        # Each layer's outputs have their own rows (kernels/decode_token.py explains why).
        self.out = (np.empty((L, hq + 2 * hkv), np.float32), np.empty((L, 1, c.num_attention_heads, c.head_dim),
                    np.float32), np.empty((L, hidden), np.float32), np.empty((L, ffn), np.float32),
                    np.empty((L, hidden), np.float32))
        self.scratch = None
        self.work = None

    def layer_descriptions(self):
        text = "attention and FFN dense, one parallel region per token (kernels/decode_token.py)"
        return [(i, text) for i in range(self.config.num_hidden_layers)]

    def _scratch(self, threads: int, max_seq: int) -> tuple[np.ndarray, ...]:
        """Per thread (kernels/decode_token.py): residual, normed copy, rounded x (natural and rowdot
        order), its block scales and sums, attention scores; made again only when the thread count or
        the cache length grows."""
        s = self.scratch
        if s is None or s[0].shape[0] != threads or s[-1].shape[1] < max_seq:
            c = self.config
            hidden = c.hidden_size
            widest = max(hidden, c.num_attention_heads * c.head_dim, c.intermediate_size)
            self.scratch = (np.empty((threads, hidden), np.float32), np.empty((threads, hidden), np.float32),
                            np.empty((threads, widest), np.int8), np.empty((threads, widest), np.int8),
                            np.empty((threads, widest // 4), np.int32),
                            np.empty((threads, widest // 32), np.float32),
                            np.empty((threads, widest // 32), np.float32),
                            np.empty((threads, max_seq), np.float32))
            self.work = counters_for(c.num_hidden_layers, threads)     # the work counters, zeroed every token
        return self.scratch

    def run(self, x: np.ndarray, cache, start: int, cos: np.ndarray, sin: np.ndarray) -> None:
        """x (1, hidden) f32 in place; cos, sin (kinds, 1, head_dim/2) f32 for position `start`."""
        import numba

        c = self.config
        threads = numba.get_num_threads()
        scratch = self._scratch(threads, cache.max_seq)
        self.work.fill(0)
        decode_token(threads, x, *self.stacks, cache.k_all, cache.v_all, cos[:, 0], sin[:, 0], self.rope_kind,
                     self.windows, start, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.act_kind,
                     c.rms_norm_eps, c.attn_scale, self.work, *scratch, *self.out)
