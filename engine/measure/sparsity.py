"""What sparse decode costs and saves, measured against dense decode (behind `pocketinfer eval-sparsity`).

Sparse FFNs only run in single-token decode, so every figure here is taken by decoding one token at a
time: perplexity too (teacher-forced over non-overlapping windows, like engine/measure/perplexity.py but
token by token), so that it measures the path that actually runs.

- quality: perplexity (sparse vs dense; also dense FFNs on the unfused decode path that sparse layers
  ride on, which here already differs from the fused path by its own rounding), greedy agreement (the share of steps where sparse decode's
  argmax equals dense decode's, teacher-forced on dense's greedy continuation, plus how many leading
  tokens of a free-running greedy continuation are identical);
- sparsity and predictor quality per layer: realized sparsity (share of neurons not computed), recall
  and precision of the chosen set against the true active set (engine/executors/sparse.py, track_truth);
- speed: FFN seconds per token per layer (the predictor included) and end-to-end decode tok/s, with
  dense and sparse runs alternated (A B A B) and medians reported. Dense decode is the engine's
  default path (the fused one when the model has it).
Like the rest of the library it never prints and raises ValueError for bad arguments.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field

import numpy as np

from engine.measure.perplexity import window_nll
from engine.executors.sparse import SparseFFN


@dataclass
class LayerReport:
    layer: int
    mode: str
    sparsity: float
    recall: float | None
    precision: float | None
    ffn_ms: float          # sparse FFN per token, predictor included
    dense_ffn_ms: float    # the unfused dense FFN of the same layer per token


@dataclass
class SparsityReport:
    layers: list[LayerReport]
    sparsity: float
    recall: float | None
    precision: float | None
    ppl_dense: float
    ppl_dense_unfused: float   # dense FFNs on the unfused decode path, the one sparse layers ride on
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


def decode_nll(model, ids: np.ndarray) -> np.ndarray:
    """(len(ids)-1,) float64 NLL of ids[1:], each from a single-token decode step."""
    cache = model.new_cache(len(ids))
    logits = np.empty((len(ids), model.config.vocab_size), np.float32)
    for t, tok in enumerate(ids):
        logits[t] = model.forward(np.array([tok]), cache, all_logits=False)[0]
    return window_nll(logits, ids)


def _windows(llm, ids: list[int], ctx: int, max_windows: int) -> list[np.ndarray]:
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


def _greedy(model, prompt: list[int], n: int, sparse) -> list[int]:
    model.sparse = sparse
    cache = model.new_cache(len(prompt) + n)
    logits = model.forward(np.asarray(prompt), cache, all_logits=False)[0]
    out = []
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        logits = model.forward(np.array([tok]), cache, all_logits=False)[0]
    return out


def _agreement(model, prompt: list[int], dense_tokens: list[int], sparse) -> float:
    """Share of steps where sparse decode's argmax equals dense's, fed dense's own tokens."""
    model.sparse = sparse
    cache = model.new_cache(len(prompt) + len(dense_tokens))
    logits = model.forward(np.asarray(prompt), cache, all_logits=False)[0]
    same = 0
    for tok in dense_tokens:
        same += int(np.argmax(logits)) == tok
        logits = model.forward(np.array([tok]), cache, all_logits=False)[0]
    return same / max(1, len(dense_tokens))


def _decode_seconds(model, prompt: list[int], n: int, sparse) -> float:
    model.sparse = sparse
    cache = model.new_cache(len(prompt) + n)
    model.forward(np.asarray(prompt), cache, all_logits=False)
    tok = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model.forward(np.array([tok]), cache, all_logits=False)[0]
        tok = int(np.argmax(logits))
    return time.perf_counter() - t0


def dense_nll(model, wins: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, SparseFFN]:
    """Per-token NLL of dense decode (the fused default path) and of dense FFNs run through an executor
    (the unfused path that sparse layers ride on), and that dense-mode executor."""
    model.sparse = None
    nll_dense = np.concatenate([decode_nll(model, w) for w in wins])
    dense_exec = SparseFFN(model, ["dense"] * model.config.num_hidden_layers, run_dense=True)
    model.sparse = dense_exec
    nll_unfused = np.concatenate([decode_nll(model, w) for w in wins])
    model.sparse = None
    return nll_dense, nll_unfused, dense_exec


def sparse_quality(model, sparse: SparseFFN, wins: list[np.ndarray], prompt_ids: list[int],
                   dense_tokens: list[int]) -> tuple[np.ndarray, list, int, float]:
    """Quality of `sparse` against dense decode, untimed (the true active sets are counted, which costs a
    dense FFN per step): per-token NLL, per-layer stats of that pass, the identical greedy prefix and the
    teacher-forced greedy agreement over dense_tokens."""
    n = len(dense_tokens)
    sparse.track_truth = True
    sparse.reset_stats()
    model.sparse = sparse
    try:
        nll_sparse = np.concatenate([decode_nll(model, w) for w in wins])
    finally:
        sparse.track_truth = False
    quality_stats = [copy.copy(st) for st in sparse.stats]
    sparse_tokens = _greedy(model, prompt_ids, n, sparse)
    prefix = next((i for i, (a, b) in enumerate(zip(dense_tokens, sparse_tokens)) if a != b), n)
    agree = _agreement(model, prompt_ids, dense_tokens, sparse)
    model.sparse = None
    return nll_sparse, quality_stats, prefix, agree


def evaluate(llm, sparse: SparseFFN, text_ids: list[int], prompt_ids: list[int], *, ctx: int = 256,
             windows: int = 2, gen_tokens: int = 32, rounds: int = 3) -> SparsityReport:
    """Compare `sparse` (an executor built for llm.model) with dense decode; see the module docstring."""
    if gen_tokens < 2:
        raise ValueError(f"gen_tokens must be at least 2, got {gen_tokens}")
    if not prompt_ids:
        raise ValueError("the prompt for the greedy comparison is empty")
    model = llm.model
    if len(prompt_ids) + gen_tokens > llm.n_ctx or ctx > llm.n_ctx:
        raise ValueError(f"prompt + {gen_tokens} tokens or ctx {ctx} exceed the context of {llm.n_ctx}")
    before = model.sparse
    f = model.config.intermediate_size
    try:
        wins = _windows(llm, text_ids, ctx, windows)
        nll_dense, nll_unfused, dense_exec = dense_nll(model, wins)
        dense_tokens = _greedy(model, prompt_ids, gen_tokens, None)
        nll_sparse, quality_stats, prefix, agree = sparse_quality(model, sparse, wins, prompt_ids, dense_tokens)
        # speed: alternate dense and sparse decode; FFN times from a dense-mode executor and the sparse one
        _decode_seconds(model, prompt_ids, 2, sparse)              # warm-up (kernel compilation)
        _decode_seconds(model, prompt_ids, 2, dense_exec)
        _decode_seconds(model, prompt_ids, 2, None)
        sparse.reset_stats()
        dense_exec.reset_stats()
        t_dense, t_sparse = [], []
        for _ in range(rounds):
            t_dense.append(_decode_seconds(model, prompt_ids, gen_tokens, None))
            t_sparse.append(_decode_seconds(model, prompt_ids, gen_tokens, sparse))
            _decode_seconds(model, prompt_ids, gen_tokens, dense_exec)
    finally:
        model.sparse = before
    layers = []
    for i, (q, s, d) in enumerate(zip(quality_stats, sparse.stats, dense_exec.stats)):
        dense_ms = 1e3 * d.seconds / max(1, d.tokens)
        is_dense = sparse.layers[i].mode == "dense"     # run inline by the model, not by the executor
        layers.append(LayerReport(
            layer=i, mode=sparse.layers[i].mode, sparsity=0.0 if is_dense else q.sparsity(f),
            recall=q.hits / q.true_active if q.true_active else None,
            precision=q.hits / q.chosen if q.chosen and q.true_active else None,
            ffn_ms=dense_ms if is_dense else 1e3 * s.seconds / max(1, s.tokens), dense_ffn_ms=dense_ms))
    sparse_layers = [q for q, lay in zip(quality_stats, sparse.layers) if lay.mode != "dense"]
    hits = sum(q.hits for q in sparse_layers)
    true = sum(q.true_active for q in sparse_layers)
    chosen = sum(q.chosen for q in sparse_layers)
    tokens = max(1, quality_stats[0].tokens)
    all_chosen = sum(q.chosen if lay.mode != "dense" else tokens * f for q, lay in zip(quality_stats, sparse.layers))
    notes = []
    if any(lay.mode == "dense" for lay in sparse.layers):
        notes.append("dense layers count as 0% sparsity in the overall figure")
    return SparsityReport(
        layers=layers, sparsity=1.0 - all_chosen / (tokens * f * len(layers)),
        recall=hits / true if true else None, precision=hits / chosen if chosen and true else None,
        ppl_dense=math.exp(float(nll_dense.mean())), ppl_dense_unfused=math.exp(float(nll_unfused.mean())),
        ppl_sparse=math.exp(float(nll_sparse.mean())),
        scored_tokens=len(nll_dense), greedy_agreement=agree, greedy_prefix=prefix, greedy_tokens=gen_tokens,
        ffn_ms=sum(lr.ffn_ms for lr in layers), dense_ffn_ms=sum(lr.dense_ffn_ms for lr in layers),
        decode_tps=gen_tokens / statistics.median(t_sparse), dense_decode_tps=gen_tokens / statistics.median(t_dense),
        extra_bytes=sparse.extra_bytes, notes=notes)
