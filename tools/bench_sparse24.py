"""The 2:4 kernels (kernels/sparse24.py) against the dense ones at the same shape, side by side:

    python tools/bench_sparse24.py                       # decode matvec and prefill GEMM, 1 and 2 threads
    python tools/bench_sparse24.py --shapes 4096x11008 --threads 2 --reps 60 --tokens 128

Pairs: S8 (int8 2:4) against Q8_0 (the dense int8 layout), S4 (4-bit 2:4) against Q4_0 and Q4_1 (the
dense 4-bit layouts). Dense weights are random valid GGUF blocks converted as the engine converts them
(tools/bench_kernels.py); the 2:4 weights are a random matrix pruned by magnitude and packed. Each
weight cycles through enough copies that its working set exceeds --cold-mb (more than the last-level
cache), so every decode call reads from DRAM. Calls alternate between the formats of a pair (A B A B),
and the ratio is the median of the per-pair ratios, dense time over 2:4 time (above 1: 2:4 faster).
Prefill times the int8 GEMM (Weight.matmul_int8) on --tokens tokens, alternating the same way.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import TYPE_IDS, copies_for, gguf_bytes  # noqa: E402
from engine.formats import gguf_quants as gq  # noqa: E402
from engine.model.weights import S24Weight  # noqa: E402
from kernels import backend, sparse24  # noqa: E402

SHAPES = [(2048, 5632), (5632, 2048), (4096, 11008), (11008, 4096)]
PAIRS = [("Q8_0", "s8"), ("Q4_0", "s4"), ("Q4_1", "s4")]


def weights(rows: int, cols: int, rng, cold_mb: float) -> dict:
    """{format: [copies]} for the dense formats and the 2:4 forms the pairs name."""
    out = {}
    for fmt in sorted({a for a, _ in PAIRS}):
        raw = gguf_bytes(fmt, rows, cols, rng)
        w = gq.weight_from_gguf(TYPE_IDS[fmt], raw, (rows, cols), fmt, "bench")
        out[fmt] = [w] + [type(w)(*[a.copy() for a in w._arrays()]) for _ in range(copies_for(w.nbytes, cold_mb) - 1)]
    f = rng.standard_normal((rows, cols), dtype=np.float32)
    keep = sparse24.mask_24(f)
    for form in sorted({b for _, b in PAIRS}):
        qs, d = sparse24.pack(f * keep, keep, form)
        w = S24Weight(qs, d, np.zeros((rows, 0), np.uint16))
        out[form] = [w] + [S24Weight(qs.copy(), d.copy(), w.m) for _ in range(copies_for(w.nbytes, cold_mb) - 1)]
    return out


def pair_ratios(run_a, run_b, reps: int) -> tuple[float, float, float]:
    """(median a seconds, median b seconds, median of a/b per alternating pair)."""
    ta, tb = [], []
    for _ in range(reps):
        for fn, ts in ((run_a, ta), (run_b, tb)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb), statistics.median(a / b for a, b in zip(ta, tb))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="ROWSxCOLS,...")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=40, help="alternating pairs of decode calls")
    ap.add_argument("--tokens", type=int, default=128, help="prefill tokens (0: no prefill rows)")
    ap.add_argument("--prefill-reps", type=int, default=7)
    ap.add_argument("--cold-mb", type=float, default=128.0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    print(f"| shape | threads | kernel | dense | 2:4 | dense us | 2:4 us | 2:4 bytes / dense | dense / 2:4 time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        ws = weights(rows, cols, rng, args.cold_mb)
        x = rng.standard_normal(cols, dtype=np.float32)
        xs = rng.standard_normal((args.tokens, cols), dtype=np.float32)
        out = np.empty(rows, np.float32)
        for t in threads:
            backend.set_threads(t)
            for dense, form in PAIRS:
                turn = {dense: 0, form: 0}

                def call(f):
                    copies = ws[f]
                    w = copies[turn[f] % len(copies)]
                    turn[f] += 1
                    w._matvec(x, out)

                for _ in range(3):
                    call(dense), call(form)
                for w in ws[dense] + ws[form]:
                    w._matvec(x, out)
                a, b, r = pair_ratios(lambda: call(dense), lambda: call(form), args.reps)
                size = ws[form][0].nbytes / ws[dense][0].nbytes
                print(f"| {rows}x{cols} | {t} | decode matvec | {dense} | {form} | {a * 1e6:.0f} | {b * 1e6:.0f} | "
                      f"{size:.3f} | **{r:.2f}x** |", flush=True)
                if args.tokens:
                    wd, wf = ws[dense][0], ws[form][0]
                    wd.matmul_int8(xs), wf.matmul_int8(xs)
                    a, b, r = pair_ratios(lambda: wd.matmul_int8(xs), lambda: wf.matmul_int8(xs), args.prefill_reps)
                    print(f"| {rows}x{cols} | {t} | prefill GEMM, {args.tokens} tokens | {dense} | {form} | "
                          f"{a * 1e6:.0f} | {b * 1e6:.0f} | {size:.3f} | **{r:.2f}x** |", flush=True)
        del ws
    return 0


if __name__ == "__main__":
    sys.exit(main())
