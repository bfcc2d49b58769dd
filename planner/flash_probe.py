"""Read throughput of the filesystem that holds the models, by request size and reader threads.

What the runtime's flash reader will do (DESIGN.md, flash layout): os.preadv into page-aligned buffers,
4096-aligned offsets, O_DIRECT where the filesystem allows it. The page cache must never make flash look
faster than it is, so:
- with O_DIRECT the figures are the device's;
- where O_DIRECT is refused (tmpfs, some overlay and network filesystems) the file is evicted with
  posix_fadvise(POSIX_FADV_DONTNEED) before every measurement and read buffered, each measurement
  touching at most a quarter of the file so that re-reads stay rare. That is recorded as the method;
  on tmpfs nothing can be evicted and the figures are memory speed, which the method also says.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np

from planner.device import ReadPoint

ALIGN = 4096
FILE_BYTES = 128 << 20          # large enough that random 4 KiB reads rarely hit the drive's own cache
RANDOM_SIZES = (4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20)
SEQUENTIAL_SIZE = 512 << 10     # PowerInfer-2 quotes UFS 4.0 at this size
SECONDS_PER_POINT = 0.25


def fs_type(path: Path) -> str:
    """The filesystem type of the mount holding path, from /proc/mounts ("unknown" elsewhere)."""
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) > len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def measure(directory: Path, max_threads: int, budget_s: float = 12.0) -> tuple[bool, str, tuple[ReadPoint, ...]]:
    """(direct_io, method, points). Writes a scratch file into directory and always removes it."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f".pocketinfer-readprobe-{os.getpid()}"
    threads = sorted({1, 2, max_threads} & set(range(1, max_threads + 1)))
    per_point = min(SECONDS_PER_POINT, budget_s / (len(RANDOM_SIZES) * len(threads) + 1))
    try:
        _write_scratch(path)
        direct = _try_direct(path)
        points = []
        for size in RANDOM_SIZES:
            for t in threads:
                points.append(ReadPoint("random", size, t, _throughput(path, direct, size, t, per_point, True)))
        points.append(ReadPoint("sequential", SEQUENTIAL_SIZE, 1,
                                _throughput(path, direct, SEQUENTIAL_SIZE, 1, per_point, False)))
    finally:
        path.unlink(missing_ok=True)
    if direct:
        method = "O_DIRECT preadv into aligned buffers"
    else:
        method = ("O_DIRECT refused; buffered preadv after posix_fadvise(DONTNEED) eviction of the file, "
                  "each point reading at most 1/4 of it")
        if fs_type(directory) in ("tmpfs", "ramfs"):
            method += "; this is a RAM filesystem, so the figures are memory speed, not flash"
    return direct, method, tuple(points)


def _write_scratch(path: Path) -> None:
    # Random bytes so that compressing or deduplicating filesystems store (and read) every block.
    block = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8).tobytes()   # 4 MiB
    with open(path, "wb") as f:
        for i in range(FILE_BYTES // len(block)):
            f.write(i.to_bytes(8, "little") + block[8:])
        f.flush()
        os.fsync(f.fileno())   # dirty pages cannot be evicted; they must reach the disk first


def _try_direct(path: Path) -> bool:
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | flag)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, ALIGN)
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _throughput(path: Path, direct: bool, size: int, n_threads: int, seconds: float, random: bool) -> float:
    """MB/s (1e6 bytes/s) of n_threads readers issuing `size`-byte reads for about `seconds`."""
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)
    try:
        if not direct and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        slots = FILE_BYTES // size
        cap = None if direct else FILE_BYTES // 4   # buffered: bound re-reads of cached pages
        done = [0] * n_threads
        deadline = time.perf_counter() + seconds

        def reader(k: int) -> None:
            buf = mmap.mmap(-1, size)            # page-aligned, as O_DIRECT needs
            rng = np.random.default_rng(k)
            offs = rng.integers(0, slots, 4096) * size if random else None
            i, pos = 0, (k * slots // n_threads) * size
            while time.perf_counter() < deadline and (cap is None or sum(done) < cap):
                if random:
                    off = int(offs[i % len(offs)])
                else:
                    off, pos = pos, (pos + size) % (slots * size)
                done[k] += os.preadv(fd, [buf], off)
                i += 1

        t0 = time.perf_counter()
        workers = [threading.Thread(target=reader, args=(k,)) for k in range(n_threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        elapsed = time.perf_counter() - t0
    finally:
        os.close(fd)
    return round(sum(done) / max(elapsed, 1e-9) / 1e6, 1)
