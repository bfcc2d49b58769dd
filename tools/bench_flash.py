"""Flash-resident FFN ablation on a SYNTHETIC ReLU model at Llama-2-7B layer shapes (PowerInfer-2 Table
style: naive -> + bundling -> + cache -> + pipeline, against the fully resident sparse run).

    nice -n 19 /work/venv/bin/python tools/bench_flash.py [--layers 4] [--tokens 32] [--warm 32]

What it builds (label every figure synthetic):
- random weights, hidden 4096, FFN 11008, Q4_1 gate/up, down re-quantized transposed to int8 rows
  (engine.model.layout.transpose_down "i8"); one layer's weights reused for every layer, each layer its own
  region of the bundle file on disk (so every layer is read from the device, never from another's copy);
- skewed activations: neuron j fires with probability p_j from a power law over a random hot-to-cold
  rank, scaled so 10% fire per token (90% sparsity; probabilities clipped at 1) and the hottest 20% carry ~80% of the firings.
  Tokens are drawn independently (no temporal locality: a pessimistic case for any cache);
- the active set of each token comes from an oracle (those draws); predictor cost is excluded from every
  variant alike. FFN time only (no attention), so "tok/s" is FFN-decode tok/s over the layers built;
- memory budget: 50% of the FFN bytes (in bundle format). Every variant keeps the hottest 20% resident;
  the cache variants get the rest of the budget as the dynamic segment, minus staging and read buffers.
Reads use O_DIRECT (the file's page cache is also dropped before each run with posix_fadvise DONTNEED).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.executors.flash_ffn import FlashFFN, LayerPlan, io_bytes  # noqa: E402
from engine.flash.bundles import open_bundles  # noqa: E402
from engine.model.layout import quantize_q4  # noqa: E402
from engine.model.weights import Q4Weight  # noqa: E402
from kernels.activation import RELU  # noqa: E402
from planner.bundles import write_bundles  # noqa: E402

HIDDEN, FFN = 4096, 11008


def skewed_probs(rng, ffn: int, active: float = 0.10, hot_share: float = 0.80) -> np.ndarray:
    """(ffn,) firing probabilities, a power law in a random rank order, mean `active`, with the top
    20% of neurons carrying about `hot_share` of the firings (alpha found by bisection)."""
    ranks = np.arange(1, ffn + 1, dtype=np.float64)

    def scaled(alpha):
        # The scale that gives mean `active` after clipping probabilities at 1 (bisection on log-scale).
        base = ranks ** -alpha
        lo_c, hi_c = 0.0, 1.0 / base.min()
        for _ in range(60):
            c = (lo_c + hi_c) / 2
            lo_c, hi_c = (c, hi_c) if np.minimum(1.0, c * base).mean() < active else (lo_c, c)
        return np.minimum(1.0, c * base)

    lo, hi = 0.0, 3.0
    for _ in range(30):
        alpha = (lo + hi) / 2
        p = scaled(alpha)
        share = p[: ffn // 5].sum() / p.sum()
        lo, hi = (alpha, hi) if share < hot_share else (lo, alpha)
    return p[rng.permutation(ffn).argsort()]       # neuron j gets the probability of its random rank


def random_layer(rng):
    """One random Q4_1 FFN layer at the 7B shape (the same weights serve every layer)."""
    g = quantize_q4((rng.standard_normal((FFN, HIDDEN)) * 0.02).astype(np.float32))
    u = quantize_q4((rng.standard_normal((FFN, HIDDEN)) * 0.02).astype(np.float32))
    d = quantize_q4((rng.standard_normal((HIDDEN, FFN)) * 0.02).astype(np.float32))
    return types.SimpleNamespace(w_gate=Q4Weight(*g), w_up=Q4Weight(*u), w_down=Q4Weight(*d))


def write(path: Path, lw, orders: list[np.ndarray]) -> None:
    write_bundles(path, [lw] * len(orders), orders, fingerprint="synthetic", act="relu", down_format="i8")


def build(path: Path, layers: int, rng) -> tuple[list, list[np.ndarray]]:
    lw = random_layer(rng)
    probs = [skewed_probs(rng, FFN) for _ in range(layers)]
    orders = [np.argsort(-p, kind="stable").astype(np.int32) for p in probs]   # hot to cold, as the planner
    write(path, lw, orders)
    return probs, orders


def io_records(record_bytes: int, layers: int, threads: int) -> int:
    """Bundles' worth of one layer's share of the read arena and staging ring (the layers share them)
    at the executor's default request size."""
    return -(-io_bytes(record_bytes, FFN, threads, 256 << 10) // record_bytes // layers)


def run(bf, plans, sets, xs, warm: int, reader_kind: str = "python", **kw) -> tuple[float, dict, int]:
    ff = FlashFFN(bf, plans, RELU, reader_kind=reader_kind, **kw)
    try:
        ff.reader.drop_cache()
        n_layers = len(plans)
        for t in range(warm):                                     # fills the cache; not timed
            for i in range(n_layers):
                ff.ffn(i, xs[t], sets[t][i])
        ff.stats = type(ff.stats)()
        t0 = time.perf_counter()
        for t in range(warm, len(sets)):
            for i in range(n_layers):
                ff.ffn(i, xs[t], sets[t][i])
        dt = time.perf_counter() - t0
        return (len(sets) - warm) / dt, ff.stats.summary() | {"io": ff.reader.mode_note}, ff.resident_bytes
    finally:
        ff.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24, help="timed tokens per variant")
    ap.add_argument("--warm", type=int, default=128, help="untimed tokens that warm the cache first")
    ap.add_argument("--naive-tokens", type=int, default=4)
    ap.add_argument("--io-threads", type=int, default=4)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    ap.add_argument("--readers", default="aio,native",
                    help="native readers for the last rows (engine/flash/open_reader.py kinds); the rows above use python")
    ap.add_argument("--keep", action="store_true", help="keep the bundle file")
    ap.add_argument("--ab", type=int, default=0, metavar="ROUNDS",
                    help="then alternate the resident run and the planner's split with each reader ROUNDS times")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    path = Path(a.dir) / f"bench_flash_{os.getpid()}.bundles"
    t0 = time.perf_counter()
    probs, orders = build(path, a.layers, rng)
    try:
        bf = open_bundles(path)
        R = bf.record_bytes
        print(f"SYNTHETIC ReLU FFN, Llama-2-7B shapes (hidden {HIDDEN}, FFN {FFN}), {a.layers} layers, Q4_1 gate/up + "
              f"int8 downT: {R} B per bundle, file {path.stat().st_size / 2**20:.0f} MiB on {a.dir} "
              f"(built in {time.perf_counter() - t0:.0f} s)")
        inv = [np.argsort(o) for o in orders]
        n_tok = a.warm + a.tokens
        sets = [[np.flatnonzero(rng.random(FFN) < p).astype(np.int32) for p in probs] for _ in range(n_tok)]
        xs = [rng.standard_normal(HIDDEN).astype(np.float32) for _ in range(n_tok)]
        act = np.mean([len(s) for row in sets for s in row]) / FFN
        hot_n = FFN // 5
        hot_frac = np.mean([(inv[i][s] < hot_n).mean() for row in sets for i, s in enumerate(row)])
        print(f"activations: {act:.1%} of neurons per token; the hottest 20% carry {hot_frac:.0%} of them; tokens "
              "independent; oracle active sets (predictor cost excluded from every variant)")
        ffn_bytes = FFN * R
        budget_neurons = ffn_bytes // 2 // R
        io_n = io_records(R, a.layers, a.io_threads)
        cache = budget_neurons - hot_n - io_n
        print(f"budget 50% of FFN bytes = {budget_neurons} bundles per layer: {hot_n} hot (resident segment) + "
              f"{cache} cold cache + {io_n} for read buffers and staging ({a.io_threads} readers)")
        resident = [LayerPlan("given", FFN, 0)] * a.layers
        no_cache = [LayerPlan("given", hot_n, 0)] * a.layers
        cached = [LayerPlan("given", hot_n, cache)] * a.layers
        rows = []
        tps, s, mem = run(bf, resident, sets[: a.warm + a.tokens], xs, a.warm, pipeline=False)
        rows.append(("resident sparse (all FFN in memory)", tps, s, mem))
        naive_n = a.naive_tokens
        tps, s, mem = run(bf, no_cache, sets[:naive_n], xs, 0, pipeline=False, bundled=False, io_threads=1)
        rows.append(("naive: 3 reads per needed neuron, no cache, no pipeline", tps, s, mem))
        tps, s, mem = run(bf, no_cache, sets[:naive_n * 2], xs, 0, pipeline=False, io_threads=1)
        rows.append(("+ bundling: 1 read per bundle run (merged)", tps, s, mem))
        best = None
        for policy in ("lru", "freq", "window"):
            tps, s, mem = run(bf, cached, sets, xs, a.warm, pipeline=False, io_threads=1, policy=policy)
            rows.append((f"+ cache ({policy})", tps, s, mem))
            if best is None or s["cache_hit_rate"] > best[1]:
                best = (policy, s["cache_hit_rate"])
        tps, s, mem = run(bf, cached, sets, xs, a.warm, pipeline=True, io_threads=a.io_threads, policy=best[0])
        rows.append((f"+ pipeline ({best[0]}, {a.io_threads} reader threads)", tps, s, mem))
        # The planner's split for independent tokens: the whole budget as the static hot segment (its
        # neurons in calibration-frequency order), no dynamic cache; deeper I/O queues.
        def static(threads: int) -> list:
            return [LayerPlan("given", budget_neurons - io_records(R, a.layers, threads), 0)] * a.layers

        for th in sorted({a.io_threads, 2 * a.io_threads}):
            tps, s, mem = run(bf, static(th), sets, xs, a.warm, pipeline=True, io_threads=th)
            rows.append((f"static hot = budget, pipeline, {th} reader threads", tps, s, mem))
        # The same split with the readers that issue requests without Python per request.
        for kind in a.readers.split(","):
            for th in sorted({a.io_threads, 2 * a.io_threads}):
                tps, s, mem = run(bf, static(th), sets, xs, a.warm, pipeline=True, io_threads=th, reader_kind=kind)
                rows.append((f"static hot = budget, pipeline, {kind} reader, depth {th}", tps, s, mem))
        base, naive = rows[0][1], rows[1][1]
        print(f"\n{'variant':58s} {'tok/s':>7s} {'x naive':>8s} {'x resid':>8s} {'hit':>5s} {'MiB/tok':>8s} "
              f"{'req/tok':>8s} {'wait ms':>8s} {'overlap':>7s} {'RAM MiB':>8s}")
        for name, tps, s, mem in rows:
            print(f"{name:58s} {tps:7.2f} {tps / naive:8.1f} {tps / base:8.2f} {s['cache_hit_rate']:5.0%} "
                  f"{s['flash_bytes_per_token'] / 2**20:8.2f} {s['requests_per_token']:8.0f} "
                  f"{s['io_wait_ms_per_token']:8.1f} {s['overlap_ratio']:7.0%} {mem / 2**20:8.0f}")
        if a.ab:
            # Side by side: the resident run and the planner's split with each reader, alternating.
            variants = [("resident", resident, dict(pipeline=False))] + [
                (f"{kind} reader, depth {th}", static(th), dict(pipeline=True, io_threads=th, reader_kind=kind))
                for kind in ["python"] + a.readers.split(",") for th in sorted({a.io_threads, 2 * a.io_threads})]
            got = {name: [] for name, _, _ in variants}
            for _ in range(a.ab):
                for name, plans, kw in variants:
                    got[name].append(run(bf, plans, sets, xs, a.warm, **kw)[0])
            print(f"\nalternating rounds ({a.ab}): tok/s per round, median, and median of the per-round ratio to resident")
            for name, _, _ in variants:
                ratio = np.median(np.array(got[name]) / np.array(got["resident"]))
                print(f"  {name:28s} {' '.join(f'{v:7.1f}' for v in got[name])}   median {np.median(got[name]):7.1f}"
                      f"   x resident {ratio:.3f}")
        print(f"\nI/O: {rows[1][2]['io']}; FFN bytes {a.layers * ffn_bytes / 2**20:.0f} MiB, budget "
              f"{a.layers * ffn_bytes / 2 / 2**20:.0f} MiB; cache warmed {a.warm} tokens, timed {a.tokens} "
              f"(naive {naive_n}, bundling {naive_n * 2})")
    finally:
        if not a.keep:
            path.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
