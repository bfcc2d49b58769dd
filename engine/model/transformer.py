"""The Llama-family layer stack and its forward pass (Llama, Mistral, Qwen2, Bamboo/dReLU).

forward(ids, cache) runs n new tokens at positions cache.length.. and returns their logits; it does
nothing else (no sampling, no I/O). One token takes the matvec kernels; several take tiled matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.model.config import ModelConfig
from engine.model.kv_cache import KVCache
from engine.memory import trim_heap
from engine.model.rope import cos_sin, inv_freq, position_scale
from engine.model.weights import I8Weight, Q4Weight, Weight, concat_rows
from kernels.activation import glu
from kernels.attention import attention, attention_numpy
from kernels.decode_token import counters_for, decode_token
from kernels.fused import decode_layer_q4
from kernels.norm import rmsnorm
from kernels.rope import rope


@dataclass
class LayerWeights:
    attn_norm: np.ndarray          # (hidden,) f32
    wq: Weight                     # (heads*head_dim, hidden)
    wk: Weight                     # (kv_heads*head_dim, hidden)
    wv: Weight                     # (kv_heads*head_dim, hidden)
    wo: Weight                     # (hidden, heads*head_dim)
    ffn_norm: np.ndarray           # (hidden,) f32
    w_gate: Weight                 # (ffn, hidden)
    w_up: Weight                   # (ffn, hidden)
    w_down: Weight                 # (hidden, ffn)
    bq: np.ndarray | None = None   # (heads*head_dim,) f32, Qwen2 / attention_bias
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None   # (hidden,) f32, attention_bias only
    # Set by Transformer when the layouts allow: the stacked rows of wq|wk|wv and w_gate|w_up, with
    # the separate weights turned into views of them (no extra memory).
    wqkv: Weight | None = None     # ((heads + 2*kv_heads)*head_dim, hidden)
    w_gate_up: Weight | None = None  # (2*ffn, hidden)


@dataclass
class ModelWeights:
    embed: Weight                  # (vocab, hidden)
    layers: list[LayerWeights]
    norm: np.ndarray               # (hidden,) f32
    lm_head: Weight                # (vocab, hidden); the same object as embed when tied
    rope_freq_factors: np.ndarray | None = None  # (head_dim/2,) GGUF Llama-3 divisors

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        mats = [self.embed, self.lm_head] + [getattr(lw, f) for lw in self.layers
                                              for f in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
        for w in mats:
            if w is not None and id(w) not in seen:      # FFN weights are None when they live on flash
                seen.add(id(w))
                total += w.nbytes
        return total


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, decode_stacks: bool = True):
        """decode_stacks=False: no one-call decode paths (see drop_decode_stacks), for a model whose
        sparse layers will move their gate and up into neuron records: stacking every layer's arrays
        first would put a second copy of gate|up in the load's peak memory."""
        self.config = config
        self.weights = weights
        self._freqs = inv_freq(config, weights.rope_freq_factors)
        self._pos_scale = position_scale(config)
        self._cos = self._sin = np.zeros((0, config.head_dim // 2), dtype=np.float32)  # (positions, hd/2)
        for lw in weights.layers:
            _fuse(lw)
        # One compiled call per layer for decode when every layer has the Q4 layout and no biases.
        self._fused_decode = (decode_stacks and decode_layer_q4 is not None
                              and all(_q4_layer(lw) for lw in weights.layers))
        # kernels/decode_token.py's layer arrays, when it applies: one call per token.
        self._stacked = (_stack_layers(weights.layers) if decode_stacks and decode_token is not None
                         and all(_token_layer(lw) for lw in weights.layers) else None)
        self._scratch = None
        self._token_out = self._token_scratch = None      # kernels/decode_token.py's buffers, made once
        # The KV cache's element type: np.float32, or np.uint16 for half bits (kernels/kv.py). The loader
        # picks it (engine/llm.py: half for GGUF files, as llama.cpp; float32 for HF checkpoints).
        self.kv_dtype = np.float32
        # Called as ffn_observer(layer, h, gate, up, act) with the FFN input h (n, hidden) and the
        # pre-activation gate, up and the activation product act (n, ffn), all f32 and read-only: how the
        # planner measures activation statistics. Setting it routes decode through the unfused path.
        self.ffn_observer: Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None] | None = None
        # engine.executors.sparse.SparseFFN or None: the FFN of single-token decode for the layers it handles
        # (engine/executors/sparse.py; set by engine.executors.sparse.attach). Sparse layers route decode through the unfused path.
        self.sparse = None
        # engine.executors.flash_ffn.FlashFFN or None: every FFN (decode and prefill) from the bundle file of a deploy
        # directory whose plan is below 100% (engine/executors/flash_plan.py); the FFN weights above are then None.
        self.flash = None

    def _rope_table(self, end: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin (>= end, head_dim/2) f32 for positions 0.., grown by doubling and reused."""
        if len(self._cos) < end:
            self._cos, self._sin = cos_sin(np.arange(max(end, 2 * len(self._cos))), self._freqs, self._pos_scale)
        return self._cos, self._sin

    def new_cache(self, max_seq: int) -> KVCache:
        c = self.config
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, max_seq, c.head_dim, self.kv_dtype)

    def warm_up(self) -> None:
        """Load (or compile) every kernel prefill and decode use, with a 2-token prefill and one decode
        step on a scratch cache, so that the first real request does not pay for it and the compiler's
        memory can be released afterwards (engine/memory.py)."""
        cache = self.new_cache(3)
        self.forward(np.array([0, 1]), cache, all_logits=False)
        self.forward(np.array([1]), cache, all_logits=False)

    def forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool = True) -> np.ndarray:
        """ids (n,) int token ids at positions cache.length..; returns (n, vocab) f32 logits, or
        (1, vocab) for the last token only when all_logits is False. Appends to the cache."""
        # Internal invariant (LLM checks the context length first): the numba kernels don't bounds-check,
        # so a write past the cache would corrupt memory rather than fail.
        assert cache.length + len(ids) <= cache.max_seq, "caller checks the context length"
        try:
            return self._forward(ids, cache, all_logits)
        except SystemError as e:
            # A Ctrl-C that lands inside a numba kernel comes back as "SystemError: CPUDispatcher(...)
            # returned a result with an exception set", caused by the KeyboardInterrupt. Give callers the
            # KeyboardInterrupt they expect. The cache is unchanged: its length only moves on success.
            if isinstance(e.__cause__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise

    def _decode_fused(self, token: int, cache: KVCache) -> np.ndarray:
        """One token through every layer with one numba call per layer; (1, vocab) f32 logits."""
        c = self.config
        pos = cache.length
        if self._scratch is None:
            hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
            self._scratch = (np.empty((1, c.hidden_size), np.float32), np.empty(hq + 2 * hkv, np.float32),
                             np.empty((1, c.num_attention_heads, c.head_dim), np.float32),
                             np.empty(2 * c.intermediate_size, np.float32), np.empty(c.hidden_size, np.float32))
            # Each layer's weight arguments, gathered once: per token the loop below then costs one
            # dispatch per layer and no attribute lookups.
            self._layer_args = []
            for lw in self.weights.layers:
                a, o, g, d = lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down
                self._layer_args.append((lw.attn_norm, lw.ffn_norm, c.rms_norm_eps, a.qs, a.d, a.m, o.qs, o.d, o.m,
                                         g.qs, g.d, g.m, d.qs, d.d, d.m))
        cos, sin = self._rope_table(pos + 1)
        tail = (pos, c.window, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.intermediate_size,
                c.act_kind) + self._scratch
        cos, sin = cos[pos:pos + 1], sin[pos:pos + 1]
        x = self.weights.embed.rows_f32(np.array([token]))                    # (1, hidden) f32
        for wargs, k, v in zip(self._layer_args, cache.k, cache.v):
            decode_layer_q4(x, *wargs, cos, sin, k, v, *tail)
        cache.length = pos + 1
        rmsnorm(x, self.weights.norm, c.rms_norm_eps, x)
        return self.weights.lm_head.matmul(x)

    def drop_decode_stacks(self) -> None:
        """Give up the one-call decode paths (kernels/decode_token.py, decode_layer_q4): engine/executors/sparse.py
        calls this once sparse layers have moved their gate and up rows into neuron records, which those
        paths cannot read. Dense decode then runs layer by layer, as it does beside sparse layers anyway.
        The dense layers' gate|up, views of one array stacked over every layer, become their own arrays,
        so that the stack is freed: the moved layers' rows in it are no longer used."""
        had_stacks = self._stacked is not None
        self._stacked = None
        self._fused_decode = False
        self._scratch = self._layer_args = None
        self._token_out = self._token_scratch = None
        if not had_stacks:
            return
        for lw in self.weights.layers:
            w = lw.w_gate_up
            if w is not None and any(a.base is not None for a in w._arrays()):
                lw.w_gate_up = type(w)(*[a.copy() for a in w._arrays()])
                _split_views(lw, "w_gate_up", ("w_gate", "w_up"))

    def _decode_token(self, token: int, cache: KVCache) -> np.ndarray:
        """kernels/decode_token.py: one parallel region for all layers; (1, vocab) f32 logits."""
        x = self.token_layers(token, cache)
        h = np.empty_like(x)
        rmsnorm(x, self.weights.norm, self.config.rms_norm_eps, h)
        return self.weights.lm_head.matmul(h)

    def token_layers(self, token: int, cache: KVCache) -> np.ndarray:
        """The embedding row and every layer for one token in one kernel call (kernels/decode_token.py);
        (1, hidden) f32, reused by the next call. Appends to the cache. tools/profile_decode.py times it."""
        import numba

        c = self.config
        pos = cache.length
        threads = numba.get_num_threads()
        L, hidden, ffn = c.num_hidden_layers, c.hidden_size, c.intermediate_size
        hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        if self._token_out is None:
            # Each layer's outputs have their own rows (kernels/decode_token.py explains why).
            self._token_out = (np.empty((L, hq + 2 * hkv), np.float32), np.empty((L, 1, c.num_attention_heads,
                               c.head_dim), np.float32), np.empty((L, hidden), np.float32),
                               np.empty((L, ffn), np.float32), np.empty((L, hidden), np.float32))
            self._token_x = np.empty((1, hidden), np.float32)           # (1, hidden) f32 the token's state
        widest = max(hidden, hq, ffn)
        scratch = self._token_scratch
        if scratch is None or scratch[0].shape[0] != threads or scratch[-1].shape[1] < cache.max_seq:
            # Per thread (kernels/decode_token.py): residual, normed copy, rounded x (natural and rowdot
            # order), its block scales and sums, attention scores.
            scratch = self._token_scratch = (
                np.empty((threads, hidden), np.float32), np.empty((threads, hidden), np.float32),
                np.empty((threads, widest), np.int8), np.empty((threads, widest), np.int8),
                np.empty((threads, widest // 4), np.int32),
                np.empty((threads, widest // 32), np.float32), np.empty((threads, widest // 32), np.float32),
                np.empty((threads, cache.max_seq), np.float32))
            self._token_counters = counters_for(L, threads)   # the work counters, zeroed every token
        counters = self._token_counters
        counters.fill(0)
        cos, sin = self._rope_table(pos + 1)
        x = self._token_x
        x[:] = self.weights.embed.rows_f32(np.array([token]))
        decode_token(threads, x, *self._stacked, cache.k_all, cache.v_all, cos[pos:pos + 1], sin[pos:pos + 1], pos,
                     c.window, c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.act_kind,
                     c.rms_norm_eps, counters, *scratch, *self._token_out)
        cache.length = pos + 1
        return x

    def _forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
        if len(ids) == 1 and self.ffn_observer is None and self.sparse is None and self.flash is None:
            if self._stacked is not None:
                return self._decode_token(int(ids[0]), cache)
            if self._fused_decode:
                return self._decode_fused(int(ids[0]), cache)
        c = self.config
        ids = np.asarray(ids, dtype=np.int64)
        n = len(ids)
        start = cache.length
        cos, sin = self._rope_table(start + n)
        cos, sin = cos[start:start + n], sin[start:start + n]
        hq, hkv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        x = self.weights.embed.rows_f32(ids)                                # (n, hidden) f32
        h = np.empty_like(x)
        attn = np.empty((n, c.num_attention_heads, c.head_dim), dtype=np.float32)
        attend = attention if n == 1 else attention_numpy                   # BLAS wins for many queries
        for i, lw in enumerate(self.weights.layers):
            rmsnorm(x, lw.attn_norm, c.rms_norm_eps, h)
            if lw.wqkv is not None:
                qkv = lw.wqkv.matmul(h)                                      # (n, hq + 2*hkv) f32
                q, k, v = qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:]
                for y, b in ((q, lw.bq), (k, lw.bk), (v, lw.bv)):
                    if b is not None:
                        y += b
            else:
                q, k, v = _linear(lw.wq, h, lw.bq), _linear(lw.wk, h, lw.bk), _linear(lw.wv, h, lw.bv)
            q = q.reshape(n, c.num_attention_heads, c.head_dim)
            k = k.reshape(n, c.num_key_value_heads, c.head_dim)
            v = v.reshape(n, c.num_key_value_heads, c.head_dim)
            rope(q, cos, sin, q)
            rope(k, cos, sin, k)
            cache.write(i, start, k, v)
            attend(q, cache.k[i], cache.v[i], start, c.window, attn)
            x += _linear(lw.wo, attn.reshape(n, -1), lw.bo)
            rmsnorm(x, lw.ffn_norm, c.rms_norm_eps, h)
            if self.flash is not None:
                x += self.flash.ffn(i, h[0]) if n == 1 else self.flash.ffn_batch(i, h)
                continue
            if n == 1 and self.sparse is not None and self.ffn_observer is None and self.sparse.handles(i):
                x[0] += self.sparse.ffn(i, h[0])
                continue
            if lw.w_gate_up is not None:
                gu = lw.w_gate_up.matmul(h)                                  # (n, 2*ffn) f32
                gate, up = gu[:, :c.intermediate_size], gu[:, c.intermediate_size:]
            else:
                gate, up = lw.w_gate.matmul(h), lw.w_up.matmul(h)            # (n, ffn) f32 each
            if self.ffn_observer is not None:
                pre_gate = gate.copy()
                glu(gate, up, c.act_kind, gate)
                self.ffn_observer(i, h, pre_gate, up, gate)
            else:
                glu(gate, up, c.act_kind, gate)
            x += lw.w_down.matmul(gate)
        cache.length = start + n
        if not all_logits:
            x = x[-1:]
        rmsnorm(x, self.weights.norm, c.rms_norm_eps, x)
        logits = self.weights.lm_head.matmul(np.ascontiguousarray(x))
        if n > 1:
            # The layers' temporaries (under engine/memory.py's mmap threshold) stay on glibc's heap
            # otherwise: +12 MiB after a 128-token prompt on SmolLM2. A trim costs well under 1 ms.
            trim_heap()
        return logits


def _token_layer(lw: LayerWeights) -> bool:
    """Whether kernels/decode_token.py runs this layer: Q4 or 32-block I8 matrices, no biases."""
    mats = (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)
    return (all(isinstance(w, Q4Weight) or (isinstance(w, I8Weight) and w.q.shape[1] == 32 * w.d.shape[1])
                for w in mats) and all(b is None for b in (lw.bq, lw.bk, lw.bv, lw.bo)))


def _q4_layer(lw: LayerWeights) -> bool:
    mats = (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down)
    return all(isinstance(w, Q4Weight) for w in mats) and all(b is None for b in (lw.bq, lw.bk, lw.bv, lw.bo))


_FUSED = (("wqkv", ("wq", "wk", "wv")), ("w_gate_up", ("w_gate", "w_up")))
_TOKEN_MATS = ("wqkv", "wo", "w_gate_up", "w_down")   # kernels/decode_token.py's matrices, in its order


def _fuse(lw: LayerWeights) -> None:
    """Stack wq|wk|wv and w_gate|w_up into one weight each where their layouts match, and make the
    separate weights views into the stack so memory is not duplicated."""
    for fused_name, names in _FUSED:
        parts = [getattr(lw, n) for n in names]
        if any(w is None for w in parts):     # left on flash by a deploy's plan (engine/executors/flash_plan.py)
            continue
        fused = concat_rows(parts)
        if fused is None:
            continue
        setattr(lw, fused_name, fused)
        _split_views(lw, fused_name, names)


def _split_views(lw: LayerWeights, fused_name: str, names: tuple[str, ...]) -> None:
    """The separate weights `names` as row views of the fused one, in order."""
    fused, r0 = getattr(lw, fused_name), 0
    for n in names:
        rows = getattr(lw, n).shape[0]
        setattr(lw, n, fused.row_slice(r0, r0 + rows))
        r0 += rows


def _stack_layers(layers: list[LayerWeights]) -> tuple[np.ndarray, ...] | None:
    """Every layer's norms and Q4 arrays of q|k|v, o, gate|up and down in one (layers, ...) array per
    field, the layers' weights turned into views of them; None (nothing changed) unless every layer
    has the same shapes and dtypes. kernels/decode_token.py walks the layers by index in one call;
    arrays passed one by one would cost ~450 unboxings per token, numba's typed lists ~50 MiB of
    compiler memory at load. Layer by layer, so the copy adds one layer to the peak."""
    def sig(lw):
        return [(a.shape, a.dtype) for f in _TOKEN_MATS for a in getattr(lw, f)._arrays()]

    if len({str(sig(lw)) for lw in layers}) != 1:
        return None
    L = len(layers)
    norms = (np.stack([lw.attn_norm for lw in layers]), np.stack([lw.ffn_norm for lw in layers]))
    stacks = [np.empty((L,) + a.shape, a.dtype) for f in _TOKEN_MATS for a in getattr(layers[0], f)._arrays()]
    for i, lw in enumerate(layers):
        lw.attn_norm, lw.ffn_norm = norms[0][i], norms[1][i]
        k = 0
        for f in _TOKEN_MATS:
            w = getattr(lw, f)
            parts = []
            for a in w._arrays():
                stacks[k][i] = a
                parts.append(stacks[k][i])
                k += 1
            setattr(lw, f, type(w)(*parts))
        for fused_name, names in _FUSED:       # drop the views of the old arrays, freeing them
            _split_views(lw, fused_name, names)
        trim_heap()     # glibc keeps freed blocks of these sizes on its heap: give each layer's back now
    return norms + tuple(stacks)


def _linear(w: Weight, x: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    y = w.matmul(x)
    if bias is not None:
        y += bias
    return y
