"""What skipping memory saves: the time to read a random subset of equal chunks of a large array against
reading all of it, by chunk size and kept share. It bounds what any input-sparse kernel can gain here:
the kernel reads a kept column's rows/2 bytes (Q4; rows bytes for int8) and skips the others, and its
arithmetic only adds to this.

    python tools/bench_sparse_reads.py                          # markdown table, 1 and 2 threads
    python tools/bench_sparse_reads.py --chunks 288,1536 --keep 0.85,0.7 --threads 2

The loop loads one word per 64-byte line of each kept chunk (and its last word), in address order (as the kernel walks a
block's kept columns), splitting the chunks between the threads, and prefetches the chunk `ahead`
positions on, one prefetch per line (kernels/llvm_ir.prefetch); `ahead` is the best of a few values per
case. The array (--mb, default 256 MB) exceeds the last-level cache; each case is the best of --reps
runs, each with a fresh random subset. Reported: GB/s of bytes read, and time over the time to read all.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kernels import backend  # noqa: E402

if not backend.NUMBA:
    sys.exit("bench_sparse_reads needs numba")

import numba  # noqa: E402
from numba import prange, types  # noqa: E402
from numba.core.extending import intrinsic  # noqa: E402

from kernels.llvm_ir import prefetch  # noqa: E402


@intrinsic
def _prefetch_at(typingctx, a, i):
    sig = types.void(a, i)

    def codegen(context, builder, sig, args):
        arr = context.make_array(sig.args[0])(context, builder, args[0])
        prefetch(builder, builder.gep(arr.data, [args[1]]))
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(parallel=True, nogil=True)
def _touch(a, chunks, words, parts, ahead):
    """Sum of the first word of every line of the chunks (ids, ascending) of `words` uint64 each."""
    tot = np.zeros(parts, np.uint64)
    n = chunks.shape[0]
    for p in prange(parts):
        s = np.uint64(0)
        k0, k1 = n * p // parts, n * (p + 1) // parts
        for k in range(k0, k1):
            base = chunks[k] * words
            kp = k + ahead
            pb = chunks[kp if kp < k1 else k] * words
            for w in range(0, words, 8):
                if ahead > 0:
                    _prefetch_at(a, pb + w)
                s += a[base + w]
            s += a[base + words - 1]              # the last line, where a chunk ends inside one
        tot[p] = s
    return tot.sum()


def best_time(a, chunk, keep, threads, reps, rng) -> float:
    """Seconds to read a random `keep` share of the chunks of `chunk` bytes, best of the ahead values."""
    words = chunk // 8
    n = a.shape[0] // words
    best = float("inf")
    for ahead in sorted({2, max(2, 4096 // chunk), max(4, 16384 // chunk)}):
        for _ in range(reps):
            ids = np.arange(n, dtype=np.int64) if keep >= 1 else \
                np.sort(rng.choice(n, int(n * keep), replace=False)).astype(np.int64)
            _touch(a, ids[:64], words, threads, ahead)
            t0 = time.perf_counter()
            _touch(a, ids, words, threads, ahead)
            best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--chunks", default="256,288,512,1024,1536,2816,4096,49152",
                    help="chunk bytes, multiples of 8 (default: SmolLM2's and TinyLlama's Q4 columns, a head's)")
    ap.add_argument("--keep", default="0.9,0.8,0.7,0.5", help="kept shares (default 0.9,0.8,0.7,0.5)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    chunks = [int(c) for c in args.chunks.split(",")]
    keeps = [float(k) for k in args.keep.split(",")]
    rng = np.random.default_rng(0)
    a = rng.integers(0, 100, (args.mb << 20) // 8, dtype=np.uint64)
    print(f"array {args.mb} MB; time of a random subset of chunks over the time to read all of them\n")
    print("| threads | chunk bytes | all GB/s | " + " | ".join(f"keep {k:g}: GB/s, time" for k in keeps) + " |")
    print("|---|---|---|" + "---|" * len(keeps))
    for t in (int(v) for v in args.threads.split(",")):
        backend.set_threads(t)
        for c in chunks:
            if c % 8:
                raise SystemExit(f"--chunks: {c} is not a multiple of 8")
            a_c = a[: (a.shape[0] // (c // 8)) * (c // 8)]
            full = best_time(a_c, c, 1.0, t, args.reps, rng)
            cells = []
            for k in keeps:
                tk = best_time(a_c, c, k, t, args.reps, rng)
                cells.append(f"{a_c.nbytes * k / tk / 1e9:.1f}, {tk / full:.2f}")
            print(f"| {t} | {c} | {a_c.nbytes / full / 1e9:.1f} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
