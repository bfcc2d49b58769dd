"""Train per-layer activation predictors in numpy (no torch): a low-rank MLP from the FFN input h to the
neurons whose |act| exceeds the layer's label threshold (the format is engine/executors/predictor.py's).

Training is plain minibatch Adam (Kingma & Ba, ICLR 2015, Algorithm 1) on the mean binary
cross-entropy with logits. Inputs are standardized per feature during training and the scaling is then
folded into w1 and b1, so the saved predictor takes raw h like the runtime has it.

Calibration chunks are split three ways, chunk by chunk (tokens of one chunk share context, so
splitting inside a chunk would leak): train, a threshold set on which the score threshold is chosen as
the highest one that still meets the recall floor, and a test set on which recall and precision are
reported. Everything is seeded: the same profile gives the same predictors, bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.executors.predictor import LayerPredictor
from planner.model_profile import ModelProfile

DEFAULT_RECALL = 0.99
EPOCHS = 20
BATCH = 128
LR = 3e-3


@dataclass(frozen=True)
class PredictorReport:
    layer: int
    rank: int
    recall: float            # on the test chunks, at the chosen threshold
    precision: float
    predicted_active: float  # share of neurons predicted active per token (what sparse decode computes)
    label_active: float      # share actually active (at the label threshold)
    chance_recall: float     # recall of a random guess with the same predicted_active share
    nbytes: int


def default_rank(hidden: int) -> int:
    """hidden/16 rounded down to a power of two, within [16, 256]: SmolLM2 (576) gets 32, 7B (4096) 256.
    The predictor's bytes count against the memory budget, so it stays a few % of the FFN it guards."""
    r = max(16, min(256, hidden // 16))
    return 1 << (r.bit_length() - 1)


def split_chunks(chunk_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token masks (train, threshold, test): chunk k goes to test when k % 4 == 3, threshold when 2.
    With fewer than 4 chunks, tokens are split by position inside the chunk instead (a tiny text)."""
    k = chunk_ids % 4
    if chunk_ids.max() < 3:
        k = np.arange(len(chunk_ids)) % 4
    return (k <= 1), (k == 2), (k == 3)


def train_all(profile: ModelProfile, recall_floor: float = DEFAULT_RECALL, rank: int | None = None, seed: int = 0,
              progress: Callable[[str, int, int], None] | None = None
              ) -> tuple[dict[int, LayerPredictor], list[PredictorReport]]:
    rank = rank or default_rank(profile.hidden)
    train, thr, test = split_chunks(profile.chunk_ids)
    preds, reports = {}, []
    for i, stats in enumerate(profile.layers):
        h = profile.h[i].astype(np.float32)                       # (n, hidden) f32
        y = profile.active[i]                                     # (n, ffn) bool
        p = train_layer(h[train], y[train], rank, seed + i, stats.label_threshold)
        p = with_threshold(p, h[thr], y[thr], recall_floor)
        preds[i] = p
        reports.append(evaluate(i, p, h[test], y[test]))
        if progress:
            progress("predictors", i + 1, len(profile.layers))
    return preds, reports


def train_layer(h: np.ndarray, y: np.ndarray, rank: int, seed: int, label_threshold: float,
                epochs: int = EPOCHS) -> LayerPredictor:
    """h (n, hidden) f32, y (n, ffn) bool -> a predictor with threshold 0 (set later)."""
    rng = np.random.default_rng(seed)
    n, hidden = h.shape
    ffn = y.shape[1]
    mu = h.mean(axis=0)                                           # (hidden,) f32
    sigma = h.std(axis=0) + 1e-6                                  # (hidden,) f32
    x = (h - mu) / sigma                                          # (n, hidden) f32 standardized
    t = y.astype(np.float32)                                      # (n, ffn) f32 targets
    prior = np.clip(t.mean(axis=0), 1e-3, 1 - 1e-3)
    params = {
        "w1": (rng.standard_normal((hidden, rank)) / np.sqrt(hidden)).astype(np.float32),   # (hidden, rank)
        "b1": np.zeros(rank, dtype=np.float32),                                               # (rank,)
        "w2": (rng.standard_normal((rank, ffn)) * 0.1 / np.sqrt(rank)).astype(np.float32),    # (rank, ffn)
        "b2": np.log(prior / (1 - prior)).astype(np.float32),    # (ffn,) start at each neuron's base rate
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    b1_, b2_, eps, step = 0.9, 0.999, 1e-8, 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, BATCH):
            idx = order[s:s + BATCH]
            xb, tb = x[idx], t[idx]
            z = xb @ params["w1"] + params["b1"]                 # (b, rank)
            a = np.maximum(z, 0)
            logits = a @ params["w2"] + params["b2"]             # (b, ffn)
            # d(mean BCE)/d logits = sigmoid(logits) - target, averaged over the batch's elements
            g = (_sigmoid(logits) - tb) / (len(idx) * ffn / 64.0)  # /64: keeps gradient size sane for Adam
            grads = {"w2": a.T @ g, "b2": g.sum(axis=0)}
            ga = (g @ params["w2"].T) * (z > 0)                   # (b, rank)
            grads["w1"] = xb.T @ ga
            grads["b1"] = ga.sum(axis=0)
            step += 1
            for k in params:
                m[k] = b1_ * m[k] + (1 - b1_) * grads[k]
                v[k] = b2_ * v[k] + (1 - b2_) * grads[k] ** 2
                mhat = m[k] / (1 - b1_ ** step)
                vhat = v[k] / (1 - b2_ ** step)
                params[k] = (params[k] - LR * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)
    # Fold the standardization into the first layer: ((h - mu)/sigma) @ w1 + b1 = h @ w1' + b1'.
    w1 = (params["w1"] / sigma[:, None]).astype(np.float32)
    b1 = (params["b1"] - (mu / sigma) @ params["w1"]).astype(np.float32)
    # Quantized here (engine/executors/predictor.py), before the threshold is calibrated on its scores.
    return LayerPredictor.from_float(w1, b1, params["w2"], params["b2"], threshold=0.0,
                                     label_threshold=float(label_threshold))


def with_threshold(p: LayerPredictor, h: np.ndarray, y: np.ndarray, recall_floor: float) -> LayerPredictor:
    """The highest score threshold whose recall on (h, y) is at least recall_floor."""
    s = p.scores(h)[y]                                            # scores of the truly active neurons
    if s.size == 0:
        thr = float(np.max(p.scores(h))) if len(h) else 0.0
    else:
        # The (1 - floor) quantile of the active neurons' scores: that share of them falls below it.
        thr = float(np.quantile(s, 1.0 - recall_floor)) - 1e-6
    return dataclasses.replace(p, threshold=round(thr, 6))


def evaluate(layer: int, p: LayerPredictor, h: np.ndarray, y: np.ndarray) -> PredictorReport:
    pred = p.active(h)                                            # (n, ffn) bool
    tp = int(np.count_nonzero(pred & y))
    pos, npred = int(np.count_nonzero(y)), int(np.count_nonzero(pred))
    share = npred / max(1, pred.size)
    return PredictorReport(layer=layer, rank=p.rank, recall=tp / pos if pos else 1.0,
                           precision=tp / npred if npred else 1.0, predicted_active=share,
                           label_active=pos / max(1, y.size), chance_recall=share, nbytes=p.nbytes)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))   # overflow-free form of 1 / (1 + exp(-x))
