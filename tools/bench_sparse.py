"""SYNTHETIC sparse-FFN benchmark at Llama-2-7B layer shapes (hidden 4096, FFN 11008): FFN decode time
against sparsity for the neuron-cluster kernel (kernels/sparse_ffn.py) and the dense kernels.

Weights are random bytes in the engine's layouts (Q4_0: 4-bit nibbles + f16 scales; Q8_0: int8 + f16
scales), several layers so the working set is far larger than the caches. Active sets follow a skewed
ReLU-like activation frequency: neuron j fires with probability proportional to a Zipf-like weight,
scaled so the expected density is 1 - sparsity, where the hottest 20% of neurons carry about 80% of the
activations (PowerInfer, arXiv 2312.12456, Fig. 2). Neurons are in random order by default (hot ones
scattered: the conservative case) or, with --order hot-first, stored hottest first as the planner's
reordering would leave them.

Per token and layer, what is timed:
- dense:      gate|up Q matvec (one stacked call), GLU, down matvec (the engine's dense decode FFN);
- predicted:  the low-rank predictor (rank --rank, int8 as engine/executors/predictor.py stores it, random
              weights; its cost is counted, its choice is replaced by the sampled active set) + the
              sparse kernel on that set;
- kernel:     the sparse kernel alone (for the bandwidth figure);
- records:    "pred" and "kernel" again with each neuron's gate row, up row, downT row and their scales
              in one contiguous record (kernels/neuron_records.py) instead of six separate arrays:
              same rows, same math, same bits, other addresses;
- relu-exact: dense gate matvec + selection + the sparse kernel with the gate given (separate arrays).
Rounds alternate dense and sparse (A B A B); each figure is the median over all tokens of all rounds
(the machine is shared: medians of many short samples resist other people's load). Bandwidth = bytes
the kernel must read (rows of gate, up and downT for the active neurons) / its time.

    nice -n 19 python tools/bench_sparse.py [--layers 4] [--tokens 6] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.executors.predictor import LayerPredictor  # noqa: E402
from engine.threads import set_threads  # noqa: E402
from kernels.activation import RELU, SILU, glu  # noqa: E402
from kernels.matvec import matvec_i8, matvec_q4  # noqa: E402
from kernels.neuron_records import pack  # noqa: E402
from kernels.sparse_ffn import predict, select, sparse_ffn  # noqa: E402

HIDDEN, FFN = 4096, 11008


def f16_scales(rng, shape):
    return rng.uniform(0.001, 0.02, shape).astype(np.float16).view(np.uint16)


def make_layer(rng, fmt, down_fmt):
    """Random weights: gate|up stacked (2*FFN, HIDDEN), down (HIDDEN, FFN), downT (FFN, HIDDEN)."""
    nb_h, nb_f = HIDDEN // 32, FFN // 32
    if fmt == "Q4_0":
        gu = (rng.integers(0, 256, (2 * FFN, HIDDEN // 2), dtype=np.uint8), f16_scales(rng, (2 * FFN, nb_h)),
              np.zeros((2 * FFN, 0), np.uint16))
        down = (rng.integers(0, 256, (HIDDEN, FFN // 2), dtype=np.uint8), f16_scales(rng, (HIDDEN, nb_f)),
                np.zeros((HIDDEN, 0), np.uint16))
    else:
        gu = (rng.integers(-127, 128, (2 * FFN, HIDDEN), dtype=np.int8), f16_scales(rng, (2 * FFN, nb_h)),
              np.zeros((2 * FFN, 0), np.uint16))
        down = (rng.integers(-127, 128, (HIDDEN, FFN), dtype=np.int8), f16_scales(rng, (HIDDEN, nb_f)),
                np.zeros((HIDDEN, 0), np.uint16))
    ones = np.ones(HIDDEN, np.float32)               # per-hidden-dimension output scale
    if down_fmt == "q4":
        down_t = (rng.integers(0, 256, (FFN, HIDDEN // 2), dtype=np.uint8), f16_scales(rng, (FFN, nb_h)),
                  f16_scales(rng, (FFN, nb_h)), ones)
    else:
        down_t = (rng.integers(-127, 128, (FFN, HIDDEN), dtype=np.int8), f16_scales(rng, (FFN, nb_h)),
                  np.zeros((FFN, 0), np.uint16), ones)
    gate = tuple(a[:FFN] for a in gu)
    up = tuple(a[FFN:] for a in gu)
    _, (gw, uw, dw, gd, ud, dd) = pack([gate[0], up[0], down_t[0], gate[1], up[1], down_t[1]])
    rec = (gw, gd, gate[2], uw, ud, up[2], dw, dd, down_t[2], down_t[3])
    return dict(gu=gu, gate=gate, up=up, down=down, down_t=down_t, rec=rec)


def row_bytes(arrs):
    return sum(a[0].nbytes for a in arrs)


def activation_probs(rng, sparsity, order):
    """(FFN,) probabilities with mean 1 - sparsity and a Zipf-like skew (hot 20% ~ 80% of firings);
    order "random" scatters the hot neurons, "hot-first" stores them first (the planner's bundle order)."""
    w = 1.0 / np.arange(1, FFN + 1) ** 1.5     # exponent 1.5: hot 20% ~ 81% at 90% sparsity
    if order == "random":
        w = w[rng.permutation(FFN)]
    target = (1.0 - sparsity) * FFN
    lo, hi = 0.0, 1e6                                # scale so sum(min(1, c*w)) = target
    for _ in range(100):
        c = (lo + hi) / 2
        lo, hi = (c, hi) if np.minimum(1.0, c * w).sum() < target else (lo, c)
    return np.minimum(1.0, c * w)


def hot_share(p):
    s = np.sort(p)[::-1]
    return s[: len(s) // 5].sum() / s.sum()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=6, help="tokens (passes over all layers) per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rank", type=int, default=64, help="predictor rank (its int8 weights are read every token)")
    ap.add_argument("--formats", default="Q4_0,Q8_0")
    ap.add_argument("--down", default="i8", choices=("i8", "q4"), help="storage of the transposed down copy")
    ap.add_argument("--order", default="random", choices=("random", "hot-first"),
                    help="neuron order in memory: random (worst case) or hot-first (the planner's reordering)")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    rng = np.random.default_rng(0)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"SYNTHETIC ReLU FFN, Llama-2-7B layer shapes (hidden {HIDDEN}, FFN {FFN}), {args.layers} layers, "
          f"{args.threads} threads, predictor rank {args.rank} int8, downT {args.down}, {args.order} neuron order; medians over {args.rounds} "
          f"alternating rounds x {args.tokens} tokens")
    for fmt in args.formats.split(","):
        mv = matvec_q4 if fmt == "Q4_0" else matvec_i8
        layers = [make_layer(rng, fmt, args.down) for _ in range(args.layers)]
        preds = [LayerPredictor.from_float(rng.standard_normal((HIDDEN, args.rank)).astype(np.float32) * 0.02,
                                           np.zeros(args.rank, np.float32),
                                           rng.standard_normal((args.rank, FFN)).astype(np.float32) * 0.02,
                                           np.zeros(FFN, np.float32), 0.0, 0.0).arrays for _ in range(args.layers)]
        x = rng.standard_normal(HIDDEN).astype(np.float32)
        gu_out = np.empty(2 * FFN, np.float32)
        act = np.empty((1, FFN), np.float32)
        out = np.empty(HIDDEN, np.float32)
        acts = np.empty(FFN, np.float32)
        scores = np.empty(FFN, np.float32)
        pidx = np.empty(FFN, np.int32)
        e = np.zeros(0, np.float32)
        pred_bytes = sum(a.nbytes for a in preds[0])
        dense_bytes = sum(a.nbytes for a in layers[0]["gu"]) + sum(a.nbytes for a in layers[0]["down"])
        per_neuron = row_bytes(layers[0]["gate"]) + row_bytes(layers[0]["up"]) + row_bytes(layers[0]["down_t"][:3])

        def dense_ffn(L):
            mv(*L["gu"], x, gu_out)
            glu(gu_out[None, :FFN], gu_out[None, FFN:], RELU, act)
            mv(*L["down"], act[0], out)

        # SiLU in the kernel: with random weights ReLU would zero about half of the listed neurons and skip
        # their down rows, while a real active set is, by definition, the neurons whose output is non-zero.
        def kernel(L, idx):
            sparse_ffn(*L["gate"], *L["up"], *L["down_t"], 0, x, idx, e, SILU, args.threads, acts[:len(idx)], out)

        def kernel_rec(L, idx):
            sparse_ffn(*L["rec"], 0, x, idx, e, SILU, args.threads, acts[:len(idx)], out)

        def predicted(L, P, idx, kern=kernel):
            predict(*P, x, np.float32(0.0), args.threads, scores, pidx)
            kern(L, idx)

        def relu_exact(L, idx):
            g = mv(*L["gate"], x, gu_out[:FFN])
            select(g, np.float32(0.0), pidx)   # the selection's cost; the sampled set is what is computed
            np.abs(g, out=g)                   # ... and its neurons all fire
            sparse_ffn(*L["gate"], *L["up"], *L["down_t"], 0, x, idx, g, RELU, args.threads, acts[:len(idx)], out)

        def timed(fn, sets):
            """Seconds per layer of each token (one pass over every layer)."""
            out = []
            for t in range(args.tokens):
                t0 = time.perf_counter()
                for li, L in enumerate(layers):
                    fn(li, L, sets[t][li])
                out.append((time.perf_counter() - t0) / args.layers)
            return out

        print(f"\n{fmt}: dense FFN {dense_bytes / 2**20:.1f} MiB/layer, {per_neuron} B/neuron sparse "
              f"(gate+up+downT rows), predictor {pred_bytes / 2**20:.2f} MiB/layer")
        print(f"{'':15} {'':9} {'separate arrays':-^47} {'neuron records':-^37}")
        print(f"{'sparsity':>8} {'hot20%':>6} {'dense ms':>9} {'pred ms':>8} {'ratio':>6} {'kern ms':>8} "
              f"{'ratio':>6} {'GB/s':>5} {'bw %':>5} {'pred ms':>8} {'ratio':>6} {'kern ms':>8} {'GB/s':>5} "
              f"{'bw %':>5} {'relu-ex ms':>10} {'ratio':>6} {'dense GB/s':>10}")
        for s in sparsities:
            p = activation_probs(rng, s, args.order)
            sets = [[np.flatnonzero(rng.random(FFN) < p).astype(np.int32) for _ in layers] for _ in range(args.tokens)]
            n_mean = np.mean([len(i) for row in sets for i in row])
            # warm-up (compiles on first use) then alternating rounds
            dense_ffn(layers[0])
            for fn in (kernel, kernel_rec):
                fn(layers[0], sets[0][0])
            res = {k: [] for k in ("dense", "pred", "kern", "pred_rec", "kern_rec", "relu")}
            runs = (("pred", lambda li, L, idx: predicted(L, preds[li], idx)),
                    ("pred_rec", lambda li, L, idx: predicted(L, preds[li], idx, kernel_rec)),
                    ("kern", lambda li, L, idx: kernel(L, idx)),
                    ("kern_rec", lambda li, L, idx: kernel_rec(L, idx)),
                    ("relu", lambda li, L, idx: relu_exact(L, idx)))
            for _ in range(args.rounds):
                for key, fn in runs:
                    res["dense"] += timed(lambda li, L, idx: dense_ffn(L), sets)
                    res[key] += timed(fn, sets)
            m = {k: statistics.median(v) for k, v in res.items()}
            dense_gbs = dense_bytes / m["dense"] / 1e9
            gbs = {k: n_mean * per_neuron / m[k] / 1e9 for k in ("kern", "kern_rec")}
            print(f"{s:8.2f} {hot_share(p):6.2f} {m['dense'] * 1e3:9.3f} "
                  + " ".join(f"{m[p_] * 1e3:8.3f} {m[p_] / m['dense']:6.3f} {m[k] * 1e3:8.3f} "
                             + (f"{m[k] / m['dense']:6.3f} " if k == "kern" else "")
                             + f"{gbs[k]:5.1f} {100 * gbs[k] / dense_gbs:5.0f}"
                             for p_, k in (("pred", "kern"), ("pred_rec", "kern_rec")))
                  + f" {m['relu'] * 1e3:10.3f} {m['relu'] / m['dense']:6.3f} {dense_gbs:10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
