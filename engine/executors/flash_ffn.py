"""The decode-time FFN of a model larger than its memory budget: neuron bundles from flash, a segmented
neuron cache and the I/O-compute pipeline (PowerInfer-2, arXiv 2406.06282, sections 4.3-4.4).

The neurons of the bundle file (engine/flash/bundles.py, each layer's positions hot to cold) live in one
set of slot arrays shared by all layers, the nine kernel arrays of kernels/sparse_ffn.py:
  per layer, rows [base, base+H)      the resident segment: its H hot neurons, read once at load;
             rows [base+H, base+H+C)  the dynamic segment: C cold neurons cached by engine/flash/cache.py;
  then one staging ring of S rows     missing bundles not admitted to a cache, from landing until their
                                      down rows are summed (layers run one at a time, so they share it).
One token through a layer:
  1. the active neurons: every neuron (mode "dense"), the predictor's choice ("predicted"), or a set the
     caller gives (benchmarks), in position order: the active list, cut into fixed chunks
     (chunk_bounds: by its length alone);
  2. split into hot, cached (hits) and missing; the missing positions are merged into runs
     (engine/flash/reader.merge_runs, gaps of up to max_gap bundles read through) and queued with the
     reader (engine/flash/open_reader.py: kernel AIO, or reader threads) into the read arena
     (engine/flash/arena.py), as many as the queue depth and the arena allow;
  3. while the reads are in flight, the activations act(gate.x, up.x) of the hot and cached neurons
     (kernels/sparse_ffn.sparse_acts: numba, nogil), and the down sums of the chunks that miss nothing;
  4. as requests land (the oldest, with the ones after it that have landed too, as one group): their
     bundles are copied into their cache or staging slots in one call, their activations computed,
     and every chunk now complete has its down sum (sparse_down);
  5. the output is the chunk sums added in chunk order, times the layer's dscale.
Same tokens at any budget: an activation depends on its neuron alone, and a chunk's down sum
on its neurons in list order alone, so what is cached changes where weights come from and when they are
computed, never the float32 arithmetic: logits are bitwise those of the same bundles fully resident.

Prefill (several tokens) runs fixed tiles of _PREFILL_TILE positions through BLAS (engine/model/weights.py
layouts), in position order, whatever the hot count: a tile with cold neurons is assembled in staging
(its hot head copied, the rest read in long sequential requests); it does not touch the cache.

`pipeline=False` reads synchronously after computing what is in memory, and `bundled=False` reads each
needed neuron's gate row, up row and down row with three separate requests: the ablation steps of
tools/bench_flash.py.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, fields

import numpy as np

from engine.errors import ConfigError
from engine.executors.base import Executor
from engine.flash.bundles import ALIGN, FIELD_NAMES, BundleFile, open_bundles
from engine.flash.cache import SegmentCache
from engine.flash.arena import ReadArena
from engine.flash.open_reader import open_reader
from engine.flash.reader import FlashReader, merge_runs
from engine.model.weights import BF16Weight, F16Weight, F32Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight
from kernels.activation import glu
from kernels.backend import NUMBA
from kernels.records import byte_views, scatter
from kernels.sparse_ffn import predict, sparse_acts, sparse_down

MODES = ("dense", "predicted", "given")
_PREFILL_TILE = 256            # positions per BLAS tile in prefill
CHUNK = 64                     # fewest active neurons per down chunk
SMALL_REQUEST = 64 << 10       # arena room per read in flight: decode requests are a few bundles
MAX_CHUNKS = 32                # most down chunks per layer and token (their sums are added at the end)


def chunk_bounds(n: int) -> np.ndarray:
    """(c+1,) int64 bounds of the down chunks of an active list of n neurons: a function of n only, so
    the summation order never depends on the cache. Chunks are the unit of the pipeline's down work
    (one is summed as soon as its last bundle lands) and of its parallelism (one per prange iteration)."""
    size = max(CHUNK, -(-n // MAX_CHUNKS))
    return np.append(np.arange(0, n, size, dtype=np.int64), np.int64(n))


@dataclass
class LayerPlan:
    mode: str = "dense"        # MODES
    hot: int = 0               # neurons in the resident segment
    cache: int = 0             # capacity of the dynamic segment


def io_layout(record_bytes: int, ffn: int, io_threads: int, request_bytes: int, pipeline: bool = True,
              read_ahead: bool = True) -> tuple[int, int, int, int]:
    """(reads in flight at most, records per request, staging-ring rows, read-arena bytes) of a
    FlashFFN: the memory it holds for I/O beside the hot and cached neurons (io_bytes; the planner
    budgets it). The arena (engine/flash/arena.py) holds every read in flight: room for that many
    requests of up to SMALL_REQUEST bytes, and for at least four of the longest. A staged bundle lives
    from its landing until its chunk is summed, and landed requests are taken in groups of at most
    one request's length: at most that many bundles plus the landed part of the one chunk still waiting
    for more, so a ring of that many rows is never overwritten in use."""
    max_len = max(1, min(request_bytes // record_bytes, ffn))     # no request is longer than a layer
    per_layer = -(-ffn // max_len)                                   # requests that cover a layer
    extra = 1 if read_ahead else 0
    n_buf = min(2 * max(1, io_threads), per_layer) + extra if pipeline else 1
    span = -(-(max_len * record_bytes + 2 * ALIGN) // ALIGN) * ALIGN      # the longest request, aligned
    arena = max(n_buf * min(span, SMALL_REQUEST), min(n_buf, 4) * span)
    return n_buf, max_len, max_len + int(np.diff(chunk_bounds(ffn)).max(initial=1)), arena


def io_bytes(record_bytes: int, ffn: int, io_threads: int, request_bytes: int, **kw) -> int:
    """Bytes of a FlashFFN's read buffers and staging ring (see io_layout; prefill assembles a tile of
    _PREFILL_TILE rows in the ring)."""
    _, _, ring, arena = io_layout(record_bytes, ffn, io_threads, request_bytes, **kw)
    return arena + max(ring, min(_PREFILL_TILE, ffn)) * record_bytes


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
    """A row range of slot arrays as an engine.model.weights Weight (views, no copy), for prefill's BLAS tiles."""
    if w.dtype == np.float32:
        return F32Weight(w)
    if w.dtype == np.uint16:
        return (BF16Weight if bits16 else F16Weight)(w)
    kinds = {np.dtype(np.uint8): Q4Weight, np.dtype(np.uint32): Q5Weight, np.dtype(np.uint64): Q6Weight}
    return kinds.get(w.dtype, I8Weight)(w, d, m)


class _Layer:
    def __init__(self, index: int, bundles: BundleFile, plan: LayerPlan, base: int, predictor, policy: str):
        F = bundles.ffn
        if plan.mode not in MODES:
            raise ConfigError(f"layer {index}: flash FFN mode {plan.mode!r} is not one of {', '.join(MODES)}")
        if not 0 <= plan.hot <= F or plan.cache < 0:
            raise ConfigError(f"layer {index}: {plan.hot} hot neurons and cache {plan.cache} do not fit {F} neurons")
        if plan.mode == "predicted" and predictor is None:
            raise ConfigError(f"layer {index}: mode predicted but no predictor for this layer")
        self.meta = bundles.layers[index]
        self.index = index
        self.H = plan.hot
        self.C = min(plan.cache, F - plan.hot)
        self.base = base               # slot row of position 0; the dynamic segment follows the hot one
        self.mode = plan.mode
        self.predictor = predictor
        self.cache = SegmentCache(F, self.C, policy) if self.C else None


class FlashFFN:
    """The FFNs of every layer from one bundle file: the store the per-layer executors (FlashLayerFFN)
    share, and what they report through (snapshot, since)."""

    def __init__(self, bundles: BundleFile, plans: list[LayerPlan], act_kind: int, *, predictors=None,
                 direct: bool = True, io_threads: int = 2, policy: str = "lru", pipeline: bool = True,
                 bundled: bool = True, request_bytes: int = 256 << 10, max_gap: int | None = None,
                 reader: FlashReader | None = None, read_ahead: bool = True, reader_kind: str | None = None):
        if len(plans) != bundles.n_layers:
            raise ConfigError(f"{len(plans)} layer plans for a bundle file of {bundles.n_layers} layers")
        self.bundles = bundles
        self.R = bundles.record_bytes
        self.act = act_kind
        self.bits16 = bundles.bits16
        self.pipeline = pipeline
        self.bundled = bundled
        # Records per request, and the gap (in records) worth reading through rather than splitting a
        # request: about one 4 KiB page, whose cost is small next to a request's fixed cost (flash/reader.py).
        self.max_gap = max(0, ALIGN // self.R) if max_gap is None else max_gap
        self.reader = reader or open_reader(bundles.path, direct=direct, threads=io_threads, kind=reader_kind)
        # Read-ahead: a layer whose reads are known before it runs (every neuron each token, no cache:
        # a dense layer streamed from flash) gets them submitted while the layer before it computes, into
        # the arena's free space, so that its reads overlap compute instead of starting with the layer.
        self.read_ahead = pipeline and bundled and read_ahead
        self.depth, self.max_len, ring, arena = io_layout(self.R, bundles.ffn, self.reader.threads, request_bytes,
                                                          pipeline, self.read_ahead)
        # Every read lands in the arena, so a group of landed requests is one source array for one
        # scatter call (_arrive).
        self.arena = ReadArena(arena)
        self._ahead = deque()                 # reads in flight for layer _ahead_layer: (future, p0, p1, a0, a1, span)
        self._ahead_layer = -1
        self._ahead_runs: list = []           # that layer's runs not yet submitted
        predictors = predictors or {}
        F, hidden = bundles.ffn, bundles.hidden
        self.layers, base = [], 0
        for i, p in enumerate(plans):
            self.layers.append(_Layer(i, bundles, p, base, predictors.get(i), policy))
            base += self.layers[-1].H + self.layers[-1].C
        # The staging ring (io_layout); prefill assembles one tile in it.
        self.stage0 = base
        self.ring = ring
        rows = base + max(self.ring, min(_PREFILL_TILE, F))
        # The nine slot arrays: (rows, cols) each, the dtypes of the bundle record's fields.
        self.arrays = [np.zeros((rows, int(f["cols"])), dtype=np.dtype(f["dtype"])) for f in bundles.fields]
        # Where each field sits in a record, and the slot arrays as bytes: kernels/records.py copies
        # landed bundles into their slots with these.
        rec = bundles.dtype
        self._field_off = np.array([rec.fields[n][1] for n in FIELD_NAMES], np.int64)        # (9,) bytes
        self._field_len = np.array([rec.fields[n][0].itemsize for n in FIELD_NAMES], np.int64)  # (9,) bytes
        self._field_dst = byte_views(self.arrays)
        n_chunks = len(chunk_bounds(F)) - 1
        self._out = np.empty(hidden, np.float32)                # (hidden,) f32 FFN output
        self._parts = np.empty((n_chunks, hidden), np.float32)  # (chunks, hidden) f32 down sum of each chunk
        self._acts = np.empty(F, np.float32)                    # (ffn,) f32 activation of each active neuron
        self._tmp = np.empty(F, np.float32)                     # (ffn,) f32 one sparse_acts call's output
        self._slot = np.empty(F, np.int32)                      # (ffn,) int32 slot row of each active neuron
        self._idx = np.empty(F, np.int32)                       # (ffn,) int32 predictor choice
        self._scores = np.empty(F, np.float32)                  # (ffn,) f32 predictor scores
        self.stats = FlashStats()
        for L in self.layers:
            self._load_hot(L)

    # ------------------------------------------------------------------ memory

    @property
    def resident_bytes(self) -> int:
        """Slot arrays (hot + cache + staging) and read buffers."""
        return sum(a.nbytes for a in self.arrays) + self.arena.size

    def close(self) -> None:
        self._drop_ahead()
        self.reader.close()

    # ------------------------------------------------------------------ as executors

    def layer_ffns(self, batched: bool) -> list["FlashLayerFFN"]:
        """One FFN executor per layer, for prefill (batched) or decode."""
        return [FlashLayerFFN(self, i, batched) for i in range(len(self.layers))]

    def snapshot(self) -> FlashStats:
        return self.stats.snapshot()

    def since(self, before: FlashStats) -> dict:
        """Hit rates per segment, flash bytes and I/O wait per token, overlap (FlashStats.summary) and
        the bytes prefill read, since `before`."""
        delta = self.stats.minus(before)
        return dict(delta.summary(), prefill_bytes=delta.prefill_bytes)

    # ------------------------------------------------------------------ read-ahead

    def _predictable(self, j: int) -> bool:
        """Whether layer j's reads are known before it runs: every cold neuron, every token."""
        L = self.layers[j]
        return L.mode == "dense" and L.cache is None and L.H < self.bundles.ffn

    def _submit_ahead(self) -> None:
        """Fill free buffers with the next predictable layer's first reads (the layer after the one that
        just submitted all of its own; after the last layer, the first of the next token)."""
        if not self.read_ahead:
            return
        if self._ahead_layer < 0:
            return
        L = self.layers[self._ahead_layer]
        batch = []
        while self._ahead_runs and len(self._ahead) + len(batch) < self.depth:
            p0, p1 = self._ahead_runs[0]
            a0, a1 = _aligned(L.meta.offset + p0 * self.R, L.meta.offset + p1 * self.R)
            span = self.arena.alloc(a1 - a0)
            if span is None:
                break
            self._ahead_runs.pop(0)
            batch.append((p0, p1, a0, a1, span))
        self._ahead.extend(self._submit(batch))

    def _plan_ahead(self, after: int) -> None:
        """Choose the layer to read ahead for once layer `after` has submitted all of its reads."""
        if not self.read_ahead or self._ahead_layer >= 0:
            return
        j = (after + 1) % len(self.layers)
        if self._predictable(j):
            L = self.layers[j]
            self._ahead_layer = j
            self._ahead_runs = self._runs(np.arange(L.H, self.bundles.ffn, dtype=np.int64))
            self._submit_ahead()

    def _drop_ahead(self) -> None:
        """Wait out and forget the read-ahead (before a prefill, after an error, at close): no buffer
        may be written once its reads are abandoned."""
        for fut, *_, b in self._ahead:
            fut.cancel()
        for fut, *_, span in self._ahead:
            if not fut.cancelled():
                fut.exception()
            self.arena.release(span)
        self._ahead.clear()
        self._ahead_layer, self._ahead_runs = -1, []

    # ------------------------------------------------------------------ decode

    def ffn(self, i: int, h: np.ndarray, neurons: np.ndarray | None = None) -> np.ndarray:
        """h (hidden,) f32 FFN input -> (hidden,) f32 FFN output (a buffer reused by the next call).
        neurons (n,) int: the active neuron ids for mode "given"."""
        t0 = time.perf_counter()
        L = self.layers[i]
        st = self.stats
        pos = self._positions(L, h, neurons)                      # (n,) int64 ascending: the active list
        n = len(pos)
        nh = int(np.searchsorted(pos, L.H))
        cold = pos[nh:]
        slot = self._slot[:n]                                     # (n,) int32 slot row of each, -1 not yet
        slot[:nh] = L.base + pos[:nh]
        if L.cache is not None:
            hit_pos, hit_slots, miss = L.cache.lookup(cold)
            slot[nh + np.searchsorted(cold, hit_pos)] = L.base + L.H + hit_slots
            # Cache slots are chosen once per token, before the reads: a victim is never a neuron this
            # token uses, so its slot can be overwritten whenever the read lands. Not admitted: staging.
            dyn = L.cache.admit(miss)
        else:
            miss = cold
            dyn = np.full(len(miss), -1, np.int32)
        miss_t = nh + np.searchsorted(cold, miss)                # (m,) int64 index of each miss in the list
        slot[miss_t] = -1
        if i == 0:
            st.tokens += 1
        st.needed += n
        st.hot += nh
        st.hits += len(cold) - len(miss)
        st.misses += len(miss)
        bounds = chunk_bounds(n)
        # need[k]: the misses at or before chunk k's end. Reads land in position order, so chunk k is
        # complete once that many have landed.
        need = np.searchsorted(miss_t, bounds[1:])
        resident = slot >= 0
        run = _Run(L, slot, miss, miss_t, dyn, bounds, need)
        primed = self.pipeline and self.bundled        # unbundled reads are the synchronous baseline
        stream = self._stream(L, self._runs(miss), decode=True, prime=primed)
        ok = False
        try:
            if primed:
                next(stream, None)            # submits every read the buffers allow, then returns here
            # What is in memory is computed while those reads are in flight.
            self._acts_of(slot, np.flatnonzero(resident), h)
            self._down(run)
            for group in stream:
                self._arrive(run, group, h)
            ok = True
        finally:
            stream.close()
            if L.cache is not None:
                if not ok:
                    L.cache.invalidate(miss[run.landed:][dyn[run.landed:] >= 0])
                L.cache.end_token()
            st.ffn_s += time.perf_counter() - t0
        assert run.done == len(bounds) - 1, "every chunk is summed once its reads have landed"
        out = self._out
        if n:
            np.sum(self._parts[: run.done], axis=0, dtype=np.float32, out=out)    # chunk after chunk
            out *= L.meta.dscale
        else:
            out[:] = 0.0
        return out

    def _positions(self, L: _Layer, h: np.ndarray, neurons) -> np.ndarray:
        F = self.bundles.ffn
        if L.mode == "dense":
            return np.arange(F, dtype=np.int64)
        if L.mode == "predicted":
            p = L.predictor
            threads = _threads()
            n = predict(*p.arrays, h, np.float32(p.threshold), threads, self._scores, self._idx)
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

    def _acts_of(self, slot: np.ndarray, ts: np.ndarray, h: np.ndarray) -> None:
        """self._acts[ts] = the activations of the active neurons at list indices ts (k,) int64."""
        k = len(ts)
        if k == 0:
            return
        a = self.arrays
        tmp = self._tmp[:k]
        sparse_acts(a[0], a[1], a[2], a[3], a[4], a[5], self.bits16, h, slot[ts], self.act, _threads(), tmp)
        self._acts[ts] = tmp

    def _down(self, run: "_Run") -> None:
        """The down sums of every chunk completed since the last call, in one kernel call."""
        c0 = run.done
        c1 = int(np.searchsorted(run.need, run.landed, side="right"))
        if c1 <= c0:
            return
        t0, t1 = run.bounds[c0], run.bounds[c1]
        a = self.arrays
        sparse_down(a[6], a[7], a[8], self.bits16, run.slot[t0:t1], self._acts[t0:t1], run.bounds[c0:c1 + 1] - t0,
                    self._parts[c0:c1])
        run.done = c1

    def _arrive(self, run: "_Run", group, h) -> None:
        """Requests landed (consecutive runs, one source array): copy their needed bundles into their
        cache slots (or the staging ring) in one scatter, compute their activations, then the chunks
        they complete."""
        L = run.L
        lo = run.landed
        hi = int(np.searchsorted(run.miss, group[-1][1]))       # misses before the last run's end
        if hi > lo:
            assert run.miss[lo] >= group[0][0], "reads land in position order"
            p0 = np.array([g[0] for g in group], np.int64)        # (g,) first position of each run
            p1 = np.array([g[1] for g in group], np.int64)        # (g,) its end
            start = np.array([g[4] for g in group], np.int64)     # (g,) byte offset of its first record
            m = run.miss[lo:hi]                                   # (k,) positions landed now
            item = np.searchsorted(p1, m, side="right")           # (k,) the run holding each
            d = run.dyn[lo:hi]
            rows = (L.base + L.H + d).astype(np.int64)            # (k,) slot row of each bundle
            staged = d < 0
            k = int(staged.sum())
            rows[staged] = self.stage0 + (run.staged + np.arange(k)) % self.ring
            run.staged += k
            scatter(group[0][3], start[item] + (m - p0[item]) * self.R, rows,
                    self._field_off, self._field_len, self._field_dst)
            run.slot[run.miss_t[lo:hi]] = rows
            run.landed = hi
        self._acts_of(run.slot, run.miss_t[lo:run.landed], h)
        self._down(run)

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
            assert self.arena.in_use == 0, "synchronous reads have the arena to themselves"
            buf = self.arena.bytes
            for p0, p1 in runs:
                a0, a1 = _aligned(base + p0 * self.R, base + p1 * self.R)
                t = time.perf_counter()
                busy = self.reader.read(buf[: a1 - a0], a0)
                st.io_wait_s += time.perf_counter() - t
                st.io_busy_s += busy
                self._count(decode, a1 - a0)
                yield [self._item(base + p0 * self.R - a0, p0, p1)]
            return
        todo = deque(runs)
        arena = self.arena
        inflight = deque()
        if self._ahead_layer >= 0 and (self._ahead_layer != L.index or not decode):
            self._drop_ahead()                # read ahead for another layer (or a prefill came instead)
        if self._ahead_layer == L.index:
            # Its first reads were submitted while the layer before it computed: they are this layer's
            # first runs, in order (the layer reads every cold neuron, so its runs are always the same).
            while self._ahead and todo and (self._ahead[0][1], self._ahead[0][2]) == todo[0]:
                inflight.append(self._ahead.popleft())
                todo.popleft()
            assert not self._ahead, "read-ahead matches the layer's runs"
            self._ahead_layer, self._ahead_runs = -1, []
        used = []                             # arena spans of the group being consumed
        try:
            while todo or inflight:
                batch = []
                while todo and len(inflight) + len(batch) < self.depth:
                    p0, p1 = todo[0]
                    a0, a1 = _aligned(base + p0 * self.R, base + p1 * self.R)
                    span = arena.alloc(a1 - a0)
                    if span is None:
                        break
                    todo.popleft()
                    batch.append((p0, p1, a0, a1, span))
                assert batch or inflight or not todo, "an empty arena holds any one request"
                inflight.extend(self._submit(batch))
                if decode and not todo:
                    self._plan_ahead(L.index)
                if prime:
                    prime = False
                    yield None
                if not inflight:
                    break
                # The oldest request, and the ones after it that have landed too, as one group of at
                # most max_len bundles (so the staging ring holds a group's bundles plus a chunk,
                # io_layout): one pass of copies and kernels for several requests.
                fut, p0, p1, a0, a1, b = inflight.popleft()
                used.append(b)
                t = time.perf_counter()
                busy = fut.result()
                st.io_wait_s += time.perf_counter() - t
                st.io_busy_s += busy
                self._count(decode, a1 - a0)
                group = [self._item(b.start + base + p0 * self.R - a0, p0, p1)]
                count = p1 - p0
                while inflight and count + inflight[0][2] - inflight[0][1] <= self.max_len and inflight[0][0].done():
                    fut, p0, p1, a0, a1, b = inflight.popleft()
                    used.append(b)
                    st.io_busy_s += fut.result()
                    self._count(decode, a1 - a0)
                    group.append(self._item(b.start + base + p0 * self.R - a0, p0, p1))
                    count += p1 - p0
                yield group
                for b in used:
                    arena.release(b)
                used.clear()
                if decode and not todo:
                    self._submit_ahead()      # the freed space takes the next layer's reads
        except BaseException:
            self._drop_ahead()
            raise
        finally:
            for fut, *_ in inflight:
                fut.cancel()
            for fut, *_, b in inflight:
                if not fut.cancelled():
                    fut.exception()      # wait: its buffer may still be written; its error is superseded
                arena.release(b)
            for b in used:               # a group the caller stopped consuming
                arena.release(b)

    def _stream_unbundled(self, L: _Layer, runs: list):
        """The no-bundling baseline: gate, up and down parts of each neuron read by separate requests,
        as if they lived in three separate matrices, then assembled into one record."""
        st = self.stats
        base = L.meta.offset
        assert self.arena.in_use == 0, "synchronous reads have the arena to themselves"
        buf = self.arena.bytes
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
            yield [(p0, p1, self._records(rec, 0, 1), rec, 0)]

    def _submit(self, batch: list) -> list:
        """[(p0, p1, a0, a1, arena span)] -> [(ticket, p0, p1, a0, a1, span)]: the reads of file bytes
        [a0, a1) into those spans, queued in one call."""
        tickets = self.reader.submit_many([self.arena.view(b) for *_, b in batch], [a0 for _, _, a0, _, _ in batch])
        return [(t, *item) for t, item in zip(tickets, batch)]

    def _item(self, start: int, p0: int, p1: int) -> tuple:
        """A landed run as a group item: (p0, p1, its records (p1-p0,) structured view, the source bytes,
        the byte offset of record p0 in them), for a run whose record p0 starts at arena byte `start`."""
        a = self.arena.bytes
        return p0, p1, self._records(a, start, p1 - p0), a, start

    def _records(self, buf: np.ndarray, offset: int, count: int) -> np.ndarray:
        return np.frombuffer(buf, dtype=self.bundles.dtype, count=count, offset=offset)

    def _count(self, decode: bool, nbytes: int) -> None:
        if decode:
            self.stats.bytes_read += nbytes
            self.stats.requests += 1
        else:
            self.stats.prefill_bytes += nbytes

    def _load_hot(self, L: _Layer) -> None:
        """Read the resident segment (positions 0..H-1) into its slot rows."""
        for group in self._stream(L, merge_runs(np.arange(L.H), 0, self.max_len), decode=False):
            for p0, p1, recs, *_ in group:
                for name, arr in zip(FIELD_NAMES, self.arrays):
                    if arr.shape[1]:
                        arr[L.base + p0: L.base + p1] = recs[name]

    # ------------------------------------------------------------------ prefill

    def ffn_batch(self, i: int, x: np.ndarray) -> np.ndarray:
        """x (n, hidden) f32 -> (n, hidden) f32: every neuron, in tiles of _PREFILL_TILE positions added
        in position order. Tiles of hot neurons run from the resident segment; a tile with cold ones
        is assembled in staging (hot head copied, the rest read once in long requests), so a tile's
        rows, and so its sums, are the same whatever the hot count."""
        L = self.layers[i]
        F, H, T = self.bundles.ffn, L.H, _PREFILL_TILE
        out = np.zeros((x.shape[0], self.bundles.hidden), np.float32)
        runs = []
        for k0 in range(0, F, T):
            k1 = min(F, k0 + T)
            if k1 <= H:
                self._tile(L, L.base + k0, L.base + k1, x, out)
                continue
            if k0 < H:                  # the one tile across the hot/cold boundary
                for arr in self.arrays:
                    arr[self.stage0: self.stage0 + H - k0] = arr[L.base + k0: L.base + H]
            runs += merge_runs(np.arange(max(H, k0), k1), 0, self.max_len)
        for group in self._stream(L, runs, decode=False):
            for p0, p1, recs, *_ in group:
                k0 = p0 // T * T
                s0 = self.stage0 + p0 - k0
                for name, arr in zip(FIELD_NAMES, self.arrays):
                    if arr.shape[1]:
                        arr[s0: s0 + p1 - p0] = recs[name]
                if p1 == min(F, k0 + T):
                    self._tile(L, self.stage0, self.stage0 + p1 - k0, x, out)
        return out

    def _tile(self, L: _Layer, s0: int, s1: int, x: np.ndarray, out: np.ndarray) -> None:
        """out (n, hidden) += the FFN contribution of slot rows s0..s1-1 for x (n, hidden)."""
        a = [arr[s0:s1] for arr in self.arrays]
        g = _weight(a[0], a[1], a[2], self.bits16).matmul(x)      # (n, s1-s0) f32
        u = _weight(a[3], a[4], a[5], self.bits16).matmul(x)      # (n, s1-s0) f32
        act = glu(g, u, self.act, g)
        down = _weight(a[6], a[7], a[8], self.bits16)             # (s1-s0, hidden)
        out += (act @ down.dequantize(0, s1 - s0, np.empty((s1 - s0, self.bundles.hidden), np.float32))) * L.meta.dscale


class FlashLayerFFN(Executor):
    """Layer i's FFN from the store, for one phase: decode runs FlashFFN.ffn, prefill FlashFFN.ffn_batch."""

    kind = "flash"

    def __init__(self, store: FlashFFN, i: int, batched: bool):
        self.store = store
        self.i = i
        self.batched = batched

    def describe(self) -> str:
        if self.batched:
            return f"flash (bundle file, tiles of {_PREFILL_TILE} neurons)"
        L = self.store.layers[self.i]
        return f"flash ({L.mode}, {L.H} hot + {L.C} cached of {self.store.bundles.ffn} neurons)"

    def reports(self) -> list:
        return [self.store]

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """h (n, hidden) f32 -> (n, hidden) f32, or (hidden,) f32 for one token."""
        return self.store.ffn_batch(self.i, h) if self.batched else self.store.ffn(self.i, h[0])


def store_of(executors) -> FlashFFN | None:
    """The bundle-file store a model's executors decode from, or None (tools and tests look at it)."""
    return next((c for c in executors.decode.reports() if isinstance(c, FlashFFN)), None)


def open_flash(config, plan) -> FlashFFN:
    """The store of a plan whose FFNs run from the bundle file (engine/executors/plan.FlashPlan)."""
    fp = plan.flash
    bundles = open_bundles(fp.bundles, fingerprint=fp.fingerprint, n_layers=config.num_hidden_layers,
                           hidden=config.hidden_size, ffn=config.intermediate_size)
    return FlashFFN(bundles, list(fp.layers), config.act_kind, predictors=plan.predictors, direct=plan.direct_io,
                    io_threads=fp.reader_threads, request_bytes=fp.request_bytes, policy=fp.cache_policy,
                    max_gap=fp.max_gap)


@dataclass
class _Run:
    """One layer's decode bookkeeping for one token (engine/flash_ffn.FlashFFN.ffn)."""
    L: _Layer
    slot: np.ndarray           # (n,) int32 slot row of each active neuron, -1 until its bundle lands
    miss: np.ndarray           # (m,) int64 missing positions, ascending
    miss_t: np.ndarray         # (m,) int64 their indices in the active list
    dyn: np.ndarray            # (m,) int32 dynamic-segment slot each was admitted to, -1 staged
    bounds: np.ndarray         # (c+1,) int64 chunk bounds in the active list
    need: np.ndarray           # (c,) int64 misses that must land before chunk k is complete
    landed: int = 0            # misses landed so far (a prefix of miss)
    done: int = 0              # chunks summed so far (a prefix)
    staged: int = 0            # bundles put in the staging ring so far


def _aligned(start: int, end: int) -> tuple[int, int]:
    return start // ALIGN * ALIGN, (end + ALIGN - 1) // ALIGN * ALIGN


def _threads() -> int:
    if not NUMBA:
        return 1
    import numba
    return numba.get_num_threads()
