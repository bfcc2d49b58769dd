"""What sparse decode costs and saves, measured against dense decode (behind `pocketinfer eval-sparsity`).

Sparse FFNs only run in single-token decode, so every figure here is taken by decoding one token at a
time: perplexity too (teacher-forced over non-overlapping windows, like engine/measure/perplexity.py
but token by token), so that it measures the path that actually runs.

- quality: perplexity (sparse vs dense; also dense FFNs run layer by layer, the path sparse layers
  ride on, which can differ from the model's own dense decode by its rounding), greedy agreement (the
  share of steps where sparse decode's argmax equals dense decode's, teacher-forced on dense's greedy
  continuation, plus how many leading tokens of a free-running greedy continuation are identical);
- sparsity and predictor quality per layer: realized sparsity (share of neurons not computed), recall
  and precision of the chosen set against the true active set (engine/executors/sparse.py, track_truth);
- speed: FFN seconds per token per layer (the predictor included) and end-to-end decode tok/s, with
  dense and sparse runs alternated (A B A B) and medians reported. Dense decode is the model's own
  decode executor.
The sparse executors come from engine.executors.sparse.decode_ffns(..., records="copy"), so that the
model's own dense path stays untouched beside them. Like the rest of the library this module never
prints and raises ValueError for bad arguments.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from engine.executors.base import Executor
from engine.executors.choose import layer_by_layer, observing
from engine.executors.dense import DenseFFN
from engine.executors.sparse import LayerStats, SparseFFN
from engine.measure.perplexity import window_nll


@dataclass
class LayerReport:
    layer: int
    mode: str
    sparsity: float
    recall: float | None
    precision: float | None
    ffn_ms: float          # sparse FFN per token, predictor included
    dense_ffn_ms: float    # the dense FFN of the same layer per token, run layer by layer


@dataclass
class SparsityReport:
    layers: list[LayerReport]
    sparsity: float
    recall: float | None
    precision: float | None
    ppl_dense: float
    ppl_dense_unfused: float   # dense FFNs run layer by layer, the path sparse layers ride on
    ppl_sparse: float
    scored_tokens: int
    greedy_agreement: float
    greedy_prefix: int
    greedy_tokens: int
    ffn_ms: float
    dense_ffn_ms: float
    decode_tps: float
    dense_decode_tps: float
    extra_bytes: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["layers"] = [lr.__dict__ for lr in self.layers]
        d["ppl_change"] = self.ppl_sparse / self.ppl_dense - 1.0
        d["ppl_change_vs_unfused"] = self.ppl_sparse / self.ppl_dense_unfused - 1.0
        return d


class Timed(Executor):
    """An FFN executor timed per call (FFN seconds per token of a dense layer)."""

    def __init__(self, ffn):
        self.ffn = ffn
        self.kind = ffn.describe()
        self.stats = LayerStats()

    def __call__(self, h):
        t0 = time.perf_counter()
        out = self.ffn(h)
        self.stats.seconds += time.perf_counter() - t0
        self.stats.tokens += 1
        return out


def oracle_thresholds(model, ids: np.ndarray, sparsity: float) -> list[float]:
    """Per-layer thresholds on |act(gate)*up| that leave `sparsity` of the neurons below them, on the
    calibration tokens `ids` (a quantile per layer; DESIGN.md: the product, not |act(gate)| alone)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"oracle sparsity must be in [0, 1), got {sparsity}")
    thr = [0.0] * model.config.num_hidden_layers

    def observe(i, h, gate, up, act):
        thr[i] = float(np.quantile(np.abs(act), sparsity)) if sparsity > 0 else -1.0

    with model.running(observing(model, observe)):
        model.forward(np.asarray(ids), model.new_cache(len(ids)))
    return thr


def decode_nll(model, ids: np.ndarray) -> np.ndarray:
    """(len(ids)-1,) float64 NLL of ids[1:], each from a single-token decode step."""
    cache = model.new_cache(len(ids))
    logits = np.empty((len(ids), model.config.vocab_size), np.float32)
    for t, tok in enumerate(ids):
        logits[t] = model.forward(np.array([tok]), cache, all_logits=False)[0]
    return window_nll(logits, ids)


def text_windows(llm, ids: list[int], ctx: int, max_windows: int) -> list[np.ndarray]:
    """Up to max_windows windows of ctx tokens of `ids`, each starting with BOS if the model adds one."""
    if ctx < 2:
        raise ValueError(f"ctx must be at least 2, got {ctx}")
    ids = np.asarray(ids, dtype=np.int64)
    bos = llm.tokenizer.bos_token_id
    n = min(len(ids) // ctx, max_windows)
    if n < 1:
        raise ValueError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}; "
                         "use a longer text or a smaller --ctx")
    out = []
    for w in range(n):
        win = ids[w * ctx:(w + 1) * ctx].copy()
        if llm.tokenizer.add_bos and bos is not None:
            win[0] = bos
        out.append(win)
    return out


def greedy(model, prompt: list[int], n: int, forced: list[int] | None = None) -> list[int]:
    """The argmax of n decode steps after `prompt`, with the executors the model runs now: each fed
    back (free-running), or, given `forced` tokens, the step's argmax with forced[i] fed instead."""
    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(np.asarray(prompt), cache, all_logits=False)[0]
    out = []
    for i in range(n):
        out.append(int(np.argmax(logits)))
        logits = model.forward(np.array([out[-1] if forced is None else forced[i]]), cache, all_logits=False)[0]
    return out


def _decode_seconds(model, prompt: list[int], n: int) -> float:
    cache = model.new_cache(len(prompt) + n)
    model.forward(np.asarray(prompt), cache, all_logits=False)
    tok = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model.forward(np.array([tok]), cache, all_logits=False)[0]
        tok = int(np.argmax(logits))
    return time.perf_counter() - t0


def dense_nll(model, wins: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[Timed]]:
    """Per-token NLL of the model's own dense decode and of dense FFNs run layer by layer (the path
    sparse layers ride on), and those timed layer-by-layer FFN executors."""
    nll_dense = np.concatenate([decode_nll(model, w) for w in wins])
    timed = [Timed(DenseFFN(lw, model.config.act_kind)) for lw in model.weights.layers]
    with model.running(layer_by_layer(model, timed)):
        nll_unfused = np.concatenate([decode_nll(model, w) for w in wins])
    return nll_dense, nll_unfused, timed


def sparse_quality(model, ffns: list, wins: list[np.ndarray], prompt_ids: list[int],
                   dense_tokens: list[int]) -> tuple[np.ndarray, list, int, float]:
    """Quality of decode through `ffns` (one executor per layer) against dense decode, untimed (the
    true active sets are counted, which costs a dense FFN per step): per-token NLL, per-layer stats of
    that pass (None for dense layers), the identical greedy prefix and the teacher-forced greedy
    agreement over dense_tokens."""
    n = len(dense_tokens)
    sparse = [f for f in ffns if isinstance(f, SparseFFN)]
    with model.running(layer_by_layer(model, ffns)):
        for f in sparse:
            f.track_truth, f.stats = True, LayerStats()
        try:
            nll_sparse = np.concatenate([decode_nll(model, w) for w in wins])
        finally:
            for f in sparse:
                f.track_truth = False
        quality_stats = [copy.copy(f.stats) if isinstance(f, SparseFFN) else None for f in ffns]
        sparse_tokens = greedy(model, prompt_ids, n)
        prefix = next((i for i, (a, b) in enumerate(zip(dense_tokens, sparse_tokens)) if a != b), n)
        forced = greedy(model, prompt_ids, n, dense_tokens)
        agree = sum(a == b for a, b in zip(forced, dense_tokens)) / max(1, n)
    return nll_sparse, quality_stats, prefix, agree


def evaluate(llm, ffns: list, text_ids: list[int], prompt_ids: list[int], *, ctx: int = 256,
             windows: int = 2, gen_tokens: int = 32, rounds: int = 3) -> SparsityReport:
    """Compare decode through `ffns` (engine.executors.sparse.decode_ffns for llm.model, records="copy")
    with dense decode; see the module docstring."""
    if gen_tokens < 2:
        raise ValueError(f"gen_tokens must be at least 2, got {gen_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt for the greedy comparison is empty")
    model = llm.model
    if len(prompt_ids) + gen_tokens > llm.n_ctx or ctx > llm.n_ctx:
        raise ValueError(f"prompt + {gen_tokens} tokens or ctx {ctx} exceed the context of {llm.n_ctx}")
    f = model.config.intermediate_size
    wins = text_windows(llm, text_ids, ctx, windows)
    nll_dense, nll_unfused, timed = dense_nll(model, wins)
    dense_tokens = greedy(model, prompt_ids, gen_tokens)
    nll_sparse, quality_stats, prefix, agree = sparse_quality(model, ffns, wins, prompt_ids, dense_tokens)
    # speed: alternate dense and sparse decode; FFN times from timed dense executors and the sparse ones
    sparse_run, timed_run = layer_by_layer(model, ffns), layer_by_layer(model, timed)
    for executors in (model.executors, sparse_run, timed_run):          # warm-up (kernel compilation)
        with model.running(executors):
            _decode_seconds(model, prompt_ids, 2)
    for ex in [f for f in ffns if isinstance(f, SparseFFN)] + timed:
        ex.stats = LayerStats()
    t_dense, t_sparse = [], []
    for _ in range(rounds):
        t_dense.append(_decode_seconds(model, prompt_ids, gen_tokens))
        with model.running(sparse_run):
            t_sparse.append(_decode_seconds(model, prompt_ids, gen_tokens))
        with model.running(timed_run):
            _decode_seconds(model, prompt_ids, gen_tokens)
    layers = []
    for i, (q, s, d) in enumerate(zip(quality_stats, ffns, timed)):
        dense_ms = 1e3 * d.stats.seconds / max(1, d.stats.tokens)
        is_dense = q is None
        layers.append(LayerReport(
            layer=i, mode="dense" if is_dense else s.mode, sparsity=0.0 if is_dense else q.sparsity(f),
            recall=None if is_dense or not q.true_active else q.hits / q.true_active,
            precision=q.hits / q.chosen if not is_dense and q.chosen and q.true_active else None,
            ffn_ms=dense_ms if is_dense else 1e3 * s.stats.seconds / max(1, s.stats.tokens), dense_ffn_ms=dense_ms))
    sparse_layers = [q for q in quality_stats if q is not None]
    hits = sum(q.hits for q in sparse_layers)
    true = sum(q.true_active for q in sparse_layers)
    chosen = sum(q.chosen for q in sparse_layers)
    tokens = sum(len(w) for w in wins)                       # decode steps of the quality pass
    all_chosen = sum(q.chosen if q is not None else tokens * f for q in quality_stats)
    notes = ["dense layers count as 0% sparsity in the overall figure"] if len(sparse_layers) < len(ffns) else []
    return SparsityReport(
        layers=layers, sparsity=1.0 - all_chosen / (tokens * f * len(layers)),
        recall=hits / true if true else None, precision=hits / chosen if chosen and true else None,
        ppl_dense=math.exp(float(nll_dense.mean())), ppl_dense_unfused=math.exp(float(nll_unfused.mean())),
        ppl_sparse=math.exp(float(nll_sparse.mean())),
        scored_tokens=len(nll_dense), greedy_agreement=agree, greedy_prefix=prefix, greedy_tokens=gen_tokens,
        ffn_ms=sum(lr.ffn_ms for lr in layers), dense_ffn_ms=sum(lr.dense_ffn_ms for lr in layers),
        decode_tps=gen_tokens / statistics.median(t_sparse), dense_decode_tps=gen_tokens / statistics.median(t_dense),
        extra_bytes=sum(f.extra_bytes for f in ffns if isinstance(f, SparseFFN)), notes=notes)
