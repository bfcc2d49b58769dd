"""The dynamic segment of the segmented neuron cache: one per FFN layer, for cold neuron bundles.

The resident segment (attention, embeddings, norms, predictors and each layer's hot neurons) is never
evicted and needs no bookkeeping: hot neurons are positions 0..H-1 of a layer (the bundle file orders
neurons hot to cold) and always live in slots 0..H-1 (engine/executors/flash_ffn.py). This file maps the cold
positions H..F-1 that are cached to the C slots of the dynamic segment, and picks victims.

Policies (PowerInfer-2 section 4.3 uses LRU for cold neurons; the other two are tried against it and
the best measured hit rate is the default: tools/bench_flash.py, BENCHMARKS.md):
- "lru"   least recently used, at token granularity (every neuron a token uses is touched at once);
- "freq"  frequency-aware: each position's access count decays by 2**(-1/half_life) per token (a
          soft window of ~half_life tokens); a miss is admitted only when its count beats the victim's,
          so a one-off cold neuron does not push out one that keeps coming back;
- "window" the same with a short half-life (8 tokens): recency-weighted frequency.
Neurons used by the current token are never evicted by it (their slots are being read).
"""

from __future__ import annotations

import numpy as np

POLICIES = ("lru", "freq", "window")
_HALF_LIFE = {"freq": 128.0, "window": 8.0}


class SegmentCache:
    def __init__(self, n_positions: int, capacity: int, policy: str = "lru"):
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r} is not one of {', '.join(POLICIES)}")
        self.capacity = int(capacity)
        self.policy = policy
        self.slot_of = np.full(n_positions, -1, dtype=np.int32)    # (F,) dynamic slot of each position, -1
        self.pos_of = np.full(self.capacity, -1, dtype=np.int32)   # (C,) position in each slot, -1 free
        self.last = np.full(self.capacity, -1, dtype=np.int64)     # (C,) token of the last use
        self.score = np.zeros(n_positions, dtype=np.float64)      # (F,) decayed access count ("freq"/"window")
        self._gain = 1.0        # scores are stored scaled by gain, which grows instead of decaying all
        self._decay = 2.0 ** (1.0 / _HALF_LIFE[policy]) if policy in _HALF_LIFE else 1.0
        self.t = 0

    def lookup(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """pos (n,) int cold positions one token needs -> (hit positions, their slots, missing positions),
        and marks the hits used by this token."""
        slots = self.slot_of[pos]
        hit = slots >= 0
        self.last[slots[hit]] = self.t
        if self._decay != 1.0:
            self.score[pos] += self._gain
        return pos[hit], slots[hit], pos[~hit]

    def admit(self, pos: np.ndarray) -> np.ndarray:
        """pos (n,) missing positions of this token -> (n,) int32 dynamic slot each was given, or -1
        when it is not cached (full of neurons this token uses, or it lost to the victim's count). The
        caller copies the bundle into the slot before the next lookup."""
        out = np.full(len(pos), -1, dtype=np.int32)
        if self.capacity == 0 or len(pos) == 0:
            return out
        free_rank = np.where(self.pos_of < 0, -np.inf, 0.0)
        if self._decay == 1.0:
            key = np.where(self.last == self.t, np.inf, self.last.astype(np.float64)) + free_rank
            want = np.arange(len(pos))
        else:
            held = self.score[np.maximum(self.pos_of, 0)]
            key = np.where(self.last == self.t, np.inf, held) + free_rank
            want = np.argsort(-self.score[pos], kind="stable")       # strongest candidates first
        k = min(len(want), self.capacity)
        victims = np.argpartition(key, k - 1)[:k] if k < self.capacity else np.arange(self.capacity)
        victims = victims[np.argsort(key[victims], kind="stable")]    # weakest first
        cand = want[:k]
        kv = key[victims]
        ok = kv < np.inf
        if self._decay != 1.0:
            ok &= (kv == -np.inf) | (self.score[pos[cand]] > kv)
        # Candidates are strongest first and victims weakest first, so the accepted pairs are a prefix.
        n = int(np.argmin(ok)) if not ok.all() else k
        cand, victims = cand[:n], victims[:n]
        old = self.pos_of[victims]
        self.slot_of[old[old >= 0]] = -1
        self.pos_of[victims] = pos[cand]
        self.slot_of[pos[cand]] = victims
        self.last[victims] = self.t
        out[cand] = victims
        return out

    def invalidate(self, pos: np.ndarray) -> None:
        """Forget these positions (admitted, but their read failed: the slots hold other bytes)."""
        slots = self.slot_of[pos]
        ok = slots >= 0
        self.pos_of[slots[ok]] = -1
        self.last[slots[ok]] = -1
        self.slot_of[pos[ok]] = -1

    def end_token(self) -> None:
        self.t += 1
        if self._decay != 1.0:
            self._gain *= self._decay
            if self._gain > 1e200:                                    # rescale before overflow
                self.score /= self._gain
                self._gain = 1.0

    @property
    def used(self) -> int:
        return int((self.pos_of >= 0).sum())
