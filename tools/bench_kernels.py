"""Decode matvec speed per weight format, against numpy's float32 GEMV at the same shape.

    python tools/bench_kernels.py                      # markdown table
    python tools/bench_kernels.py --reps 30 --json out.json
    python tools/bench_kernels.py --formats Q4_1,Q8_0 --shapes 576x1536 --threads 2

Weights are random valid GGUF blocks converted by engine.formats.gguf_quants.weight_from_gguf, so the kernels
read exactly the arrays the engine reads (F32 goes through the same path: numpy/BLAS GEMV). Reported:

  us        median time of one matvec call (Weight._matvec, the engine's call), microseconds
  GB/s      Weight.nbytes / median time: the bytes the kernel actually reads (float32 scales included)
  GGUF GB/s the tensor's bytes in the GGUF file / median time
  vs f32    GB/s divided by the F32 GEMV's GB/s at the same shape and thread count

Fairness to a noisy machine: repetitions run in blocks of 5; in each block every (threads, format)
pair runs in a fresh random order, so slow spells hit all formats alike, and the median is taken per
pair. With 2+ threads the F32 reference (OpenBLAS) is timed as its own group, with a pause after
each group: OpenBLAS's and numba's thread pools both spin for a while after a call, and interleaving
them call by call on 2 cores made 2-thread calls of either take milliseconds. After the pause each group
first makes WARM_CALLS untimed calls: on this VM the first two calls after an idle pause wait
milliseconds for the sleeping pool's thread (and its vCPU) to wake, whichever the format, and a group of
five F32 calls would otherwise count two such calls per block. The load average before and after is
printed: compare runs only when it was low, and read ratios rather than absolute GB/s.

READ (--formats READ, numba only) is a floor, not a format: a Q4_0 weight's bytes (qs and d) read and
summed, nothing else, in one numba parallel call split by rows as the kernels split them. It pays what
any per-call Q4_0 kernel pays (the call, the thread team's fork and join, each thread's stream starting
cold), so its "vs f32" is the most a Q4_0 kernel could show at that shape in that run.

By default each format cycles through enough copies of its weight that its working set exceeds
--cold-mb (more than the last-level cache), so every call reads its weight from DRAM as decode does;
--hot times one copy (cache-resident for small shapes). --arena puts each format's copies side by side in
one allocation, which numpy backs with transparent huge pages where the kernel offers them (as it backs
the engine's stacked layer weights); by default each copy is an allocation of its own, on 4 KiB pages
below numpy's 4 MiB threshold. K-quants are skipped at shapes whose row
length is not a multiple of their 256-value super-block (e.g. 1536x576).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.formats import gguf_quants as gq  # noqa: E402
from kernels import backend  # noqa: E402

FORMATS = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K"]
TYPE_IDS = {"F32": gq.F32, "F16": gq.F16, "BF16": gq.BF16, "Q4_0": gq.Q4_0, "Q4_1": gq.Q4_1,
            "Q8_0": gq.Q8_0, "Q4_K": gq.Q4_K, "Q5_0": gq.Q5_0, "Q5_1": gq.Q5_1, "Q5_K": gq.Q5_K, "Q6_K": gq.Q6_K}
# byte offsets of the float16 scale fields inside one block (overwritten with finite values)
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q8_0": (0,), "Q4_K": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2),
                "Q5_K": (0, 2), "Q6_K": (208,)}
SHAPES = [(576, 1536), (1536, 576), (2048, 5632), (4096, 11008)]
# the target: Q8_0 and the 4-, 5- and 6-bit formats reach this share of the f32 GEMV bandwidth
TARGET = 0.6
TARGETED = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K")
# untimed calls that open every group of calls after a pause (2+ threads): the pool wakes during them
WARM_CALLS = 4


if backend.NUMBA:
    from numba import config, get_num_threads, njit, prange

    @njit(parallel=True)                                  # uncached: numba declines to cache this tool kernel
    def _read_rows(qs, d, sums):
        """qs (rows, cols/2) uint8 and d (rows, cols/32) uint16, both C-contiguous, read and summed; sums
        (threads,) uint32 gets each thread's sum over its contiguous half of the rows, read as one run of
        bytes per array (short rows cost no per-row loop)."""
        rows = qs.shape[0]
        q1 = qs.reshape(-1)                               # (rows * cols/2,) uint8
        d1 = d.reshape(-1)                                # (rows * cols/32,) uint16
        nq, nd = qs.shape[1], d.shape[1]
        nt = get_num_threads()
        for t in prange(nt):
            r0, r1 = rows * t // nt, rows * (t + 1) // nt
            qt, dt = q1[r0 * nq:r1 * nq], d1[r0 * nd:r1 * nd]     # slices: their loops vectorize
            acc = np.uint32(0)
            for k in range(qt.shape[0]):
                acc += np.uint32(qt[k])
            for k in range(dt.shape[0]):
                acc += np.uint32(dt[k])
            sums[t] = acc


class ReadFloor:
    """The READ row: a Q4_0 weight's arrays, read by _read_rows instead of multiplied."""

    def __init__(self, qs, d, m):
        self.qs, self.d, self.m = qs, d, m
        self.sums = np.zeros(config.NUMBA_NUM_THREADS, dtype=np.uint32)   # (threads,) uint32, one sum per thread

    @property
    def nbytes(self):
        return self.qs.nbytes + self.d.nbytes

    def _arrays(self):
        return (self.qs, self.d, self.m)

    def _matvec(self, x, out):
        _read_rows(self.qs, self.d, self.sums)
        return out


def gguf_bytes(fmt: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A (rows, cols) tensor of valid random `fmt` blocks, as the file would hold it (flat uint8)."""
    tid = TYPE_IDS[fmt]
    n = rows * cols
    if fmt == "F32":
        return rng.standard_normal(n, dtype=np.float32).view(np.uint8)
    if fmt == "F16":
        return rng.uniform(-2, 2, n).astype(np.float16).view(np.uint8)
    if fmt == "BF16":
        return (rng.standard_normal(n, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, size = gq.block_size(tid)
    nblk = n // block
    raw = rng.integers(0, 256, (nblk, size), dtype=np.uint8)
    for off in SCALE_FIELDS[fmt]:
        h = (rng.choice([-1.0, 1.0], nblk) * 10.0 ** rng.uniform(-3, -1, nblk)).astype(np.float16)
        raw[:, off : off + 2] = h.view(np.uint8).reshape(nblk, 2)
    return raw.reshape(-1)


def gguf_format(fmt: str) -> str:
    """The GGUF type whose blocks make fmt's weight: READ reads Q4_0's."""
    return "Q4_0" if fmt == "READ" else fmt


def supported(fmt: str, cols: int) -> bool:
    return cols % gq.block_size(TYPE_IDS[gguf_format(fmt)])[0] == 0


def copies_for(nbytes: int, cold_mb: float) -> int:
    return 1 if cold_mb <= 0 else max(1, -(-int(cold_mb * 2**20) // nbytes))


def copies_of(w, n: int, arena: bool) -> list:
    """w and n - 1 copies of it: each its own allocation, or (arena) all n side by side in one, every array
    starting on a 64-byte line."""
    if not arena:
        return [w] + [type(w)(*[a.copy() for a in w._arrays()]) for _ in range(n - 1)]
    arrays = w._arrays()
    sizes = [-(-a.nbytes // 64) * 64 for a in arrays]
    block = np.empty(n * sum(sizes), dtype=np.uint8)     # (n * bytes per copy,) uint8
    copies, off = [], 0
    for _ in range(n):
        views = []
        for a, size in zip(arrays, sizes):
            v = block[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
            v[...] = a
            views.append(v)
            off += size
        copies.append(type(w)(*views))
    return copies


def bench_shape(rows, cols, formats, threads, reps, cold_mb, rng, blas_limit, settle=0.25, arena=False):
    """{(fmt, threads): stats} for one shape."""
    weights, file_bytes = {}, {}
    for fmt in formats:
        if not supported(fmt, cols):
            continue
        raw = gguf_bytes(gguf_format(fmt), rows, cols, rng)
        w = gq.weight_from_gguf(TYPE_IDS[gguf_format(fmt)], raw, (rows, cols), fmt, "bench")
        if fmt == "READ":
            w = ReadFloor(*w._arrays())
        file_bytes[fmt] = raw.nbytes
        del raw
        n = copies_for(w.nbytes, cold_mb)
        weights[fmt] = copies_of(w, n, arena)
    x = rng.standard_normal(cols, dtype=np.float32)
    out = np.empty(rows, dtype=np.float32)
    times = {(f, t): [] for f in weights for t in threads}
    turn = {f: 0 for f in weights}
    for t in threads:                                  # warm-up: compile / load cache, fault pages in
        backend.set_threads(t)
        with blas_limit(t):
            for ws in weights.values():
                for w in ws:
                    w._matvec(x, out)
    # Two thread pools share the cores: numba's (OpenMP) and OpenBLAS's. Each spins for a while after
    # a call, and a 2-thread call of the other pool then waits for a core for milliseconds. So with
    # more than one thread the F32 (BLAS) reference and the numba formats run as separate groups, each
    # followed by a pause for the pool to go idle; within a group, formats are interleaved. With one
    # thread there is no pool to wake and everything is interleaved.
    numba_fmts = [f for f in weights if f != "F32"]
    split = [g for g in (numba_fmts, [f for f in weights if f == "F32"]) if g]
    block = 5
    done = 0
    while done < reps:
        n = min(block, reps - done)
        done += n
        for t in rng.permutation(threads):
            t = int(t)
            backend.set_threads(t)
            groups = split if t > 1 else [list(weights)]
            for gi in rng.permutation(len(groups)):
                group = groups[gi]
                with blas_limit(t):
                    if len(groups) > 1:
                        for i in range(WARM_CALLS):
                            fmt = group[i % len(group)]       # the copy timed last: the next reuse is the furthest
                            weights[fmt][(turn[fmt] - 1) % len(weights[fmt])]._matvec(x, out)
                    for _ in range(n):
                        for i in rng.permutation(len(group)):
                            fmt = group[i]
                            ws = weights[fmt]
                            w = ws[turn[fmt] % len(ws)]
                            turn[fmt] += 1
                            t0 = time.perf_counter_ns()
                            w._matvec(x, out)
                            times[(fmt, t)].append(time.perf_counter_ns() - t0)
                if len(groups) > 1:
                    time.sleep(settle)
    res = {}
    for (fmt, t), ts in times.items():
        us = float(np.median(ts)) / 1e3
        nbytes = weights[fmt][0].nbytes
        res[(fmt, t)] = dict(format=fmt, rows=rows, cols=cols, threads=t, us=us,
                             us_min=min(ts) / 1e3, reps=len(ts), copies=len(weights[fmt]),
                             nbytes=nbytes, file_bytes=file_bytes[fmt],
                             gbps=nbytes / us / 1e3, gguf_gbps=file_bytes[fmt] / us / 1e3)
    for (fmt, t), r in res.items():
        f32 = res.get(("F32", t))
        r["f32_gbps"] = f32["gbps"] if f32 else None
        r["vs_f32"] = r["gbps"] / f32["gbps"] if f32 else None
    return [res[(f, t)] for t in threads for f in formats if (f, t) in res]


def markdown(results) -> str:
    lines = ["| format | shape | threads | µs | GB/s | GGUF GB/s | f32 GEMV GB/s | vs f32 |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        vs = "" if r["vs_f32"] is None else f"{r['vs_f32']:.2f}"
        if r["vs_f32"] is not None and r["format"] in TARGETED and r["vs_f32"] < TARGET:
            vs += " (<0.6)"
        f32 = "" if r["f32_gbps"] is None else f"{r['f32_gbps']:.1f}"
        lines.append(f"| {r['format']} | {r['rows']}×{r['cols']} | {r['threads']} | {r['us']:.1f} | "
                     f"{r['gbps']:.1f} | {r['gguf_gbps']:.1f} | {f32} | {vs} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="ROWSxCOLS,...")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per (format, shape, threads)")
    ap.add_argument("--cold-mb", type=float, default=96.0,
                    help="cycle weight copies so each format's working set is at least this (MiB)")
    ap.add_argument("--hot", action="store_true", help="one copy per format (cache-resident when small)")
    ap.add_argument("--arena", action="store_true",
                    help="each format's copies in one allocation (huge pages where available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON ('-' for stdout)")
    args = ap.parse_args(argv)

    formats = [f.strip().upper() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in TYPE_IDS and f != "READ"]
    if bad:
        ap.error(f"unknown formats {bad}; known: {FORMATS} and READ")
    if "READ" in formats and not backend.NUMBA:
        ap.error("READ times a numba kernel: install numba, or leave READ out of --formats")
    if "F32" not in formats:
        formats.insert(0, "F32")                       # the reference every ratio needs
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",") if s]
    threads = [int(t) for t in args.threads.split(",")]
    cold_mb = 0.0 if args.hot else args.cold_mb

    from threadpoolctl import threadpool_limits

    def blas_limit(t):
        return threadpool_limits(limits=t, user_api="blas")

    rng = np.random.default_rng(args.seed)
    load_before = os.getloadavg()[0]
    results = []
    for rows, cols in shapes:
        results += bench_shape(rows, cols, formats, threads, args.reps, cold_mb, rng, blas_limit, arena=args.arena)
        print(f"# {rows}x{cols} done", file=sys.stderr, flush=True)

    load_after = os.getloadavg()[0]
    print(f"numba: {backend.NUMBA}; median of {args.reps} calls; "
          f"{'hot (one copy)' if args.hot else f'cold (copies cycled, >= {cold_mb:g} MiB per format)'}"
          f"{'; copies in one arena' if args.arena else ''}; load average {load_before:.2f} before, {load_after:.2f} after")
    print(markdown(results))
    if args.json:
        meta = dict(numba=backend.NUMBA, reps=args.reps, cold_mb=cold_mb, arena=args.arena, load_before=load_before,
                    load_after=load_after, cpus=os.cpu_count())
        text = json.dumps(dict(meta, results=results), indent=1)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
