"""Per-layer input-sparsity thresholds under a quality budget (TEAL, arXiv 2408.14690, training-free
input sparsity for SwiGLU models; the numpy reference of the masks is engine/executors/input_sparse.py, the
decode that runs them engine/executors/input_sparse_decode.py).

A *unit* is one layer's group (qkv, o, gate_up, down) or the LM head. On the calibration text:
1. split the tokens: the first 2/3 (threshold split) give each unit's input magnitudes, a bounded random
   sample from which a target sparsity becomes a threshold (the quantile of |x|); the last 1/3
   (sensitivity split) is where NLL is measured, so thresholds are never scored on the text they came from;
2. sensitivity: the mean per-token KL divergence from the dense model on the sensitivity split when only
   that unit is sparsified at each of LEVELS (the layers before it run dense once,
   engine/measure/input_sparsity.residuals). KL, not the NLL change: on a few hundred tokens the NLL
   change of a small perturbation is noise that is often negative (on SmolLM2's calibration split every
   layer group sparsified alone at its planned level *lowered* the NLL by 1-7%, and the greedy spent
   those "gains": +0.5% there, +24% on held-out text). The KL is never negative, and it is the NLL
   change the model expects on its own distribution, so a budget of log(1 + P) nats reads as P;
3. greedy allocation: repeatedly take the step (unit, higher sparsity) with the most bytes saved per
   predicted KL added, the prediction being the sum of the units' own KLs (each unit's curve made
   non-decreasing and interpolated linearly on a 0.1 grid), until the prediction reaches the budget;
4. verify jointly on the sensitivity split: units interact, so the greedy runs again with the predicted
   budget rescaled by budget/measured until the measured joint KL is within the budget, keeping the
   feasible allocation that saves most (the split's NLL change is reported beside it).
Bytes per token: a unit reads its matrices' bytes, less sparsity x the share of those bytes that hold
the values (0.8 for Q4_1: 16 bytes of nibbles and 4 of f16 scale and min per block; the scales of every
block are read even when its inputs are zero).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from engine.errors import PlanError
from engine.executors.input_sparse import GROUPS, InputMask, group_weights
from engine.measure.input_sparsity import log_softmax, residuals, suffix_logits, token_kl, window_logits, window_nll
from engine.measure.perplexity import window_nll as nll_of
from engine.measure.sparsity import text_windows

# Sparsities whose KL is measured per unit; dense at the low end because the cost rises faster than
# linearly there (on SmolLM2 Q4_1 these levels, against 0.2/0.4/0.6/0.8, took the 2% plan from 0.872 to
# 0.852 of the dense bytes per token at the same held-out perplexity, for 581 s of calibration, not 485).
LEVELS = (0.1, 0.2, 0.3, 0.45, 0.6)
GRID = np.round(np.arange(0.0, 0.81, 0.1), 2)   # sparsities the greedy allocates (up to the last level)
CTX = 256                         # calibration window (tokens, BOS first)
MIN_TOKENS = 3 * 64               # 2/3 for thresholds, 1/3 for sensitivity
SAMPLE_PER_CALL = 1 << 14         # |x| values kept per unit and matmul call
MAX_BUDGET = 1.0                  # a perplexity rise above 100% is no quality budget
VERIFY_TRIES = 6


@dataclass(frozen=True)
class Allocation:
    """What a runtime executor needs: thresholds (n_layers, 4) in GROUPS order and head_threshold,
    on |input|, 0 meaning dense; the rest says what was chosen and why."""
    thresholds: np.ndarray         # (n_layers, 4) f64
    head_threshold: float
    sparsity: np.ndarray           # (n_layers, 4) f64 target sparsity (calibration quantile)
    head_sparsity: float
    budget: float                  # allowed perplexity rise, a fraction (0.02 = 2%)
    predicted_ppl_change: float    # expm1 of the sum of the units' own KLs
    measured_ppl_change: float     # expm1 of the joint KL on the calibration's sensitivity split
    split_ppl_change: float        # the measured perplexity change there (noisy; not what is budgeted)
    bytes_per_token: float         # weight bytes read per decoded token with this sparsity
    dense_bytes_per_token: float
    rationale: tuple[str, ...]

    def mask(self, layers) -> InputMask:
        return InputMask(layers, self.thresholds, self.head_threshold)

    def as_dict(self) -> dict:
        return {"groups": list(GROUPS), "thresholds": self.thresholds.tolist(), "head_threshold": self.head_threshold,
                "sparsity": self.sparsity.tolist(), "head_sparsity": self.head_sparsity, "budget": self.budget,
                "predicted_ppl_change": self.predicted_ppl_change, "measured_ppl_change": self.measured_ppl_change,
                "split_ppl_change": self.split_ppl_change,
                "bytes_per_token": self.bytes_per_token, "dense_bytes_per_token": self.dense_bytes_per_token,
                "rationale": list(self.rationale)}


@dataclass(frozen=True)
class Calibration:
    """What planning needs from the calibration text, gathered once for any number of budgets."""
    samples: list                  # per unit: sorted (k,) f32 sample of |input| on the threshold split
    levels: tuple
    delta: np.ndarray              # (units, len(levels)) f64 mean KL from dense of each unit alone
    dense_nll: float               # mean NLL on the sensitivity split
    windows: list                  # the sensitivity split's windows
    dense_logp: list               # per window (len-1, vocab) f32 dense log-probabilities
    unit_bytes: np.ndarray         # (units,) f64 weight bytes each unit reads per token
    value_share: np.ndarray        # (units,) f64 share of those bytes that hold values
    head: bool                     # whether the LM head may be sparsified
    seconds: float = 0.0

    def thresholds(self, sparsity: np.ndarray) -> np.ndarray:
        """(units,) sparsity -> (units,) thresholds, 0 where sparsity is 0."""
        return np.array([float(np.quantile(s, p)) if p > 0 else 0.0 for s, p in zip(self.samples, sparsity)])


def unit_names(n_layers: int) -> list[str]:
    return [f"layer {i} {g}" for i in range(n_layers) for g in GROUPS] + ["head"]


def unit_bytes(model) -> tuple[np.ndarray, np.ndarray]:
    """(units,) bytes of each unit's matrices and (units,) the share of them holding the values (the
    layout's first array; the rest are block scales and mins)."""
    mats = [group_weights(lw, g) for lw in model.weights.layers for g in GROUPS] + [[model.weights.lm_head]]
    total = np.array([sum(w.nbytes for w in ws) for ws in mats], np.float64)
    values = np.array([sum(w._arrays()[0].nbytes for w in ws) for ws in mats], np.float64)
    return total, values / np.maximum(total, 1)


def split_windows(llm, ids: list[int]) -> tuple[list, list]:
    """The calibration ids as windows of up to CTX tokens: the first 2/3 (thresholds), the last 1/3."""
    if len(ids) < MIN_TOKENS:
        raise PlanError(f"the calibration text has {len(ids)} tokens; give at least {MIN_TOKENS} (a few KB of text)")
    cut = 2 * len(ids) // 3

    def windows(part):
        ctx = min(CTX, len(part))
        return text_windows(llm, part, ctx, len(part) // ctx)

    return windows(ids[:cut]), windows(ids[cut:])


def calibrate(llm, text: str, head: bool = True, levels: tuple = LEVELS, seed: int = 0,
              progress: Callable[[str, int, int], None] | None = None) -> Calibration:
    """Magnitude samples and per-unit sensitivities of llm (an engine.llm.LLM) on calibration text."""
    t0 = time.perf_counter()
    model = llm.model
    fit, held = split_windows(llm, llm.tokenizer.encode(text))
    samples = magnitude_samples(model, fit, np.random.default_rng(seed))
    units = len(samples)
    active = list(range(units if head else units - 1))
    delta, dense_nll, dense_logp = sensitivities(model, held, samples, active, levels, progress)
    delta[sorted(set(range(units)) - set(active))] = np.inf
    nbytes, share = unit_bytes(model)
    return Calibration(samples, tuple(levels), delta, dense_nll, held, dense_logp, nbytes, share, head,
                       time.perf_counter() - t0)


def magnitude_samples(model, windows: list, rng: np.random.Generator) -> list[np.ndarray]:
    """Per unit, a sorted (k,) f32 random sample of |input| over the dense passes of `windows`."""
    n = model.config.num_hidden_layers
    kept = [[] for _ in range(n * len(GROUPS) + 1)]

    def observe(unit, x):
        a = np.abs(x).ravel()
        kept[unit].append(a if a.size <= SAMPLE_PER_CALL else rng.choice(a, SAMPLE_PER_CALL, replace=False))

    window_nll(model, windows, InputMask(model.weights.layers, np.zeros((n, len(GROUPS))), observer=observe))
    return [np.sort(np.concatenate(k)).astype(np.float32) for k in kept]


def sensitivities(model, windows: list, samples: list, active: list, levels: tuple, progress=None):
    """(units, levels) mean KL from dense of each active unit alone at each level's quantile threshold,
    the dense mean NLL, and per window the dense (len-1, vocab) f32 log-probabilities."""
    n = model.config.num_hidden_layers
    zero = np.zeros(len(samples))
    kl_sum = np.zeros((len(samples), len(levels)))
    dense_sum, count, dense_logp = 0.0, 0, []
    done, total = 0, len(windows) * len(active) * len(levels)
    for w in windows:
        res = residuals(model, w)
        logits = suffix_logits(model, w, res[n], n, _mask(model, zero))
        dense_sum += float(nll_of(logits, w).sum())
        dense_logp.append(log_softmax(logits))
        count += len(w) - 1
        for u in active:
            first = min(u // len(GROUPS), n)
            for j, p in enumerate(levels):
                thr = zero.copy()
                thr[u] = float(np.quantile(samples[u], p))
                logits = suffix_logits(model, w, res[first], first, _mask(model, thr))
                kl_sum[u, j] += float(token_kl(dense_logp[-1], logits).sum())
                done += 1
                if progress:
                    progress("sensitivity", done, total)
    return kl_sum / count, dense_sum / count, dense_logp


def _mask(model, thresholds: np.ndarray) -> InputMask:
    """(units,) thresholds -> the model's InputMask."""
    n = model.config.num_hidden_layers
    return InputMask(model.weights.layers, thresholds[:-1].reshape(n, len(GROUPS)), thresholds[-1])


def predicted_curves(cal: Calibration) -> np.ndarray:
    """(units, len(GRID)) predicted NLL change of each unit alone at each grid sparsity: the measured
    points made non-negative and non-decreasing, linear between them and from (0, 0)."""
    xs = np.concatenate([[0.0], cal.levels])
    out = np.empty((len(cal.delta), len(GRID)))
    for u, d in enumerate(cal.delta):
        if not np.isfinite(d).all():
            out[u] = np.where(GRID > 0, np.inf, 0.0)
            continue
        ys = np.maximum.accumulate(np.maximum(np.concatenate([[0.0], d]), 0.0))
        out[u] = np.interp(GRID, xs, ys, right=np.inf)
    return out


def greedy(cal: Calibration, nll_budget: float) -> np.ndarray:
    """(units,) grid indices: the steps with the most bytes saved per predicted NLL, within nll_budget."""
    curve = predicted_curves(cal)
    saved = cal.unit_bytes[:, None] * cal.value_share[:, None] * GRID[None, :]   # (units, grid)
    at = np.zeros(len(curve), int)
    spent = 0.0
    while True:
        cur = np.arange(len(curve)), at
        cost = curve - curve[cur][:, None]                       # (units, grid) added NLL
        gain = saved - saved[cur][:, None]
        ok = (gain > 0) & (spent + cost <= nll_budget) & np.isfinite(cost)
        if not ok.any():
            return at
        ratio = np.where(ok, gain / np.maximum(cost, 1e-9), -np.inf)
        u, k = np.unravel_index(np.argmax(ratio), ratio.shape)
        spent += cost[u, k]
        at[u] = k


def check_budget(budget: float) -> None:
    """PlanError unless budget is a perplexity rise from 0 to MAX_BUDGET (a fraction)."""
    if not (isinstance(budget, (int, float)) and math.isfinite(budget)) or budget < 0:
        raise PlanError(f"quality budget {budget!r} is not a non-negative perplexity rise; give e.g. 0.02 for 2%")
    if budget > MAX_BUDGET:
        raise PlanError(f"quality budget {budget:.0%} allows perplexity to more than double; give a fraction "
                        f"at most {MAX_BUDGET:g} (0.02 means 2%)")


def plan(llm, text: str, budget: float, head: bool = True, progress=None) -> Allocation:
    """calibrate, then allocate: the thresholds for llm under a perplexity rise of `budget`."""
    check_budget(budget)
    return allocate(llm, calibrate(llm, text, head, progress=progress), budget)


def joint_change(model, cal: Calibration, thresholds: np.ndarray) -> tuple[float, float]:
    """Mean KL from dense and NLL change on the sensitivity split with every unit at `thresholds` (units,)."""
    kl, nll, count = 0.0, 0.0, 0
    for w, lp, lg in zip(cal.windows, cal.dense_logp, window_logits(model, cal.windows, _mask(model, thresholds))):
        kl += float(token_kl(lp, lg).sum())
        nll += float(nll_of(lg, w).sum())
        count += len(w) - 1
    return kl / count, nll / count - cal.dense_nll


def allocate(llm, cal: Calibration, budget: float) -> Allocation:
    """The allocation for a perplexity rise of at most `budget` (a fraction: 0.02 = 2%) on the
    calibration's sensitivity split."""
    check_budget(budget)
    model = llm.model
    target = math.log1p(budget)
    curve = predicted_curves(cal)
    dense_bytes = float(cal.unit_bytes.sum())
    best, tried, b = None, [], target
    for _ in range(VERIFY_TRIES if target > 0 else 0):
        at = greedy(cal, b)
        if not at.any():
            break
        sparsity = GRID[at]
        thr = cal.thresholds(sparsity)
        measured, split = joint_change(model, cal, thr)
        predicted = float(curve[np.arange(len(at)), at].sum())
        tried.append(f"predicted budget {math.expm1(b):+.2%}: predicted {math.expm1(predicted):+.2%}, "
                     f"measured {math.expm1(measured):+.2%} (KL; the split's ppl {math.expm1(split):+.2%})")
        saved = float((cal.unit_bytes * cal.value_share * sparsity).sum())
        if measured <= target and (best is None or saved > best[0]):
            best = (saved, at, thr, predicted, measured, split)
        if measured <= target and measured >= 0.9 * target:
            break
        b *= min(2.0, max(0.3, target / max(measured, 1e-9)))
    n = model.config.num_hidden_layers
    names = unit_names(n)
    if best is None:
        zero = np.zeros(len(names))
        return Allocation(zero[:-1].reshape(n, len(GROUPS)), 0.0, zero[:-1].reshape(n, len(GROUPS)), 0.0, budget,
                          0.0, 0.0, 0.0, dense_bytes, dense_bytes,
                          ("dense: budget too small for any sparsity", *tried))
    saved, at, thr, predicted, measured, split = best
    sparsity = GRID[at]
    per_unit = cal.unit_bytes * cal.value_share * sparsity
    lines = [f"budget {budget:.2%}: predicted {math.expm1(predicted):+.2%}, measured {math.expm1(measured):+.2%} "
             f"(KL from dense; perplexity {math.expm1(split):+.2%}) on {sum(len(w) - 1 for w in cal.windows)} "
             "held-out calibration tokens; reads "
             f"{1 - saved / dense_bytes:.1%} of the dense bytes per token", *tried]
    for u in np.argsort(-per_unit):
        if sparsity[u] > 0:
            lines.append(f"{names[u]}: {sparsity[u]:.0%} (|x| < {thr[u]:.4g}) saves {per_unit[u] / 1024:.0f} KiB/token "
                         f"for a predicted {math.expm1(curve[u, at[u]]):+.3%}")
    return Allocation(thr[:-1].reshape(n, len(GROUPS)), float(thr[-1]), sparsity[:-1].reshape(n, len(GROUPS)),
                      float(sparsity[-1]), budget, math.expm1(predicted), math.expm1(measured), math.expm1(split),
                      dense_bytes - saved, dense_bytes, tuple(lines))
