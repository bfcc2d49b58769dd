"""The decode-time FFN of a model larger than its memory budget: neuron bundles from flash, a segmented
neuron cache and the I/O-compute pipeline (PowerInfer-2, arXiv 2406.06282, sections 4.3-4.4).

Per layer, the neurons of the bundle file (engine/bundle_file.py, positions hot to cold) live in one
set of slot arrays, the nine kernel arrays of kernels/sparse_ffn.py with (H + C + S) rows each:
  slots [0, H)        the resident segment: the H hot neurons, read once at load, never evicted;
  slots [H, H+C)      the dynamic segment: C cold neurons cached by engine/neuron_cache.py;
  slots [H+C, H+C+S)  staging: missing bundles not admitted to the cache, for the requests in flight.
One token through a layer:
  1. the active neurons: every neuron (mode "dense"), the predictor's choice ("predicted"), or a set the
     caller gives (benchmarks);
  2. split into hot, cached (hits) and missing; the missing positions are merged into runs
     (engine/flash_reader.merge_runs) and submitted to the reader threads;
  3. the hot and cached neurons are computed (kernels/sparse_ffn: numba, nogil) while the reads are in
     flight; each request is copied into cache/staging slots and computed as it lands.
The weights' arithmetic is the sparse kernel's, whichever segment a neuron comes from; only the order in
which neuron contributions are summed changes with what is cached (float32 rounding, not the model).

Prefill (several tokens) reads every cold neuron of the layer once, in long sequential requests, and runs
tiles of neurons through BLAS (engine/weights.py layouts); it does not touch the cache.

`pipeline=False` reads synchronously after computing what is in memory, and `bundled=False` reads each
needed neuron's gate row, up row and down row with three separate requests: the ablation steps of
tools/bench_flash.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, fields

import numpy as np

from engine.bundle_file import ALIGN, FIELD_NAMES, BundleFile
from engine.errors import ConfigError
from engine.flash_reader import FlashReader, aligned_buffer, merge_runs
from engine.neuron_cache import SegmentCache
from engine.weights import BF16Weight, F16Weight, F32Weight, I8Weight, Q4Weight
from kernels.activation import glu
from kernels.backend import NUMBA
from kernels.sparse_ffn import predict, sparse_ffn

MODES = ("dense", "predicted", "given")
_EMPTY = np.zeros(0, dtype=np.float32)
_PREFILL_TILE = 256            # neurons per BLAS tile in prefill


@dataclass
class LayerPlan:
    mode: str = "dense"        # MODES
    hot: int = 0               # neurons in the resident segment
    cache: int = 0             # capacity of the dynamic segment


@dataclass
class FlashStats:
    """Counters since the last reset; decode only except `prefill_bytes`."""
    tokens: int = 0            # decode tokens (counted at layer 0)
    needed: int = 0            # neurons computed, all layers
    hot: int = 0               # ... served by the resident segment
    hits: int = 0              # ... served by the dynamic segment
    misses: int = 0            # ... read from flash
    bytes_read: int = 0        # decode bytes read from flash (aligned requests, incl. merged gaps)
    requests: int = 0
    io_wait_s: float = 0.0     # main thread blocked on reads
    io_busy_s: float = 0.0     # sum of read durations (reader threads)
    ffn_s: float = 0.0         # wall time in decode FFNs
    prefill_bytes: int = 0

    def snapshot(self) -> "FlashStats":
        return FlashStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, old: "FlashStats") -> "FlashStats":
        return FlashStats(**{f.name: getattr(self, f.name) - getattr(old, f.name) for f in fields(self)})

    def summary(self) -> dict:
        cold = self.hits + self.misses
        return {"tokens": self.tokens, "hot_hit_rate": self.hot / max(1, self.needed),
                "cache_hit_rate": self.hits / cold if cold else 1.0,
                "flash_bytes_per_token": self.bytes_read / max(1, self.tokens),
                "requests_per_token": self.requests / max(1, self.tokens),
                "io_wait_ms_per_token": 1e3 * self.io_wait_s / max(1, self.tokens),
                # The share of read time the main thread did not wait for: hidden behind compute.
                "overlap_ratio": 1.0 - min(1.0, self.io_wait_s / self.io_busy_s) if self.io_busy_s else 1.0,
                "ffn_ms_per_token": 1e3 * self.ffn_s / max(1, self.tokens)}


def _weight(w, d, m, bits16):
    """A row range of slot arrays as an engine.weights Weight (views, no copy), for prefill's BLAS tiles."""
    if w.dtype == np.float32:
        return F32Weight(w)
    if w.dtype == np.uint16:
        return (BF16Weight if bits16 else F16Weight)(w)
    return (Q4Weight if w.dtype == np.uint8 else I8Weight)(w, d, m)


class _Layer:
    def __init__(self, index: int, bundles: BundleFile, plan: LayerPlan, staging: int, predictor, policy: str):
        F = bundles.ffn
        if plan.mode not in MODES:
            raise ConfigError(f"layer {index}: flash FFN mode {plan.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= plan.hot <= F or plan.cache < 0:
            raise ConfigError(f"layer {index}: {plan.hot} hot neurons and cache {plan.cache} do not fit {F} neurons")
        if plan.mode == "predicted" and predictor is None:
            raise ConfigError(f"layer {index}: mode predicted but no predictor for this layer")
        self.meta = bundles.layers[index]
        self.H = plan.hot
        self.C = min(plan.cache, F - plan.hot)
        self.S = staging
        self.mode = plan.mode
        self.predictor = predictor
        rows = self.H + self.C + self.S
        # The nine slot arrays: (rows, cols) each, the dtypes of the bundle record's fields.
        self.arrays = [np.zeros((rows, int(f["cols"])), dtype=np.dtype(f["dtype"])) for f in bundles.fields]
        self.cache = SegmentCache(F, self.C, policy) if self.C else None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


class FlashFFN:
    """FFN of every layer from a bundle file. `Transformer.flash` holds one (engine/model.py)."""

    def __init__(self, bundles: BundleFile, plans: list[LayerPlan], act_kind: int, *, predictors=None,
                 direct: bool = True, io_threads: int = 2, policy: str = "lru", pipeline: bool = True,
                 bundled: bool = True, request_bytes: int = 256 << 10, max_gap: int | None = None,
                 reader: FlashReader | None = None):
        if len(plans) != bundles.n_layers:
            raise ConfigError(f"{len(plans)} layer plans for a bundle file of {bundles.n_layers} layers")
        self.bundles = bundles
        self.R = bundles.record_bytes
        self.act = act_kind
        self.bits16 = bundles.bits16
        self.pipeline = pipeline
        self.bundled = bundled
        # Records per request, and the gap (in records) worth reading through rather than splitting a
        # request: about one 4 KiB page, whose cost is small next to a request's fixed ~200 us here.
        self.max_len = max(1, request_bytes // self.R)
        self.max_gap = max(0, ALIGN // self.R) if max_gap is None else max_gap
        self.reader = reader or FlashReader(bundles.path, direct=direct, threads=io_threads)
        n_buf = 2 * self.reader.threads if pipeline else 1
        buf_bytes = self.max_len * self.R + 2 * ALIGN
        self._bufs = [aligned_buffer(buf_bytes) for _ in range(n_buf)]       # (buf_bytes,) uint8 each
        predictors = predictors or {}
        # Staging holds every request that can be in flight at once (one group of arrivals).
        staging = self.max_len * n_buf
        self.layers = [_Layer(i, bundles, p, staging, predictors.get(i), policy) for i, p in enumerate(plans)]
        F, hidden = bundles.ffn, bundles.hidden
        self._out = np.empty(hidden, np.float32)          # (hidden,) f32 FFN output
        self._part = np.empty(hidden, np.float32)         # (hidden,) f32 one kernel call's share
        self._acts = np.empty(F, np.float32)              # (ffn,) f32
        self._idx = np.empty(F, np.int32)                 # (ffn,) int32 predictor choice
        self._scores = np.empty(F, np.float32)            # (ffn,) f32 predictor scores
        self.stats = FlashStats()
        for L in self.layers:
            self._load_hot(L)

    # ------------------------------------------------------------------ memory

    @property
    def resident_bytes(self) -> int:
        """Slot arrays (hot + cache + staging) and read buffers."""
        return sum(L.nbytes for L in self.layers) + sum(len(b[1]) for b in self._bufs)

    def close(self) -> None:
        self.reader.close()

    # ------------------------------------------------------------------ decode

    def handles(self, i: int) -> bool:
        return True

    def ffn(self, i: int, h: np.ndarray, neurons: np.ndarray | None = None) -> np.ndarray:
        """h (hidden,) f32 FFN input -> (hidden,) f32 FFN output (a buffer reused by the next call).
        neurons (n,) int: the active neuron ids for mode "given"."""
        t0 = time.perf_counter()
        L = self.layers[i]
        st = self.stats
        pos = self._positions(L, h, neurons)                      # (n,) int64 ascending
        H = L.H
        hot = pos[: np.searchsorted(pos, H)]
        cold = pos[len(hot):]
        if L.cache is not None:
            _, hit_slots, miss = L.cache.lookup(cold)
        else:
            hit_slots, miss = np.zeros(0, np.int32), cold
        if i == 0:
            st.tokens += 1
        st.needed += len(pos)
        st.hot += len(hot)
        st.hits += len(hit_slots)
        st.misses += len(miss)
        out = self._out
        out[:] = 0.0
        # Cache slots are chosen once per token, before the reads: a victim is never a neuron this token
        # uses, so its slot can be overwritten whenever the read lands. Not admitted: staging slots.
        dyn = L.cache.admit(miss) if L.cache is not None else np.full(len(miss), -1, np.int32)
        landed = np.zeros(len(miss), dtype=bool)
        primed = self.pipeline and self.bundled        # unbundled reads are the synchronous baseline
        stream = self._stream(L, self._runs(miss), decode=True, prime=primed)
        ok = False
        try:
            if primed:
                next(stream, None)            # submits every read the buffers allow, then returns here
            # The hot and cached neurons are computed while those reads are in flight.
            self._compute(L, np.concatenate([hot.astype(np.int32), H + hit_slots]), h, out)
            for group in stream:
                self._arrive(L, group, miss, dyn, landed, h, out)
            ok = True
        finally:
            stream.close()
            if L.cache is not None:
                if not ok:
                    L.cache.invalidate(miss[~landed & (dyn >= 0)])
                L.cache.end_token()
            st.ffn_s += time.perf_counter() - t0
        return out

    def _positions(self, L: _Layer, h: np.ndarray, neurons) -> np.ndarray:
        F = self.bundles.ffn
        if L.mode == "dense":
            return np.arange(F, dtype=np.int64)
        if L.mode == "predicted":
            p = L.predictor
            threads = _threads()
            n = predict(p.w1, p.b1, p.w2, p.b2, h, np.float32(p.threshold), threads, self._scores, self._idx)
            ids = self._idx[:n]
        else:
            if neurons is None:
                raise ConfigError("flash FFN mode 'given' needs the active neurons")
            ids = np.asarray(neurons)
        return np.sort(L.meta.inverse[ids].astype(np.int64))

    def _runs(self, miss: np.ndarray) -> list:
        """Requests for the missing positions: merged runs, or one per neuron part without bundling."""
        if self.bundled:
            return merge_runs(miss, self.max_gap, self.max_len)
        return [(int(p), int(p) + 1) for p in miss]

    def _compute(self, L: _Layer, slots: np.ndarray, h: np.ndarray, out: np.ndarray) -> None:
        """out += the FFN contribution of the neurons in `slots` (n,) int32."""
        n = len(slots)
        if n == 0:
            return
        a = L.arrays
        sparse_ffn(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7], a[8], L.meta.dscale, self.bits16, h,
                   np.ascontiguousarray(slots, dtype=np.int32), _EMPTY, self.act, _threads(), self._acts[:n],
                   self._part)
        out += self._part

    def _arrive(self, L: _Layer, group, miss, dyn, landed, h, out) -> None:
        """Requests landed: copy their needed bundles into their cache slots (or staging slots) and
        compute them, in one kernel call for the whole group."""
        all_slots = []
        stage = L.H + L.C
        for p0, p1, recs in group:
            lo, hi = np.searchsorted(miss, p0), np.searchsorted(miss, p1)
            if lo == hi:
                continue
            d = dyn[lo:hi]
            slots = L.H + d                                       # (n,) int32 slot of each needed bundle
            staged = d < 0
            k = int(staged.sum())
            slots[staged] = stage + np.arange(k, dtype=np.int32)
            stage += k
            local = miss[lo:hi] - p0
            for name, arr in zip(FIELD_NAMES, L.arrays):
                if arr.shape[1]:
                    arr[slots] = recs[name][local]
            landed[lo:hi] = True
            all_slots.append(slots)
        assert stage <= len(L.arrays[0]), "staging holds every request in flight"
        if all_slots:
            self._compute(L, np.concatenate(all_slots), h, out)

    # ------------------------------------------------------------------ reads

    def _stream(self, L: _Layer, runs: list, decode: bool, prime: bool = False):
        """Yield (p0, p1, records (p1-p0,) structured view) for each run, in order, as it lands. With the
        pipeline, every read the buffers allow is submitted first; with prime=True the generator then
        yields None once, so the caller computes while they are in flight. A record view is valid until the next iteration.
        On any exit (an exception included) the reads still in flight are cancelled or awaited, so no
        buffer is written after the generator is closed."""
        st = self.stats
        base = L.meta.offset
        if not self.bundled and decode:
            yield from self._stream_unbundled(L, runs)
            return
        if not self.pipeline:
            m, buf = self._bufs[0]
            for p0, p1 in runs:
                a0, a1 = _aligned(base + p0 * self.R, base + p1 * self.R)
                t = time.perf_counter()
                busy = self.reader.read(buf[: a1 - a0], a0)
                st.io_wait_s += time.perf_counter() - t
                st.io_busy_s += busy
                self._count(decode, a1 - a0)
                yield [(p0, p1, self._records(buf, base + p0 * self.R - a0, p1 - p0))]
            return
        todo = deque(runs)
        free = deque(range(len(self._bufs)))
        inflight = deque()
        try:
            while todo or inflight:
                while todo and free:
                    p0, p1 = todo.popleft()
                    b = free.popleft()
                    a0, a1 = _aligned(base + p0 * self.R, base + p1 * self.R)
                    inflight.append((self.reader.submit(self._bufs[b][1][: a1 - a0], a0), p0, p1, a0, a1, b))
                if prime:
                    prime = False
                    yield None
                # The oldest request, and every later one that has landed meanwhile: one group.
                group, used = [], []
                while inflight and (not group or inflight[0][0].done()):
                    fut, p0, p1, a0, a1, b = inflight.popleft()
                    t = time.perf_counter()
                    busy = fut.result()
                    st.io_wait_s += time.perf_counter() - t
                    st.io_busy_s += busy
                    self._count(decode, a1 - a0)
                    group.append((p0, p1, self._records(self._bufs[b][1], base + p0 * self.R - a0, p1 - p0)))
                    used.append(b)
                yield group
                free.extend(used)
        finally:
            for fut, *_ in inflight:
                fut.cancel()
            for fut, *_ in inflight:
                if not fut.cancelled():
                    fut.exception()      # wait: its buffer may still be written; its error is superseded

    def _stream_unbundled(self, L: _Layer, runs: list):
        """The no-bundling baseline: gate, up and down parts of each neuron read by separate requests,
        as if they lived in three separate matrices, then assembled into one record."""
        st = self.stats
        base = L.meta.offset
        m, buf = self._bufs[0]
        rec = np.zeros(self.R, dtype=np.uint8)                    # (R,) uint8 one assembled record
        parts = [self.bundles.field_range(names) for names in (FIELD_NAMES[0:3], FIELD_NAMES[3:6], FIELD_NAMES[6:9])]
        for p0, p1 in runs:
            for s, e in parts:
                a0, a1 = _aligned(base + p0 * self.R + s, base + p0 * self.R + e)
                t = time.perf_counter()
                busy = self.reader.read(buf[: a1 - a0], a0)
                st.io_wait_s += time.perf_counter() - t
                st.io_busy_s += busy
                self._count(True, a1 - a0)
                off = base + p0 * self.R + s - a0
                rec[s:e] = buf[off: off + e - s]
            yield [(p0, p1, self._records(rec, 0, 1))]

    def _records(self, buf: np.ndarray, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(buf, dtype=self.bundles.dtype, count=count, offset=offset)

    def _count(self, decode: bool, nbytes: int) -> None:
        if decode:
            self.stats.bytes_read += nbytes
            self.stats.requests += 1
        else:
            self.stats.prefill_bytes += nbytes

    def _load_hot(self, L: _Layer) -> None:
        """Read the resident segment (positions 0..H-1) into slots 0..H-1."""
        for group in self._stream(L, merge_runs(np.arange(L.H), 0, self.max_len), decode=False):
            for p0, p1, recs in group:
                for name, arr in zip(FIELD_NAMES, L.arrays):
                    if arr.shape[1]:
                        arr[p0:p1] = recs[name]

    # ------------------------------------------------------------------ prefill

    def ffn_batch(self, i: int, x: np.ndarray) -> np.ndarray:
        """x (n, hidden) f32 -> (n, hidden) f32: every neuron, hot ones from memory, the cold ones read
        once in long requests and computed in tiles through BLAS."""
        L = self.layers[i]
        F = self.bundles.ffn
        out = np.zeros((x.shape[0], self.bundles.hidden), np.float32)
        for r0 in range(0, L.H, _PREFILL_TILE):
            self._tile(L, r0, min(L.H, r0 + _PREFILL_TILE), x, out)
        stage = L.H + L.C
        runs = merge_runs(np.arange(L.H, F), 0, self.max_len)
        for group in self._stream(L, runs, decode=False):
            for p0, p1, recs in group:
                for name, arr in zip(FIELD_NAMES, L.arrays):
                    if arr.shape[1]:
                        arr[stage: stage + p1 - p0] = recs[name]
                self._tile(L, stage, stage + p1 - p0, x, out)
        return out

    def _tile(self, L: _Layer, s0: int, s1: int, x: np.ndarray, out: np.ndarray) -> None:
        a = [arr[s0:s1] for arr in L.arrays]
        g = _weight(a[0], a[1], a[2], self.bits16).matmul(x)      # (n, s1-s0) f32
        u = _weight(a[3], a[4], a[5], self.bits16).matmul(x)      # (n, s1-s0) f32
        act = glu(g, u, self.act, g)
        down = _weight(a[6], a[7], a[8], self.bits16)             # (s1-s0, hidden)
        out += (act @ down.dequantize(0, s1 - s0, np.empty((s1 - s0, self.bundles.hidden), np.float32))) * L.meta.dscale


def _aligned(start: int, end: int) -> tuple[int, int]:
    return start // ALIGN * ALIGN, (end + ALIGN - 1) // ALIGN * ALIGN


def _threads() -> int:
    if not NUMBA:
        return 1
    import numba
    return numba.get_num_threads()
