"""The Llama-family model (Llama, Mistral, Qwen2/3, Phi-3, Gemma 3, Bamboo/dReLU): its weights, and the
forward pass embedding -> layers -> final norm -> LM head, the layers run by the executors chosen at load
(engine/executors/choose.py). What a family adds to the Llama layer (q/k norms, norms around the
attention and FFN outputs, per-layer windows and RoPE bases) is in the config (engine/model/config.py).

forward(ids, cache) runs n new tokens at positions cache.length.. and returns their logits; it does
nothing else (no sampling, no I/O) and asks nothing about the executors: one token is the decode phase,
several the prefill phase.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from engine.executors.base import Executors
from engine.memory import trim_heap
from engine.model.config import ModelConfig
from engine.model.kv_cache import KVCache
from engine.model.rope import RopeTable
from engine.model.weights import Weight
from kernels.norm import rmsnorm


@dataclass
class LayerWeights:
    attn_norm: np.ndarray          # (hidden,) f32
    wq: Weight                     # (heads*head_dim, hidden)
    wk: Weight                     # (kv_heads*head_dim, hidden)
    wv: Weight                     # (kv_heads*head_dim, hidden)
    wo: Weight                     # (hidden, heads*head_dim)
    ffn_norm: np.ndarray           # (hidden,) f32
    w_gate: Weight                 # (ffn, hidden); None when the FFN runs from flash
    w_up: Weight                   # (ffn, hidden)
    w_down: Weight                 # (hidden, ffn)
    bq: np.ndarray | None = None   # (heads*head_dim,) f32, Qwen2 / attention_bias
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None   # (hidden,) f32, attention_bias only
    q_norm: np.ndarray | None = None   # (head_dim,) f32, RMSNorm of each q head (config.qk_norm)
    k_norm: np.ndarray | None = None   # (head_dim,) f32, of each k head
    post_attn_norm: np.ndarray | None = None  # (hidden,) f32, RMSNorm of the attention output (config.sandwich_norms)
    post_ffn_norm: np.ndarray | None = None   # (hidden,) f32, of the FFN output
    # engine/model/layout.fuse: the stacked rows of wq|wk|wv and w_gate|w_up where their layouts match,
    # the separate weights then row views of them (no extra memory).
    wqkv: Weight | None = None     # ((heads + 2*kv_heads)*head_dim, hidden)
    w_gate_up: Weight | None = None  # (2*ffn, hidden)


@dataclass
class ModelWeights:
    embed: Weight                  # (vocab, hidden); MappedRows for an untied GGUF table (only looked up)
    layers: list[LayerWeights]
    norm: np.ndarray               # (hidden,) f32
    lm_head: Weight                # (vocab, hidden); the same object as embed when tied
    rope_freq_factors: np.ndarray | None = None  # (head_dim/2,) GGUF Llama-3 divisors

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        mats = [self.embed, self.lm_head]
        for lw in self.layers:
            # a fused weight's parts are row views of it, or None once it is stored column by column
            mats += [lw.wqkv] if lw.wqkv is not None else [lw.wq, lw.wk, lw.wv]
            mats += [lw.wo, lw.w_down]
            mats += [lw.w_gate_up] if lw.w_gate_up is not None else [lw.w_gate, lw.w_up]
        for w in mats:
            if w is not None and id(w) not in seen:      # FFN weights are None when they live on flash
                seen.add(id(w))
                total += w.nbytes
        return total


class Transformer:
    def __init__(self, config: ModelConfig, weights: ModelWeights, executors: Executors, kv_dtype=np.float32):
        """kv_dtype: the KV cache's element, np.float32 or np.uint16 for half bits (kernels/kv.py)."""
        self.config = config
        self.weights = weights
        self.executors = executors
        self.kv_dtype = kv_dtype
        self.rope = RopeTable(config, weights.rope_freq_factors)
        # One forward pass at a time: the executors keep scratch buffers, and numba's workqueue threading
        # layer aborts on parallel regions launched from two threads. Conversations (LLM.session) on
        # several threads interleave their passes token by token.
        self._forward_lock = threading.Lock()

    def describe(self) -> str:
        return self.executors.describe()

    @contextmanager
    def running(self, executors: Executors):
        """Run the model with other executors inside the block (measurement: engine/measure/)."""
        chosen, self.executors = self.executors, executors
        try:
            yield self
        finally:
            self.executors = chosen

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
            with self._forward_lock:
                return self._forward(np.asarray(ids, dtype=np.int64), cache, all_logits)
        except SystemError as e:
            # A Ctrl-C that lands inside a numba kernel comes back as "SystemError: CPUDispatcher(...)
            # returned a result with an exception set", caused by the KeyboardInterrupt. Give callers the
            # KeyboardInterrupt they expect. The cache is unchanged: its length only moves on success.
            if isinstance(e.__cause__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int -> (n, hidden) f32: the residual stream entering the first layer."""
        x = self.weights.embed.rows_f32(ids)                                 # (n, hidden) f32
        if self.config.embed_scale != 1.0:
            x *= np.float32(self.config.embed_scale)
        return x

    def head(self, x: np.ndarray) -> np.ndarray:
        """x (n, hidden) f32, the last layer's output (normed in place) -> (n, vocab) f32 logits."""
        c = self.config
        rmsnorm(x, self.weights.norm, c.rms_norm_eps, x)
        logits = self.weights.lm_head.matmul(np.ascontiguousarray(x))        # (n, vocab) f32
        if c.final_logit_softcapping:
            cap = np.float32(c.final_logit_softcapping)
            np.tanh(logits / cap, out=logits)
            logits *= cap
        return logits

    def _forward(self, ids: np.ndarray, cache: KVCache, all_logits: bool) -> np.ndarray:
        n, start = len(ids), cache.length
        phase = self.executors.decode if n == 1 else self.executors.prefill
        x = self.embed(ids)                                                  # (n, hidden) f32
        cos, sin = self.rope.table(start, n)                                 # (kinds, n, head_dim/2) f32 each
        phase.run(x, cache, start, cos, sin)
        cache.length = start + n
        logits = self.head(x if all_logits else x[-1:])                      # (n or 1, vocab) f32
        if n > 1:
            # The layers' temporaries (under engine/memory.py's mmap threshold) stay on glibc's heap
            # otherwise: +12 MiB after a 128-token prompt on SmolLM2. A trim costs well under 1 ms.
            trim_heap()
        return logits


def build(config: ModelConfig, weights: ModelWeights, plan, kv_dtype=np.float32) -> Transformer:
    """The model with the executors `plan` asks for (engine/executors/choose.py), weights arranged."""
    from engine.executors.choose import choose

    return Transformer(config, weights, choose(config, weights, plan), kv_dtype)
