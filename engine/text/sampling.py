"""Token sampling: pure functions over a logits vector, plus `make_sampler` that chains them.

Every filter takes logits `(vocab,)` and returns a new array of the same shape where the dropped
tokens are `-inf`; none of them mutates its input (a no-op filter may return its input as is).
Randomness comes only from the `np.random.Generator` a sampler owns, so one seed gives one
token sequence.

The chain follows llama.cpp's default sampler order (common/sampling: penalties -> top_k ->
top_p -> min_p -> temperature -> dist): filters see temperature-1 probabilities and the
temperature only reshapes what survives them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

Sampler = Callable[[np.ndarray, Sequence[int]], int]

# top_p looks at this many of the most likely tokens first, and widens the window only when they
# hold less than top_p of the mass: an O(V) partition instead of an O(V log V) sort of 150k logits.
_TOP_P_FIRST_WINDOW = 512


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings, named and defaulted as in llama.cpp / llama-cpp-python.

    temperature 0 means greedy (argmax); top_k 0, top_p 1, min_p 0 and repeat_penalty 1 switch
    the corresponding step off. repeat_last_n is how many of the previous tokens are penalised.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self) -> None:
        # Written as `not (ok)` so that NaN fails every check.
        checks = [
            ("temperature", self.temperature, not (self.temperature >= 0), "must be >= 0 (0 = greedy)"),
            ("top_k", self.top_k, not (_is_int(self.top_k) and self.top_k >= 0), "must be an int >= 0 (0 = off)"),
            ("top_p", self.top_p, not (0 < self.top_p <= 1), "must be in (0, 1] (1 = off)"),
            ("min_p", self.min_p, not (0 <= self.min_p < 1), "must be in [0, 1) (0 = off)"),
            ("repeat_penalty", self.repeat_penalty, not (self.repeat_penalty > 0), "must be > 0 (1 = off)"),
            ("repeat_last_n", self.repeat_last_n,
             not (_is_int(self.repeat_last_n) and self.repeat_last_n >= 0), "must be an int >= 0 (0 = off)"),
            ("seed", self.seed, not (self.seed is None or (_is_int(self.seed) and self.seed >= 0)),
             "must be None or an int >= 0"),
        ]
        for name, value, bad, rule in checks:
            if bad:
                raise ValueError(f"SamplingParams.{name}={value!r} is invalid: it {rule}")
        if math.isinf(self.temperature):
            raise ValueError(f"SamplingParams.temperature={self.temperature!r} is invalid: it must be finite")


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


# ---------------------------------------------------------------------------------------------
# Logits processors: (vocab,) logits in, (vocab,) logits out
# ---------------------------------------------------------------------------------------------

def apply_repeat_penalty(logits: np.ndarray, recent_tokens: Sequence[int], penalty: float) -> np.ndarray:
    """llama.cpp's repetition penalty (CTRL paper, Keskar et al. 2019, eq. 2, made sign-aware).

    Each distinct token in `recent_tokens` has a positive logit divided by `penalty` and a
    non-positive one multiplied by it, so penalty > 1 always makes the token less likely.
    A token that appears several times is penalised once. Returns a new array.
    """
    out = np.array(logits, copy=True)
    if penalty == 1.0 or len(recent_tokens) == 0:
        return out
    ids = np.unique(np.asarray(recent_tokens, dtype=np.int64))
    if ids[0] < 0 or ids[-1] >= out.shape[-1]:
        raise ValueError(
            f"recent token ids must be in [0, {out.shape[-1]}) for this vocab, got {int(ids[0])}..{int(ids[-1])}"
        )
    vals = out[ids]
    out[ids] = np.where(vals > 0, vals / penalty, vals * penalty)
    return out


def top_k_filter(logits: np.ndarray, k: int) -> np.ndarray:
    """Keep the k largest logits. Ties with the k-th value are all kept (order-independent).

    O(V): one np.partition, no sort. k <= 0 or k >= vocab is a no-op.
    """
    vocab = logits.shape[-1]
    if k <= 0 or k >= vocab:
        return logits
    kth = np.partition(logits, vocab - k)[vocab - k]
    return np.where(logits >= kth, logits, -np.inf).astype(logits.dtype, copy=False)


def top_p_filter(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Nucleus sampling (Holtzman et al. 2019, sec. 3.1): keep the smallest set of most likely
    tokens whose probability sums to at least top_p. The most likely token is always kept.

    Only tokens still alive (finite) are considered, and only a window of the best of them is
    sorted, widened x8 until it holds top_p of the mass: after top_k this is tiny, and a peaked
    full-vocab distribution costs O(V) rather than a full sort.
    """
    if top_p >= 1.0:
        return logits
    alive, weights = _alive_weights(logits)
    target = top_p * float(np.sum(weights, dtype=np.float64))
    window = min(_TOP_P_FIRST_WINDOW, alive.size)
    while True:
        if window < alive.size:
            top = np.argpartition(-weights, window - 1)[:window]
        else:
            top = np.arange(alive.size)
        top = top[np.argsort(-weights[top], kind="stable")]
        cum = np.cumsum(weights[top], dtype=np.float64)
        if cum[-1] >= target or window == alive.size:
            # First index whose cumulative mass reaches top_p; clamp for float round-off at the end.
            n_keep = min(int(np.searchsorted(cum, target, side="left")) + 1, top.size)
            break
        window = min(window * 8, alive.size)
    keep = alive[top[:n_keep]]
    out = np.full_like(logits, -np.inf)
    out[keep] = logits[keep]
    return out


def min_p_filter(logits: np.ndarray, min_p: float) -> np.ndarray:
    """Min-p (Nguyen et al. 2024): drop tokens with p < min_p * p_max, i.e. in logit space
    logit < max_logit + log(min_p). O(V); the arg-max always survives. min_p <= 0 is a no-op.
    """
    if min_p <= 0.0:
        return logits
    threshold = np.max(logits) + math.log(min_p)
    return np.where(logits >= threshold, logits, -np.inf).astype(logits.dtype, copy=False)


def _alive_weights(logits: np.ndarray, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ids of the finite logits and their unnormalised probabilities exp((logit - max) / T), float32.

    Work is done on the survivors only: after top_k that is k values, not the vocab. The max is
    subtracted before dividing by T, so a tiny T gives 0 and -inf exponents, never inf - inf.
    exp runs in float32 (~10x faster than float64; its 1e-7 relative error does not matter for
    sampling); sums are taken in float64.
    """
    alive = np.flatnonzero(logits > -np.inf)
    vals = logits[alive].astype(np.float64)
    scaled = (vals - vals.max()) / temperature
    # exp(-200) is 0 in float32 anyway; clipping first avoids a float64 -> float32 overflow warning.
    return alive, np.exp(np.maximum(scaled, -200.0).astype(np.float32))


def softmax(logits: np.ndarray) -> np.ndarray:
    """(vocab,) float64 probabilities; -inf logits get exactly 0."""
    alive, weights = _alive_weights(logits)
    probs = np.zeros(logits.shape, dtype=np.float64)
    probs[alive] = weights / np.sum(weights, dtype=np.float64)
    return probs


# ---------------------------------------------------------------------------------------------
# Choosing the token
# ---------------------------------------------------------------------------------------------

def greedy(logits: np.ndarray) -> int:
    """Arg-max; ties go to the lowest token id (np.argmax returns the first)."""
    return int(np.argmax(logits))


def draw(logits: np.ndarray, rng: np.random.Generator, temperature: float = 1.0) -> int:
    """Sample one token id from softmax(logits / temperature) with one uniform draw (inverse CDF)."""
    alive, weights = _alive_weights(logits, temperature)
    cdf = np.cumsum(weights, dtype=np.float64)
    # side="right": the first index whose CDF exceeds u, so a zero-weight token is never chosen.
    i = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    if i >= alive.size:  # u * total rounded up onto the last CDF value
        i = int(np.flatnonzero(weights)[-1])
    return int(alive[i])


def _check_logits(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 1 or logits.size == 0:
        raise ValueError(f"logits must be a non-empty 1-D (vocab,) array, got shape {logits.shape}")
    if np.isfinite(logits).all():
        return logits
    if np.isnan(logits).any() or np.isposinf(logits).any():
        raise ValueError("logits contain NaN or +inf: the model produced invalid output (check weights/dtype)")
    if np.isneginf(logits).all():
        raise ValueError("every logit is -inf: no token can be sampled")
    return logits


def make_sampler(params: SamplingParams) -> Sampler:
    """Return `sample(logits, previous_tokens) -> token_id` that owns a Generator seeded from
    params.seed (None = fresh OS entropy). Chain: repeat penalty -> top_k -> top_p -> min_p ->
    temperature -> softmax -> draw; temperature 0 is repeat penalty -> arg-max.
    """
    rng = np.random.default_rng(params.seed)

    def sample(logits: np.ndarray, previous_tokens: Sequence[int]) -> int:
        x = _check_logits(logits)
        if params.repeat_penalty != 1.0 and params.repeat_last_n > 0:
            # Slice, don't copy: previous_tokens grows with the whole generation.
            x = apply_repeat_penalty(x, previous_tokens[-params.repeat_last_n:], params.repeat_penalty)
        if params.temperature == 0:
            return greedy(x)  # every filter keeps the arg-max, so they cannot change this
        x = top_k_filter(x, params.top_k)
        x = top_p_filter(x, params.top_p)
        x = min_p_filter(x, params.min_p)
        return draw(x, rng, params.temperature)

    return sample
