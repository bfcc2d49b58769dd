"""One decode matvec of this checkout against another checkout's, in alternating processes.

    git worktree add ../before REV
    python tools/bench_matvec_ab.py ../before --format Q4_0 --shape 4096x11008 --threads 2 --rounds 3

Each measurement is a fresh process that imports one tree's engine, converts the same random-valid GGUF
blocks (tools/bench_kernels.gguf_bytes, seed 0) to that tree's layout, cycles the calls through copies
of the weight filling 96 MiB (so every call reads from DRAM, as decode does) and prints the median of
60 calls. Rounds alternate the trees (this one first); the speedup is the other tree's median time over
this one's, with each round's pair.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

_ONE = r'''
import sys, time
import numpy as np
tree = sys.argv[1]
sys.path[:0] = [tree, tree + "/tools"]
from kernels import backend
from engine.formats import gguf_quants as gq
import bench_kernels as bk
rng = np.random.default_rng(0)
fmt, (rows, cols) = sys.argv[2], map(int, sys.argv[3].split("x"))
backend.set_threads(int(sys.argv[4]))
w = gq.weight_from_gguf(bk.TYPE_IDS[fmt], bk.gguf_bytes(fmt, rows, cols, rng), (rows, cols), fmt, "bench")
ws = [w] + [type(w)(*[a.copy() for a in w._arrays()]) for _ in range(bk.copies_for(w.nbytes, 96) - 1)]
x = rng.standard_normal(cols, dtype=np.float32)
out = np.empty(rows, np.float32)
for v in ws:
    v._matvec(x, out)
times = []
for i in range(60):
    t0 = time.perf_counter_ns()
    ws[i % len(ws)]._matvec(x, out)
    times.append(time.perf_counter_ns() - t0)
print(np.median(times) / 1e3)
'''


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("other", type=Path, help="the other checkout (a git worktree)")
    ap.add_argument("--format", default="Q4_0", help="a GGUF type of tools/bench_kernels.py")
    ap.add_argument("--shape", default="4096x11008", help="ROWSxCOLS")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    trees = [here, args.other.resolve()]
    times: dict[Path, list[float]] = {t: [] for t in trees}
    for _ in range(args.rounds):
        for tree in trees:
            run = subprocess.run([sys.executable, "-c", _ONE, str(tree), args.format, args.shape, str(args.threads)],
                                 capture_output=True, text=True)
            if run.returncode:
                sys.exit(f"the run in {tree} failed:\n{run.stderr.strip()}")
            times[tree].append(float(run.stdout.split()[-1]))
    a, b = (statistics.median(times[t]) for t in trees)
    pairs = ", ".join(f"{y / x:.2f}" for x, y in zip(*(times[t] for t in trees)))
    print(f"{args.format} {args.shape}, {args.threads} threads: this tree {a:.1f} us, {trees[1].name} {b:.1f} us, "
          f"speedup {b / a:.2f}x (pairs {pairs})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
