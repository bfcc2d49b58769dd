"""The flash FFN at Llama-2-7B layer shapes on REAL activation traces: SmolLM2's FFN activations recorded
on text, tiled to 11008 neurons, replayed through the bundle file in frequency order and in co-activation
order (planner/coactivation.py), against the resident run, in alternating rounds.

    python tools/bench_flash_traces.py [--model smollm2-135m-instruct] [--layers 4] [--density 0.1]
        [--rounds 3] [--io-threads 16] [--dir /work/scratch]

Traces: planner.model_profile.profile_model runs the model over planner/data/calibration.txt (1024
tokens) and keeps |act| of every FFN neuron. A 7B-shape layer i is 7 whole tiles of 1536 neurons and a
partial one, tile k taken from source layer (7i + k) mod 30, so that tiles are different neurons of the
same tokens (copies of one layer would fire identically and flatter any co-activation order). A neuron
is active where |act| is above the quantile that leaves --density of them active on the first two thirds
of the tokens (the fit part: frequencies, hot set and co-activation order come from it); the last third
is replayed, its first --warm tokens untimed. The weights are random (what is read, not what it
computes, is measured here), as in tools/bench_flash.py; FFN time only.

Budget 50% of the FFN bytes, as in tools/bench_flash.py. Variants:
- resident: every bundle in memory;
- static split: the budget as the hot segment (frequency order), the rest read per token (kernel AIO and
  Python reader threads), then the same with the cold neurons in co-activation order;
- cache: 20% hot, the rest of the budget a frequency-aware dynamic cache (real tokens repeat neurons).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_flash import FFN, HIDDEN, io_records, random_layer, run, write  # noqa: E402
from engine.executors.flash_ffn import LayerPlan  # noqa: E402
from engine.flash.bundles import open_bundles  # noqa: E402
from planner.bundles import hot_to_cold  # noqa: E402
from planner.coactivation import coactivation_order, requests_per_token  # noqa: E402


def traces(model: str, layers: int, density: float) -> tuple[list[np.ndarray], int]:
    """Per 7B-shape layer, (n_tokens, FFN) bool active masks; and the fit/replay split point."""
    import engine
    from planner.model_profile import profile_model

    prof = profile_model(engine.load(model))
    act = prof.act_abs                                            # (src_layers, n, src_ffn) f16 |act|
    n_src, n, f_src = act.shape
    cut = n * 2 // 3
    out = []
    for i in range(layers):
        tiles, k = [], 0
        while sum(t.shape[1] for t in tiles) < FFN:
            tiles.append(act[(7 * i + k) % n_src])
            k += 1
        a = np.concatenate(tiles, axis=1)[:, :FFN].astype(np.float32)   # (n, FFN) |act|
        thr = np.quantile(a[:cut], 1.0 - density)
        out.append(a > thr)
    return out, cut


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--warm", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--io-threads", type=int, default=16)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    masks, cut = traces(a.model, a.layers, a.density)
    n = masks[0].shape[0]
    lw = random_layer(rng)
    R = None
    paths = {k: Path(a.dir) / f"bench_flash_traces_{os.getpid()}_{k}.bundles" for k in ("freq", "coact")}
    freq_orders = [hot_to_cold(m[:cut].mean(0)) for m in masks]
    try:
        write(paths["freq"], lw, freq_orders)
        bf = {"freq": open_bundles(paths["freq"])}
        R = bf["freq"].record_bytes
        budget = FFN * R // 2 // R
        io_n = io_records(R, a.layers, a.io_threads)
        hot_static = budget - io_n
        hot_n = FFN // 5
        co_orders = [coactivation_order(m[:cut], o, hot_static) for m, o in zip(masks, freq_orders)]
        write(paths["coact"], lw, co_orders)
        bf["coact"] = open_bundles(paths["coact"])
        print(f"REAL activation traces of {a.model} (tiled), SYNTHETIC random weights at Llama-2-7B shapes (hidden "
              f"{HIDDEN}, FFN {FFN}), {a.layers} layers, {R} B per bundle; {n} calibration tokens: {cut} fit the order, "
              f"{n - cut} replayed ({a.warm} warm-up); {a.density:.0%} active per token; prepared in "
              f"{time.perf_counter() - t0:.0f} s")
        replay = [[np.flatnonzero(m[t]).astype(np.int32) for m in masks] for t in range(cut, n)]
        xs = [rng.standard_normal(HIDDEN).astype(np.float32) for _ in replay]
        gap = max(0, 4096 // R)
        for name, orders in (("frequency", freq_orders), ("co-activation", co_orders)):
            req = np.mean([requests_per_token(m[cut:], o, hot_static, gap, (256 << 10) // R)
                           for m, o in zip(masks, orders)])
            print(f"  {name} order: {req:.1f} requests per layer and token at the static split (offline count)")
        # Temporal locality of the replayed tokens: the share of a token's active neurons active on the one before.
        reuse = np.mean([(m[t] & m[t - 1]).sum() / max(1, m[t].sum()) for m in masks for t in range(cut + 1, n)])
        print(f"  neurons active on the token before: {reuse:.0%} (independent draws at this density: {a.density:.0%})")
        th = a.io_threads
        budget_cache = budget - hot_n - io_n
        variants = [
            ("resident", "freq", [LayerPlan("given", FFN, 0)] * a.layers, dict(pipeline=False)),
            ("static split, frequency order, python readers", "freq", [LayerPlan("given", hot_static, 0)] * a.layers,
             dict(pipeline=True, io_threads=th)),
            ("static split, frequency order, aio", "freq", [LayerPlan("given", hot_static, 0)] * a.layers,
             dict(pipeline=True, io_threads=th, reader_kind="aio")),
            ("static split, co-activation order, aio", "coact", [LayerPlan("given", hot_static, 0)] * a.layers,
             dict(pipeline=True, io_threads=th, reader_kind="aio")),
            ("20% hot + frequency-aware cache, aio", "freq", [LayerPlan("given", hot_n, budget_cache)] * a.layers,
             dict(pipeline=True, io_threads=th, reader_kind="aio", policy="freq")),
        ]
        got = {v[0]: [] for v in variants}
        stats = {}
        for _ in range(a.rounds):
            for name, key, plans, kw in variants:
                tps, s, _ = run(bf[key], plans, replay, xs, a.warm, **kw)
                got[name].append(tps)
                stats[name] = s
        print(f"\nbudget 50% of FFN bytes = {budget} bundles per layer; static split {hot_static} hot; cache variant "
              f"{hot_n} hot + {budget_cache} cached; {a.rounds} alternating rounds, median; x resident = median of "
              "per-round ratios")
        print("| variant | tok/s | x resident | cache hit | requests/token | MiB/token | I/O wait ms/token |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        base = np.array(got["resident"])
        for name, *_ in variants:
            s = stats[name]
            print(f"| {name} | {np.median(got[name]):.1f} | {np.median(np.array(got[name]) / base):.3f} "
                  f"| {s['cache_hit_rate']:.0%} | {s['requests_per_token']:.0f} | {s['flash_bytes_per_token'] / 2**20:.2f} "
                  f"| {s['io_wait_ms_per_token']:.1f} |")
    finally:
        for p in paths.values():
            p.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
