"""The layer-by-layer phase executor: for each layer, dense attention and then the layer's FFN
executor (dense, sparse or flash), one kernel call per step.

It runs every prefill (several tokens: the matmuls through the prefill engine, int8 GEMM or f32 BLAS
(engine/executors/prefill.py), attention through numpy's BLAS, which wins for many queries) and the decode of models the one-region decode cannot run, or whose
layers mix FFN executors.
"""

from __future__ import annotations

import numpy as np

from engine.executors import prefill
from engine.executors.base import Executor
from engine.threads import one_pool
from kernels.attention import attention, attention_numpy
from kernels.norm import rmsnorm
from kernels.rope import rope


class LayerStack(Executor):
    kind = "layer by layer"

    def __init__(self, config, layers, ffns: list, batched: bool, engine: str = "f32", first: int = 0,
                 matmul=None):
        """layers: the model's LayerWeights (arranged by engine/model/layout.py); ffns: one FFN
        executor per layer; batched: prefill (numpy attention) rather than single-token decode;
        engine: the prefill engine of the attention's matmuls (engine/executors/prefill.py); first: the
        model's index of layers[0] (measurement runs a suffix of the layers on a saved residual); matmul:
        matmul(weight, x) for the attention's matrices instead of the engine's (input-sparse decode)."""
        assert len(layers) == len(ffns), "one FFN executor per layer"
        self.config = config
        self.layers = layers
        self.ffns = ffns
        self.batched = batched
        self.engine = engine
        self.first = first
        self.matmul = prefill.matmul_of(engine) if matmul is None else matmul
        self.attend = attention_numpy if batched else attention
        # The pool a prefill keeps (engine/threads.one_pool): the int8 GEMM's numba threads, f32's BLAS ones.
        self.pool = ("numba" if engine == "int8" else "blas") if batched else None

    def layer_descriptions(self):
        how = f", {prefill.LABELS[self.engine]}" if self.batched else ""
        return [(i, f"attention dense, FFN {f.describe()}{how}") for i, f in enumerate(self.ffns, self.first)]

    def reports(self):
        return [c for f in self.ffns for c in f.reports()]

    def run(self, x: np.ndarray, cache, start: int, cos: np.ndarray, sin: np.ndarray) -> None:
        """x (n, hidden) f32 in place; cos, sin (kinds, n, head_dim/2) f32 for positions start..start+n-1."""
        if self.pool is None:
            self._run(x, cache, start, cos, sin)
            return
        with one_pool(self.pool):
            self._run(x, cache, start, cos, sin)

    def _run(self, x, cache, start, cos, sin) -> None:
        c = self.config
        n = x.shape[0]
        hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        h = np.empty_like(x)                                                  # (n, hidden) f32 normed x
        attn = np.empty((n, c.num_attention_heads, c.head_dim), np.float32)   # (n, heads, head_dim) f32
        # the kernels scale scores by 1/sqrt(head_dim); a model with another scale (Gemma 3's
        # query_pre_attn_scalar) gets the ratio on q
        q_scale = np.float32(c.attn_scale * c.head_dim ** 0.5)
        for i, (lw, ffn) in enumerate(zip(self.layers, self.ffns), self.first):
            rmsnorm(x, lw.attn_norm, c.rms_norm_eps, h)
            if lw.wqkv is not None:
                qkv = self.matmul(lw.wqkv, h)                                 # (n, hq + 2*hkv) f32
                q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
                for y, b in ((q, lw.bq), (k, lw.bk), (v, lw.bv)):
                    if b is not None:
                        y += b
            else:
                q, k, v = (self._linear(w, h, b) for w, b in ((lw.wq, lw.bq), (lw.wk, lw.bk), (lw.wv, lw.bv)))
            q = q.reshape(n, c.num_attention_heads, c.head_dim)
            k = k.reshape(n, c.num_key_value_heads, c.head_dim)
            v = v.reshape(n, c.num_key_value_heads, c.head_dim)
            if lw.q_norm is not None:
                q, k = self._head_norm(q, lw.q_norm), self._head_norm(k, lw.k_norm)
            if q_scale != 1.0:
                q = q * q_scale
            kind = c.layer_rope[i]
            rope(q, cos[kind], sin[kind], q)
            rope(k, cos[kind], sin[kind], k)
            cache.write(i, start, k, v)
            self.attend(q, cache.k[i], cache.v[i], start, c.layer_window[i], attn)
            o = self._linear(lw.wo, attn.reshape(n, -1), lw.bo)               # (n, hidden) f32
            if lw.post_attn_norm is not None:
                rmsnorm(o, lw.post_attn_norm, c.rms_norm_eps, o)
            x += o
            rmsnorm(x, lw.ffn_norm, c.rms_norm_eps, h)
            f = ffn(h).reshape(n, -1)                                         # (n, hidden) f32
            if lw.post_ffn_norm is not None:
                rmsnorm(f, lw.post_ffn_norm, c.rms_norm_eps, f)
            x += f

    def _head_norm(self, t: np.ndarray, w: np.ndarray) -> np.ndarray:
        """t (n, heads, head_dim) f32 -> a new (n, heads, head_dim) f32, each head RMS-normed by w (head_dim,)."""
        n, heads, hd = t.shape
        flat = t.reshape(n * heads, hd).copy()                              # (n*heads, head_dim) f32
        return rmsnorm(flat, w, self.config.rms_norm_eps, flat).reshape(n, heads, hd)

    def _linear(self, w, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
        y = self.matmul(w, x)
        if bias is not None:
            y += bias
        return y
