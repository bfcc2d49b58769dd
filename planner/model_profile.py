"""The model profile: FFN activation statistics from calibration text run through the engine.

The engine's observed FFN executors (engine.executors.choose.observing) hand over, per layer and chunk
of tokens, the FFN input h and the pre-activation gate, up and the product act = act_fn(gate) * up
(what the down projection reads).
From them, per layer and neuron:
- activation frequency (|act| above the layer's label threshold) and magnitude (mean and max |act|);
- how often gate, up and down co-activate: gate "on" when |act_fn(gate)| is above its own per-layer
  threshold at the label's sparsity, up likewise, down when act is active (column j of down is read
  exactly when act_j is kept);
- the sparsity obtained at candidate thresholds, with the share of the activations' energy (sum of
  act^2) that thresholding drops, the quality proxy the solver uses.
It also keeps the traces (h and the active masks) that predictor training and the cache replay need.

Label threshold (what "active" means). ReLU-family layers have exact zeros: active = nonzero, free.
Otherwise the threshold is the largest candidate sparsity whose dropped energy stays within
MAX_DROPPED_ENERGY (see below).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import PlanError

DEFAULT_CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration.txt"
CANDIDATE_SPARSITIES = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
CHUNK_TOKENS = 128          # tokens per forward pass (each chunk starts a fresh KV cache)
MIN_TOKENS = 64
MAX_TOKENS = 1024
TRACE_CAP_BYTES = 256 << 20  # f16 traces of h and |act| together stay below this
COACT_TOKENS = 256           # tokens whose gate/up magnitudes are kept for the co-activation rates
# Quality floor, derived from DESIGN.md's measurement on SmolLM2-135M: thresholding |silu(gate)*up| per
# layer at 50% sparsity costs +3% perplexity. Perplexity's rise is close to linear in the dropped energy
# for small perturbations, so +2% (the quality floor) allows 2/3 of the energy that 50% drops there;
# MEASURED_E50 is that energy share, measured by this module on the shipped calibration text.
MEASURED_E50 = 0.0199   # mean over SmolLM2-135M-Instruct Q4_1's 30 layers, 1536 calibration tokens
MAX_DROPPED_ENERGY = MEASURED_E50 * 2.0 / 3.0
EXACT_ZERO_MIN = 0.3         # a layer with this share of exact zeros is treated as ReLU-sparse


@dataclass(frozen=True)
class ThresholdPoint:
    sparsity: float          # fraction of (token, neuron) activations at or below the threshold
    threshold: float         # on |act|
    dropped_energy: float    # per token, sum of dropped act^2 / sum of act^2; mean over tokens


@dataclass(frozen=True)
class LayerStats:
    freq: np.ndarray         # (ffn,) f32 share of tokens with |act| > label_threshold
    mean_abs: np.ndarray     # (ffn,) f32 mean |act|
    max_abs: np.ndarray      # (ffn,) f32 max |act|
    gate_freq: np.ndarray    # (ffn,) f32 share of tokens with gate on
    up_freq: np.ndarray      # (ffn,) f32 share of tokens with up on
    gate_up_freq: np.ndarray  # (ffn,) f32 share of tokens with gate and up both on
    coactivation: dict       # layer rates: P(gate&up), P(down|gate), P(down|up), P(gate|down), P(up|down)
    candidates: tuple[ThresholdPoint, ...]
    exact_zero: float        # share of activations exactly 0
    label_threshold: float
    label_sparsity: float
    label_dropped_energy: float


@dataclass(frozen=True)
class ModelProfile:
    n_tokens: int
    hidden: int
    ffn: int
    layers: tuple[LayerStats, ...]
    h: np.ndarray            # (layers, n_tokens, hidden) f16 FFN inputs (after the FFN norm)
    active: np.ndarray       # (layers, n_tokens, ffn) bool |act| > label threshold
    act_abs: np.ndarray      # (layers, n_tokens, ffn) f16 |act|, for re-labelling at other thresholds
    chunk_ids: np.ndarray    # (n_tokens,) int32 which calibration chunk each token came from


def read_calibration(path: str | os.PathLike | None) -> str:
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the calibration text ({getattr(e, 'strerror', None) or e})") from None
    if not text.strip():
        raise PlanError(f"{path}: the calibration file is empty; give a few KB of text like what the model will "
                        "see (prose, code, chat)")
    return text


def calibration_ids(tokenizer, text: str, source: str, max_tokens: int) -> list[list[int]]:
    """The text as chunks of CHUNK_TOKENS ids, evenly spread over the text when it is longer than
    max_tokens (so that every kind of text in it is represented)."""
    ids = tokenizer.encode(text)
    if len(ids) < MIN_TOKENS:
        raise PlanError(f"{source}: the calibration text has {len(ids)} tokens; give at least {MIN_TOKENS} "
                        "(a few KB of text)")
    chunks = [ids[i:i + CHUNK_TOKENS] for i in range(0, len(ids), CHUNK_TOKENS)]
    chunks = [c for c in chunks if len(c) >= 8] or chunks[:1]
    keep = max(1, max_tokens // CHUNK_TOKENS)
    if len(chunks) > keep:
        pick = np.linspace(0, len(chunks) - 1, keep).round().astype(int)
        chunks = [chunks[i] for i in sorted(set(pick.tolist()))]
    return chunks


def profile_model(llm, calibration: str | os.PathLike | None = None,
                  progress: Callable[[str, int, int], None] | None = None) -> ModelProfile:
    """Run the calibration text through llm (an engine.llm.LLM) and gather the statistics."""
    from engine.executors.choose import observing
    from kernels.activation import glu

    source = str(calibration or DEFAULT_CALIBRATION)
    text = read_calibration(calibration)
    c = llm.config
    n_layers, hidden, ffn = c.num_hidden_layers, c.hidden_size, c.intermediate_size
    cap = max(MIN_TOKENS, TRACE_CAP_BYTES // (2 * n_layers * (hidden + ffn)))
    chunks = calibration_ids(llm.tokenizer, text, source, min(MAX_TOKENS, cap))
    n = sum(len(ch) for ch in chunks)
    h_tr = np.empty((n_layers, n, hidden), dtype=np.float16)          # (layers, n, hidden) f16
    act_tr = np.empty((n_layers, n, ffn), dtype=np.float16)           # (layers, n, ffn) f16 |act|
    n_co = min(n, COACT_TOKENS)
    gate_tr = np.empty((n_layers, n_co, ffn), dtype=np.float16)       # (layers, n_co, ffn) f16 |act_fn(gate)|
    up_tr = np.empty((n_layers, n_co, ffn), dtype=np.float16)         # (layers, n_co, ffn) f16 |up| (post-ReLU for dReLU)
    zeros = np.zeros(n_layers, dtype=np.int64)
    chunk_ids = np.empty(n, dtype=np.int32)
    at = [0]

    def observer(layer, h, gate, up, act):
        t0 = at[0]
        t1 = t0 + len(h)
        h_tr[layer, t0:t1] = h
        a = np.abs(act)
        zeros[layer] += int(np.count_nonzero(a == 0))
        act_tr[layer, t0:t1] = np.minimum(a, 65000.0)   # f16 overflows at 65504
        if t0 < n_co:
            k = min(t1, n_co) - t0
            ones = np.ones((k, ffn), dtype=np.float32)
            gate_tr[layer, t0:t0 + k] = np.minimum(np.abs(glu(np.ascontiguousarray(gate[:k]), ones, c.act_kind,
                                                              np.empty((k, ffn), np.float32))), 65000.0)
            up_tr[layer, t0:t0 + k] = np.minimum(np.abs(glu(ones, np.ascontiguousarray(up[:k]), c.act_kind,
                                                            np.empty((k, ffn), np.float32))), 65000.0)

    model = llm.model
    with model.running(observing(model, observer)):
        for i, ch in enumerate(chunks):
            cache = model.new_cache(len(ch))
            model.forward(np.asarray(ch), cache, all_logits=False)
            chunk_ids[at[0]:at[0] + len(ch)] = i
            at[0] += len(ch)
            if progress:
                progress("calibration", at[0], n)
    assert at[0] == n, "every calibration token was observed"

    layers, active = [], np.empty((n_layers, n, ffn), dtype=bool)
    for i in range(n_layers):
        stats = layer_stats(act_tr[i], gate_tr[i], up_tr[i], zeros[i] / (n * ffn))
        active[i] = act_tr[i] > np.float16(stats.label_threshold)
        layers.append(stats)
        if progress:
            progress("activation statistics", i + 1, n_layers)
    return ModelProfile(n_tokens=n, hidden=hidden, ffn=ffn, layers=tuple(layers), h=h_tr, active=active,
                        act_abs=act_tr, chunk_ids=chunk_ids)


def layer_stats(act_abs: np.ndarray, gate_abs: np.ndarray, up_abs: np.ndarray, exact_zero: float) -> LayerStats:
    """act_abs (n, ffn) f16 |act|; gate_abs, up_abs (n_co, ffn) f16 magnitudes of the first n_co tokens."""
    a = act_abs.astype(np.float32)                                    # (n, ffn) f32
    flat = np.sort(a, axis=None)                                      # (n*ffn,) ascending
    sq = a.astype(np.float64) ** 2                                    # (n, ffn) f64
    per_token = np.maximum(sq.sum(axis=1), 1e-30)                     # (n,) f64
    cands = []
    for s in CANDIDATE_SPARSITIES:
        k = int(s * flat.size)
        t = float(flat[k - 1]) if k else 0.0
        # Per token, then averaged: a few outlier tokens (the first of a text often has huge activations)
        # would otherwise dominate a pooled sum and hide what thresholding does to every other token.
        dropped = float(np.mean(np.where(a <= t, sq, 0.0).sum(axis=1) / per_token)) if k else 0.0
        cands.append(ThresholdPoint(s, t, dropped))
    if exact_zero >= EXACT_ZERO_MIN:
        # ReLU-sparse: active = nonzero drops nothing; the exact zeros are the label.
        label = ThresholdPoint(float(exact_zero), 0.0, 0.0)
    else:
        ok = [p for p in cands if p.dropped_energy <= MAX_DROPPED_ENERGY]
        label = ok[-1] if ok else ThresholdPoint(0.0, 0.0, 0.0)
    on = a > label.threshold                                          # (n, ffn) bool
    n_co = len(gate_abs)
    g = gate_abs.astype(np.float32)
    u = up_abs.astype(np.float32)
    if label.threshold == 0.0:
        # Exact zeros (ReLU family): on means nonzero, for gate and up as for the product.
        g_on, u_on = g > 0, u > 0
    else:
        # Otherwise on at the same sparsity as the label, so the three rates are comparable.
        g_on = g > (np.quantile(g, label.sparsity) if label.sparsity > 0 else -1.0)
        u_on = u > (np.quantile(u, label.sparsity) if label.sparsity > 0 else -1.0)
    d_on = on[:n_co]
    both = g_on & u_on

    def rate(x, given):
        return round(float(np.count_nonzero(x & given)) / max(1, int(np.count_nonzero(given))), 4)

    coact = {"gate_and_up": round(float(both.mean()), 4), "down_given_gate": rate(d_on, g_on),
             "down_given_up": rate(d_on, u_on), "gate_given_down": rate(g_on, d_on), "up_given_down": rate(u_on, d_on)}
    return LayerStats(freq=on.mean(axis=0).astype(np.float32), mean_abs=a.mean(axis=0).astype(np.float32),
                      max_abs=a.max(axis=0).astype(np.float32), gate_freq=g_on.mean(axis=0).astype(np.float32),
                      up_freq=u_on.mean(axis=0).astype(np.float32), gate_up_freq=both.mean(axis=0).astype(np.float32),
                      coactivation=coact, candidates=tuple(cands), exact_zero=float(exact_zero),
                      label_threshold=label.threshold, label_sparsity=label.sparsity,
                      label_dropped_energy=label.dropped_energy)
