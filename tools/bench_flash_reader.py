"""Random-read IOPS of the flash readers against fio on the same file, request sizes and queue depth.

    python tools/bench_flash_reader.py [--file PATH] [--sizes 4,8,12,16,32] [--depth 16] [--seconds 3] [--rounds 2]

Readers: `aio` (engine/flash/aio_reader.py: kernel AIO from one thread), `native`
(engine/flash/native_reader.py: native threads, no Python per request), `python`
(engine/flash/reader.py: Python threads), each keeping --depth requests in flight and consuming them in
submission order, as the flash FFN does; fio with `psync` and --depth jobs (one blocking pread per thread,
the readers' own mechanism) and with `libaio` at iodepth --depth (one thread, asynchronous). All read with
O_DIRECT at random 4096-aligned offsets of a file of --file-mb MiB (created if missing, random bytes).
Rounds alternate the engines (aio, native, python, fio, ...); the table gives the median IOPS of each and the
ratios to fio psync. Needs `fio` on PATH for the reference columns (Debian: apt-get install fio).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.flash import aio_reader, native_reader  # noqa: E402
from engine.flash.reader import FlashReader, aligned_buffer  # noqa: E402


def make_file(path: Path, mib: int) -> None:
    if path.exists() and path.stat().st_size == mib << 20:
        return
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    with open(tmp, "wb") as f:
        for _ in range(mib // 64):
            f.write(rng.integers(0, 256, 64 << 20, dtype=np.uint8).tobytes())
    os.replace(tmp, path)


def run_reader(reader, size: int, bs: int, depth: int, seconds: float, seed: int) -> float:
    """IOPS of `reader` keeping `depth` reads of bs bytes in flight for about `seconds`."""
    rng = np.random.default_rng(seed)
    _, pool = aligned_buffer(depth * bs)                     # (depth * bs,) uint8 landing buffers
    bufs = [pool[i * bs:(i + 1) * bs] for i in range(depth)]
    offsets = rng.integers(0, size // 4096 - bs // 4096, 1 << 20) * 4096
    inflight: deque = deque()
    done = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    k = 0
    for i in range(depth):
        inflight.append((reader.submit(bufs[i], int(offsets[k])), i))
        k += 1
    while True:
        fut, i = inflight.popleft()
        fut.result()
        done += 1
        if time.perf_counter() >= end:
            break
        inflight.append((reader.submit(bufs[i], int(offsets[k % len(offsets)])), i))
        k += 1
    dt = time.perf_counter() - t0
    for fut, _ in inflight:
        fut.result()
    return done / dt


def run_fio(path: Path, bs: int, depth: int, seconds: float, engine: str) -> float:
    jobs = ["--numjobs", str(depth)] if engine == "psync" else ["--iodepth", str(depth)]
    out = subprocess.run(["fio", "--name=rr", f"--filename={path}", "--rw=randread", f"--bs={bs}", "--direct=1",
                          f"--ioengine={engine}", *jobs, "--group_reporting", "--time_based",
                          f"--runtime={seconds}", "--output-format=json"], capture_output=True, text=True,
                         check=True).stdout
    return float(json.loads(out)["jobs"][0]["read"]["iops"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", default="/work/scratch/flash_reader_bench.bin")
    ap.add_argument("--file-mb", type=int, default=1024)
    ap.add_argument("--sizes", default="4,8,12,16,32", help="request sizes in KiB")
    ap.add_argument("--depth", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    path = Path(args.file)
    make_file(path, args.file_mb)
    size = path.stat().st_size
    engines = (["aio"] if aio_reader.available() else []) + (["native"] if native_reader.available() else [])
    engines += ["python"]
    fio = shutil.which("fio") is not None
    if fio:
        engines += ["fio psync", "fio libaio"]
    readers = {}
    if "aio" in engines:
        readers["aio"] = aio_reader.AioReader(path, direct=True, threads=args.depth)
    if "native" in engines:
        readers["native"] = native_reader.NativeReader(path, direct=True, threads=args.depth)
    readers["python"] = FlashReader(path, direct=True, threads=args.depth)
    for r in readers.values():                     # warm up: compile, start the threads
        run_reader(r, size, 4096, args.depth, 0.3, 99)
    table = {}
    for kib in (int(s) for s in args.sizes.split(",")):
        bs = kib << 10
        got = {e: [] for e in engines}
        for rnd in range(args.rounds):
            for e in engines:
                if e in readers:
                    got[e].append(run_reader(readers[e], size, bs, args.depth, args.seconds, rnd))
                else:
                    got[e].append(run_fio(path, bs, args.depth, args.seconds, e.split()[1]))
        table[kib] = {e: statistics.median(v) for e, v in got.items()}
        print(f"{kib} KiB: " + ", ".join(f"{e} {v:,.0f}" for e, v in table[kib].items()), flush=True)
    for r in readers.values():
        r.close()
    ref = "fio psync" if fio else None
    print(f"\nqueue depth {args.depth}, O_DIRECT random reads, {args.rounds} rounds of {args.seconds} s each, median IOPS\n")
    print("| request | " + " | ".join(engines) + ("".join(f" | {e} / fio psync" for e in readers) + " |" if ref else " |"))
    print("|---" * (len(engines) + 1 + (len(readers) if ref else 0)) + "|")
    for kib, row in table.items():
        cells = [f"{row[e]:,.0f}" for e in engines]
        if ref:
            cells += [f"{row[e] / row[ref]:.2f}" for e in readers]
        print(f"| {kib} KiB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
