"""Reading byte ranges of the bundle file from flash: O_DIRECT preadv into aligned, preallocated
buffers, adjacent misses merged into one request, a small pool of reader threads.

Why these choices (DESIGN.md, "Flash layout" and the measured O_DIRECT numbers):
- os.preadv releases the GIL for the whole read, so reader threads wait on the device while the main
  thread computes the neurons already in memory (PowerInfer-2 section 4.4's I/O-compute pipeline);
- O_DIRECT bypasses the page cache, so flash never looks faster than it is, and the cache budget is
  not silently doubled by the kernel's copy. It needs the offset, length and buffer address aligned:
  buffers come from anonymous mmaps (page-aligned) and every request is widened to 4096-byte bounds;
- where a filesystem refuses O_DIRECT (tmpfs, some FUSE and network filesystems: EINVAL at open or at
  the first read) the reader falls back to buffered reads followed by posix_fadvise(DONTNEED) on the
  range read, so the next read of it goes to the device again; `mode_note` says which one runs;
- on this disk one 4 KiB request costs ~220 us and a 256 KiB one ~320 us: merging runs of misses whose
  gaps are small (reading a few unneeded bundles) is much cheaper than a request each.
"""

from __future__ import annotations

import errno
import mmap
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from engine.errors import FlashReadError
from engine.flash.bundles import ALIGN


def aligned_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """A page-aligned anonymous mapping of at least nbytes (rounded up to 4096) and a (n,) uint8 view.
    Keep the mmap object alive as long as the view is used."""
    n = max(ALIGN, (nbytes + ALIGN - 1) // ALIGN * ALIGN)
    m = mmap.mmap(-1, n)
    return m, np.frombuffer(m, dtype=np.uint8)


def merge_runs(pos: np.ndarray, max_gap: int, max_len: int) -> list[tuple[int, int]]:
    """pos (n,) ascending record positions -> [(p0, p1), ...] half-open runs covering them, where
    positions at most max_gap apart share a run and no run is longer than max_len positions."""
    runs: list[tuple[int, int]] = []
    if len(pos) == 0:
        return runs
    # Break where the gap is too large; then split long runs into max_len pieces.
    breaks = np.flatnonzero(np.diff(pos) > max_gap + 1) + 1
    for seg in np.split(pos, breaks):
        p0, last = int(seg[0]), int(seg[-1])
        while p0 <= last:
            p1 = min(last + 1, p0 + max_len)
            runs.append((p0, p1))
            nxt = seg[seg >= p1]
            if len(nxt) == 0:
                break
            p0 = int(nxt[0])
    return runs


class Ticket:
    """One read handed to a native reader, with the part of concurrent.futures.Future that the flash FFN
    uses: result() is the read's time in seconds or raises FlashReadError; exception() waits and returns
    the error or None. Subclasses say how to cancel, whether it has landed, and finish it (reader._finish
    sets _state to done, failed or cancelled, and _value to the seconds or the error)."""

    __slots__ = ("reader", "buf", "offset", "_state", "_value")

    def __init__(self, reader, buf: np.ndarray, offset: int):
        self.reader, self.buf, self.offset = reader, buf, offset
        self._state = "pending"        # pending | done | failed | cancelled
        self._value = None

    def cancel(self) -> bool:
        return False

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def result(self) -> float:
        if self._state == "pending":
            self.reader._finish(self)
        if self._state == "failed":
            raise self._value
        if self._state == "cancelled":
            raise FlashReadError(f"{self.reader.path}: read at offset {self.offset} was cancelled")
        return self._value

    def exception(self):
        try:
            self.result()
        except FlashReadError as e:
            return e
        return None

    def settle(self, n: int, seconds: float) -> None:
        """Record how the native read went: n bytes read in `seconds`, or n < 0 when it failed. A failed
        read is repeated by FlashReader.read, which names the error (or succeeds, or falls back from
        O_DIRECT); a short one fails."""
        if n == len(self.buf):
            self._state, self._value = "done", seconds
            return
        try:
            if n < 0:
                self._state, self._value = "done", self.reader.read(self.buf, self.offset)
                return
            raise FlashReadError(f"{self.reader.path}: short read at offset {self.offset}: {n} of {len(self.buf)} "
                                 "bytes (the file changed or was truncated while running); the request was aborted")
        except FlashReadError as e:
            self._state, self._value = "failed", e


class FlashReader:
    """One open bundle file; read(buf, offset) fills a buffer from an aligned offset, or raises
    FlashReadError. submit() runs the same read on the reader pool and returns a Future whose result is
    the read's duration in seconds."""

    def __init__(self, path, *, direct: bool = True, threads: int = 2):
        self.path = str(path)
        self.direct = False
        self.mode_note = "buffered reads (O_DIRECT not requested) + posix_fadvise(DONTNEED) after each read"
        self.fd = -1
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                self.direct = True
                self.mode_note = "O_DIRECT"
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise FlashReadError(f"{self.path}: cannot open the bundle file ({e.strerror})") from None
                self.mode_note = ("buffered reads + posix_fadvise(DONTNEED): the filesystem refused O_DIRECT "
                                  "at open (EINVAL)")
        if self.fd < 0:
            try:
                self.fd = os.open(self.path, os.O_RDONLY)
            except OSError as e:
                raise FlashReadError(f"{self.path}: cannot open the bundle file ({e.strerror})") from None
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None        # started by the first submit

    # ------------------------------------------------------------------ reads

    def read(self, buf: np.ndarray, offset: int) -> float:
        """Fill buf (n,) uint8, n and offset multiples of 4096 and buf page-aligned, from the file at
        offset; returns seconds taken. FlashReadError on an I/O error or a short read."""
        assert offset % ALIGN == 0 and len(buf) % ALIGN == 0, "callers align requests"
        t0 = time.perf_counter()
        try:
            n = os.preadv(self.fd, [buf], offset)
        except OSError as e:
            if e.errno == errno.EINVAL and self.direct:
                # Some filesystems accept O_DIRECT at open and refuse it at the first read.
                self._fall_back()
                return self.read(buf, offset)
            raise FlashReadError(f"{self.path}: read of {len(buf)} bytes at offset {offset} failed "
                                 f"({e.strerror or e}); the request was aborted, retry it") from None
        if n != len(buf):
            raise FlashReadError(f"{self.path}: short read at offset {offset}: {n} of {len(buf)} bytes (the file "
                                 "changed or was truncated while running); the request was aborted")
        if not self.direct:
            self._drop(offset, n)
        return time.perf_counter() - t0

    def submit(self, buf: np.ndarray, offset: int) -> Future:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="flash-read")
        return self._pool.submit(self.read, buf, offset)

    def submit_many(self, bufs: list, offsets: list) -> list:
        """submit() for each (buf, offset) in order; readers that can queue them in one call override it."""
        return [self.submit(b, o) for b, o in zip(bufs, offsets)]

    def drop_cache(self) -> None:
        """Evict the whole file from the page cache (benchmarks call it before each run)."""
        self._drop(0, 0)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # ------------------------------------------------------------------ helpers

    def _drop(self, offset: int, length: int) -> None:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_DONTNEED)

    def _use_fd(self, fd: int, direct: bool | None = None) -> None:
        """Read from fd from now on (subclasses whose readers keep their own copy update it)."""
        self.fd = fd
        if direct is not None:
            self.direct = direct

    def _fall_back(self) -> None:
        old = self.fd
        self._use_fd(os.open(self.path, os.O_RDONLY), direct=False)
        os.close(old)
        self.mode_note = "buffered reads + posix_fadvise(DONTNEED): the filesystem refused O_DIRECT reads (EINVAL)"
