"""Input-sparse matvec (kernels/input_sparse.py, the Q4C layout) against the dense Q4 matvec of the same
weight, by input sparsity.

    python tools/bench_input_sparse.py                                   # TinyLlama shapes, markdown
    python tools/bench_input_sparse.py --shapes 576x1536,1536x576 --threads 1,2 --format Q4_1

For each shape a random valid GGUF weight (tools/bench_kernels.gguf_bytes) is loaded as the engine
loads it (Q4 layout) and packed into Q4C. x is Gaussian with per-channel scales drawn log-uniformly
over a factor of 10, like a normed hidden state; the threshold for sparsity s is the s-quantile of |x|.
Calls alternate dense, sparse, dense, sparse... in blocks, each cycling through enough copies of the
weight to exceed --cold-mb (every call reads from DRAM, as decode does). Reported per shape, threads
and sparsity: median microseconds of each, sparse/dense speed ratio, and GB/s: dense's over its bytes,
sparse's over the bytes it reads (the kept columns' nibbles plus the scales of every block with a kept
column), and the share of the dense bytes that is.
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
from kernels import backend, input_sparse  # noqa: E402

SHAPES = [(2048, 2048), (256, 2048), (5632, 2048), (2048, 5632)]     # TinyLlama: q/o, k/v, gate/up, down
SPARSITIES = [0.0, 0.1, 0.25, 0.4, 0.5, 0.6, 0.7]


def read_bytes(qc, dc, mc, xq) -> int:
    """Bytes the sparse kernel reads for rounded input xq: kept columns and their blocks' scales."""
    kept = xq != 0
    blocks = kept.reshape(-1, 32).any(axis=1).sum()
    return int(kept.sum()) * qc.shape[1] + int(blocks) * (dc.shape[1] * dc.itemsize + mc.shape[1] * mc.itemsize)


def bench(rows, cols, fmt, threads, sparsities, reps, cold_mb, rng):
    raw = gguf_bytes(fmt, rows, cols, rng)
    w = gq.weight_from_gguf(TYPE_IDS[fmt], raw, (rows, cols), fmt, "bench")
    n = copies_for(w.nbytes, cold_mb)
    dense = [w] + [type(w)(*[a.copy() for a in w._arrays()]) for _ in range(n - 1)]
    cols_ = [input_sparse.pack_q4c(v.qs, v.d, v.m) for v in dense]
    x = (rng.standard_normal(cols) * 10.0 ** rng.uniform(-0.5, 0.5, cols)).astype(np.float32)
    out = np.empty(rows, np.float32)
    rowsout = []
    for t in threads:
        backend.set_threads(t)
        for s in sparsities:
            thr = np.float32(np.quantile(np.abs(x), s)) if s > 0 else np.float32(0.0)
            for v, c in zip(dense, cols_):                    # warm-up: compile, fault pages in
                v._matvec(x, out)
                input_sparse.matvec_q4c(*c, x, thr, out)
            td, ts = [], []
            for _ in range(reps):
                for v in dense:
                    t0 = time.perf_counter()
                    v._matvec(x, out)
                    td.append(time.perf_counter() - t0)
                for c in cols_:
                    t0 = time.perf_counter()
                    input_sparse.matvec_q4c(*c, x, thr, out)
                    ts.append(time.perf_counter() - t0)
            xq = np.empty(cols, np.int8)
            nb = cols // 32
            input_sparse.select_numpy(x, thr, xq, np.empty(nb, np.float32), np.empty(nb, np.float32),
                                      np.empty(nb, np.int32), np.empty(cols, np.int32), np.empty(nb + 1, np.int32))
            md, ms = statistics.median(td), statistics.median(ts)
            rb = read_bytes(*cols_[0], xq)
            rowsout.append(dict(shape=f"{rows}x{cols}", threads=t, sparsity=s, achieved=float((xq == 0).mean()),
                                dense_us=md * 1e6, sparse_us=ms * 1e6, speed=md / ms,
                                dense_gbs=w.nbytes / md / 1e9, sparse_gbs=rb / ms / 1e9, bytes_share=rb / w.nbytes))
    return rowsout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--format", default="Q4_1", choices=["Q4_0", "Q4_1"])
    ap.add_argument("--sparsities", default=",".join(str(s) for s in SPARSITIES))
    ap.add_argument("--reps", type=int, default=5, help="passes over the copies per sparsity (default 5)")
    ap.add_argument("--cold-mb", type=float, default=96.0, help="working set per variant (default 96 MB)")
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    threads = [int(t) for t in args.threads.split(",")]
    sparsities = [float(s) for s in args.sparsities.split(",")]
    print(f"{args.format}, cold working set {args.cold_mb:g} MB, {args.reps} passes, numba={backend.NUMBA}\n")
    print("| shape | threads | sparsity (achieved) | dense us | sparse us | sparse speed vs dense | dense GB/s "
          "| sparse GB/s of bytes read | bytes read vs dense |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        for r in bench(rows, cols, args.format, threads, sparsities, args.reps, args.cold_mb, rng):
            print(f"| {r['shape']} | {r['threads']} | {r['sparsity']:.2f} ({r['achieved']:.2f}) | {r['dense_us']:.1f} "
                  f"| {r['sparse_us']:.1f} | {r['speed']:.2f} | {r['dense_gbs']:.1f} | {r['sparse_gbs']:.1f} "
                  f"| {r['bytes_share']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
