"""Reading the bundle file with Linux kernel AIO: the submitting thread hands each O_DIRECT read to the
kernel (io_submit) and reaps completions (io_getevents); no reader threads, no Python while a read is
in flight.

Why: with O_DIRECT the kernel queues the read on the device and returns at once, so one thread keeps a
whole queue of requests in flight, as fio's libaio engine does; thread readers (engine/flash/reader.py,
native_reader.py) pay a wake-up and a context switch per request, which on 2 cores is most of a 12 KiB
read's cost. The system calls go through libc's syscall() by number (no libaio needed): only
io_setup, io_submit, io_getevents and io_destroy.

Where it does not run, engine/flash/open_reader.py picks a thread reader:
- without O_DIRECT: buffered AIO reads run synchronously inside io_submit;
- on Android: its app seccomp policy does not list the AIO calls, and a filtered call kills the process
  with SIGSYS instead of failing, so the calls are never probed there;
- on other architectures than x86-64 and AArch64 (their syscall numbers are the two tables below).
A failed read (res < 0) is repeated by FlashReader.read in Python, which names the errno and falls back
from O_DIRECT where a filesystem refuses it at the first read; a short read raises FlashReadError.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time

import numpy as np

from engine.errors import FlashReadError
from engine.flash import reader
from engine.flash.reader import FlashReader

_NR = {"x86_64": {"setup": 206, "destroy": 207, "getevents": 208, "submit": 209},
       "aarch64": {"setup": 0, "destroy": 1, "submit": 2, "getevents": 4}}
# struct iocb and struct io_event of <linux/aio_abi.h>, little-endian.
IOCB = np.dtype([("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
                 ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
                 ("flags", "<u4"), ("resfd", "<u4")])
EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
IOCB_CMD_PREAD = 0
DEPTH = 1024                   # requests in flight at most: a flash FFN keeps at most twice its queue depth
_WAIT_NS = 200_000_000         # io_getevents timeout; waits loop, so it only bounds one sleep


def on_android() -> bool:
    return hasattr(sys, "getandroidapilevel") or "ANDROID_ROOT" in os.environ


def available() -> bool:
    """Whether kernel AIO may be tried here (open_reader still falls back if io_setup fails)."""
    return (sys.platform.startswith("linux") and not on_android() and platform.machine() in _NR
            and hasattr(os, "O_DIRECT"))


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class Ticket(reader.Ticket):
    """A queued read; its result() is the time it was in flight. O_DIRECT reads cannot be cancelled once
    queued (cancel() is False: callers wait)."""

    __slots__ = ("slot", "t0")

    def __init__(self, owner: "AioReader", slot: int, buf: np.ndarray, offset: int):
        super().__init__(owner, buf, offset)
        self.slot = slot
        self.t0 = time.perf_counter()

    def done(self) -> bool:
        """Whether it has landed (collects any completions without waiting)."""
        if self._state == "pending" and self.reader._landed[self.slot] == 0.0:
            self.reader._reap(wait=False)
        return self._state != "pending" or self.reader._landed[self.slot] != 0.0


class AioReader(FlashReader):
    """FlashReader whose submit() queues the read with the kernel (module docstring). Use from one thread."""

    def __init__(self, path, *, direct: bool = True, threads: int = 2):
        super().__init__(path, direct=direct, threads=threads)
        if not self.direct:
            super().close()
            raise OSError("kernel AIO reads are asynchronous only with O_DIRECT")
        nr = _NR[platform.machine()]
        libc = ctypes.CDLL(None, use_errno=True)
        self._sys = libc.syscall
        self._sys.restype = ctypes.c_long
        self._nr = nr
        self._ctx = ctypes.c_ulong(0)
        if self._sys(nr["setup"], DEPTH, ctypes.byref(self._ctx)) != 0:
            err = ctypes.get_errno()
            super().close()
            raise OSError(err, f"io_setup: {os.strerror(err)}")
        self._iocbs = np.zeros(DEPTH, IOCB)              # (DEPTH,) one control block per slot
        self._iocbs["data"] = np.arange(DEPTH)          # the slot, returned in its completion event
        self._iocbs["opcode"] = IOCB_CMD_PREAD
        self._words = self._iocbs.view(np.uint64).reshape(DEPTH, 8)   # (DEPTH, 8) the same bytes as words
        self._ptrs = np.zeros(DEPTH, np.uint64)          # (DEPTH,) the iocb* array io_submit reads
        self._addr0 = np.uint64(self._iocbs.ctypes.data)
        self._fildes = self._iocbs["fildes"]             # (DEPTH,) a view of each block's descriptor
        self._events = np.zeros(DEPTH, EVENT)            # (DEPTH,) completions of one io_getevents
        self._res = np.zeros(DEPTH, np.int64)            # (DEPTH,) result of each slot's last read
        self._landed = np.zeros(DEPTH, np.float64)       # (DEPTH,) perf_counter when it was reaped, 0 pending
        self._free = list(range(DEPTH - 1, -1, -1))
        self._inflight = 0
        self._timeout = _Timespec(0, _WAIT_NS)
        self._now = _Timespec(0, 0)
        self.mode_note += ", kernel AIO"

    def submit(self, buf: np.ndarray, offset: int) -> Ticket:
        """Queue a read of len(buf) bytes at offset into buf (aligned as for read); returns its Ticket."""
        return self._queue([buf], [offset])[0]

    def submit_many(self, bufs: list, offsets: list) -> list:
        """Queue the reads in one io_submit; returns their Tickets in order."""
        return self._queue(bufs, offsets)

    def _queue(self, bufs: list, offsets: list) -> list:
        n = len(bufs)
        if n > len(self._free):
            raise RuntimeError(f"more than {DEPTH} reads in flight")
        slots = [self._free.pop() for _ in range(n)]
        tickets = []
        fd, words = self.fd, self._words
        for slot, buf, offset in zip(slots, bufs, offsets):
            self._fildes[slot] = fd
            w = words[slot]                              # words 3, 4, 5: buf, nbytes, offset
            w[3], w[4], w[5] = buf.ctypes.data, len(buf), offset
            self._landed[slot] = 0.0
            tickets.append(Ticket(self, slot, buf, offset))
        self._ptrs[:n] = self._addr0 + IOCB.itemsize * np.asarray(slots, np.uint64)
        done = 0
        while done < n:
            got = self._sys(self._nr["submit"], self._ctx, n - done,
                            ctypes.c_void_p(self._ptrs.ctypes.data + 8 * done))
            if got <= 0:
                err = ctypes.get_errno() if got < 0 else 11
                for t in tickets[done:]:
                    self._free.append(t.slot)
                    t._state = "failed"
                    t._value = FlashReadError(f"{self.path}: could not queue a read of {len(t.buf)} bytes at offset "
                                              f"{t.offset} ({os.strerror(err)}); the request was aborted, retry it")
                break
            done += got
            self._inflight += got
        return tickets

    def _reap(self, wait: bool = True) -> None:
        """Record every completion that has landed; with wait, first sleep until one lands (or the timeout)."""
        n = self._sys(self._nr["getevents"], self._ctx, int(wait), DEPTH, ctypes.c_void_p(self._events.ctypes.data),
                      ctypes.byref(self._timeout if wait else self._now))
        if n < 0:
            err = ctypes.get_errno()
            if err == 4:                                  # EINTR: a signal; the caller waits again
                return
            raise FlashReadError(f"{self.path}: io_getevents failed ({os.strerror(err)})")
        now = time.perf_counter()
        ev = self._events[:n]
        slots = ev["data"].astype(np.int64)
        self._res[slots] = ev["res"]
        self._landed[slots] = now
        self._inflight -= n

    def _finish(self, t: Ticket) -> None:
        while self._landed[t.slot] == 0.0:
            self._reap()
        self._free.append(t.slot)
        t.settle(int(self._res[t.slot]), float(self._landed[t.slot] - t.t0))

    def close(self) -> None:
        if self._ctx.value:
            while self._inflight > 0:                    # buffers stay valid until the kernel is done
                self._reap()
            self._sys(self._nr["destroy"], self._ctx)
            self._ctx.value = 0
        super().close()
