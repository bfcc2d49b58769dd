"""Reading the bundle file without Python per request: native reader threads that take requests from a
shared ring and call pread themselves.

Why: Python reader threads (engine/flash/reader.py) take the GIL twice per request. Here the readers
are POSIX threads started through ctypes whose body is a numba cfunc: they never touch the
interpreter, so a request costs three system calls and no Python, and many of them can wait on the
device at once. It is the thread reader for systems without kernel AIO (engine/flash/aio_reader.py),
chosen only on request (engine/flash/open_reader.py): alone it reaches more IOPS than Python threads,
but on 2 cores its threads took the CPU from the flash FFN's compute.

How a request flows (one submitting thread, any number of readers):
  submit  the caller writes (buffer address, file offset, length) into ring slot k % RING, then adds 1
          to the `posted` eventfd, which is a semaphore (EFD_SEMAPHORE): one sleeping reader wakes;
  read    the reader takes the next sequence number with an atomic add, claims the slot (an atomic add
          on its state word: a slot already claimed by `cancel` is skipped), preads, stores its result,
          then adds 1 to the `landed` eventfd;
  wait    the caller polls `landed` until the slot's result is set; a poll that times out while a
          reader has exited (the `alive` count fell) fails the request instead of hanging.
Results are stored as (bytes read + 2), so 0 means "not done", 1 a failed pread and 2 + n a read of n
bytes; a failed pread is repeated by the caller in Python (FlashReader.read), which names the errno,
falls back from O_DIRECT where the filesystem refuses it, and raises FlashReadError.

Everything the threads share is one int64 control array (_ctl, its words named below), so the cfunc
needs nothing but its address. Needs numba, a POSIX libc with pthreads and Linux's eventfd (Linux,
Android); `open_reader` starts it only when asked to.
"""

from __future__ import annotations

import ctypes
import os
import select
import time

import numpy as np

from engine.errors import FlashReadError
from engine.flash import reader
from engine.flash.reader import FlashReader
from kernels.backend import NUMBA

RING = 1024                    # request slots; a submitter keeps fewer than this many in flight
SLOT = 8                       # int64 words per slot: addr, offset, length, result, state, t0 ns, t1 ns, spare
# Control array words (int64): the file's descriptor; the posted and landed eventfds; the next sequence
# number a reader takes; readers alive; whether reads are O_DIRECT; the request whose reader exits (fault
# injection, -1 none); readers started (each takes its scratch index from it); the constant 1 that
# eventfd writes send; the request the submitter sleeps on; the request a reader exited holding; the
# array's own address.
FD, POSTED, LANDED, NEXT, ALIVE, DIRECT, EXIT_AT, STARTED, ONE, AWAITED, LOST, BASE = range(12)
SCRATCH = 16                   # per-thread scratch: 4 words each (an eventfd read, a timespec); a reader
                               # started after MAX_THREADS others (replacing ones that exited) reuses the
                               # words of an earlier one: at worst both write the same timespec
MAX_THREADS = 64
HEAD = SCRATCH + 4 * MAX_THREADS
_A, _OFF, _LEN, _RES, _STATE, _T0, _T1 = range(7)
_STRANDED: list = []           # control arrays of readers that did not exit at close (kept alive)
_POLL_MS = 200                 # how long a wait sleeps before it checks the readers are still alive


def _libc():
    return ctypes.CDLL(None) if os.name == "posix" else None


def available() -> bool:
    """Whether native readers can run here: numba, pthreads, eventfd."""
    if not (NUMBA and hasattr(os, "eventfd") and hasattr(os, "EFD_SEMAPHORE")):
        return False
    libc = _libc()
    return all(hasattr(libc, f) for f in ("pread", "read", "write", "pthread_create", "pthread_detach",
                                           "clock_gettime", "posix_fadvise"))


_worker = None
_add = None


def _compile():
    """The reader thread body as a C function pointer (void *(*)(void *)), compiled once per process."""
    global _worker, _add
    if _worker is not None:
        return _worker
    import numba
    from numba import types

    from kernels.sync import fetch_add

    libc = _libc()
    u64, i64 = ctypes.c_uint64, ctypes.c_int64

    def proto(name, res, *args):
        f = getattr(libc, name)
        f.restype, f.argtypes = res, list(args)
        return f

    # Pointers travel as 64-bit integers: the calling conventions of x86-64 and AArch64 pass both alike.
    c_pread = proto("pread", i64, ctypes.c_int, u64, u64, i64)
    c_read = proto("read", i64, ctypes.c_int, u64, u64)
    c_write = proto("write", i64, ctypes.c_int, u64, u64)
    c_clock = proto("clock_gettime", ctypes.c_int, ctypes.c_int, u64)
    c_fadvise = proto("posix_fadvise", ctypes.c_int, ctypes.c_int, i64, i64, ctypes.c_int)
    monotonic, dontneed = 1, 4                     # CLOCK_MONOTONIC, POSIX_FADV_DONTNEED on Linux

    @numba.njit(nogil=True)
    def now_ns(ctl, s, base):
        c_clock(monotonic, base + 8 * (s + 1))
        return ctl[s + 1] * 1_000_000_000 + ctl[s + 2]

    @numba.cfunc(types.voidptr(types.voidptr), nopython=True)
    def worker(arg):
        ctl = numba.carray(arg, HEAD + RING * SLOT, np.int64)
        base = ctl[BASE]
        s = SCRATCH + 4 * (fetch_add(ctl, STARTED, 1) % MAX_THREADS)    # this thread's scratch words
        while True:
            if c_read(ctl[POSTED], base + 8 * s, 8) != 8:
                continue                           # EINTR: a signal arrived while it slept
            k = fetch_add(ctl, NEXT, 1)
            q = HEAD + (k % RING) * SLOT
            if ctl[q + _LEN] < 0:                  # a stop request: leave (ALIVE last: then close() may free all)
                fetch_add(ctl, q + _RES, 2)
                c_write(ctl[LANDED], base + 8 * ONE, 8)
                fetch_add(ctl, ALIVE, -1)
                return 0
            if k == ctl[EXIT_AT]:                  # fault injection: die holding a request
                ctl[LOST] = k
                c_write(ctl[LANDED], base + 8 * ONE, 8)
                fetch_add(ctl, ALIVE, -1)
                return 0
            if fetch_add(ctl, q + _STATE, 1) == 0:    # claimed here, not cancelled
                ctl[q + _T0] = now_ns(ctl, s, base)
                fd = ctl[FD]
                n = c_pread(fd, ctl[q + _A], ctl[q + _LEN], ctl[q + _OFF])
                if ctl[DIRECT] == 0 and n > 0:
                    c_fadvise(fd, ctl[q + _OFF], n, dontneed)
                ctl[q + _T1] = now_ns(ctl, s, base)
                fetch_add(ctl, q + _RES, max(n, -1) + 2)
            else:
                fetch_add(ctl, q + _RES, 1)        # cancelled: done, nothing read
            # Wake the submitter only if it sleeps on this request. Both sides store, then load the
            # other's word, sequentially consistent: one of them sees the other's store.
            if fetch_add(ctl, AWAITED, 0) == k:
                c_write(ctl[LANDED], base + 8 * ONE, 8)

    @numba.njit(nogil=True)
    def add(ctl, i, v):
        return fetch_add(ctl, i, v)

    _worker, _add = worker, add
    return worker


class Ticket(reader.Ticket):
    """Request k of the ring; its result() is the pread's own duration."""

    __slots__ = ("k",)

    def __init__(self, owner: "NativeReader", k: int, buf: np.ndarray, offset: int):
        super().__init__(owner, buf, offset)
        self.k = k

    def cancel(self) -> bool:
        if self._state == "pending" and self.reader._cancel(self.k):
            self._state = "cancelled"
        return self._state == "cancelled"

    def done(self) -> bool:
        return self._state != "pending" or self.reader._ctl[HEAD + (self.k % RING) * SLOT + _RES] != 0


class NativeReader(FlashReader):
    """FlashReader whose submit() hands requests to native reader threads (module docstring). read()
    stays the synchronous Python read; result() of a failed native read repeats it there."""

    def __init__(self, path, *, direct: bool = True, threads: int = 2):
        super().__init__(path, direct=direct, threads=0)
        self.threads = max(1, min(int(threads), MAX_THREADS))
        worker = _compile()
        self._ctl = np.zeros(HEAD + RING * SLOT, dtype=np.int64)   # (words,) int64 shared with the threads
        ctl = self._ctl
        ctl[FD], ctl[DIRECT], ctl[ONE] = self.fd, int(self.direct), 1
        ctl[EXIT_AT] = ctl[AWAITED] = ctl[LOST] = -1
        ctl[BASE] = ctl.ctypes.data
        for q in range(HEAD, len(ctl), SLOT):
            ctl[q + _RES] = 1                                       # every slot starts free (done)
        self._posted = os.eventfd(0, os.EFD_SEMAPHORE | os.EFD_CLOEXEC)
        self._landed = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        ctl[POSTED], ctl[LANDED] = self._posted, self._landed
        self._poll = select.poll()
        self._poll.register(self._landed, select.POLLIN)
        self._next = 0                                              # sequence number of the next submit
        self._libc = _libc()
        self._start = ctypes.cast(worker.address, ctypes.c_void_p)
        self._spawn(self.threads)
        self.mode_note += f", {self.threads} native reader threads"

    def _spawn(self, n: int) -> None:
        for _ in range(n):
            tid = ctypes.c_ulong()
            _add(self._ctl, ALIVE, 1)                  # counted before it starts, so waits see it at once
            rc = self._libc.pthread_create(ctypes.byref(tid), None, self._start,
                                           ctypes.c_void_p(self._ctl.ctypes.data))
            if rc != 0:
                _add(self._ctl, ALIVE, -1)
                raise FlashReadError(f"{self.path}: cannot start a reader thread (error {rc})")
            self._libc.pthread_detach(tid)

    # ------------------------------------------------------------------ requests

    def submit(self, buf: np.ndarray, offset: int) -> Ticket:
        """Post a read of len(buf) bytes at offset into buf (aligned as for read); returns its Ticket."""
        k = self._next
        q = HEAD + (k % RING) * SLOT
        ctl = self._ctl
        while ctl[q + _RES] == 0:                 # the slot's previous request is still in flight
            self._wait_landed(k - RING)
        ctl[q + _A], ctl[q + _OFF], ctl[q + _LEN] = buf.ctypes.data, offset, len(buf)
        ctl[q + _STATE], ctl[q + _RES] = 0, 0
        self._next = k + 1
        os.eventfd_write(self._posted, 1)
        return Ticket(self, k, buf, offset)

    def _use_fd(self, fd: int, direct: bool | None = None) -> None:
        super()._use_fd(fd, direct)
        self._ctl[FD], self._ctl[DIRECT] = self.fd, int(self.direct)

    def _cancel(self, k: int) -> bool:
        """Claim request k before a reader does (it then skips it); False if a reader has it."""
        return _add(self._ctl, HEAD + (k % RING) * SLOT + _STATE, 1) == 0

    def _finish(self, t: Ticket) -> None:
        q = HEAD + (t.k % RING) * SLOT
        ctl = self._ctl
        while ctl[q + _RES] == 0:
            self._wait_landed(t.k, t)
        t.settle(int(ctl[q + _RES]) - 2, (int(ctl[q + _T1]) - int(ctl[q + _T0])) * 1e-9)

    def _wait_landed(self, k: int, t: Ticket | None = None) -> None:
        """Sleep until request k lands (or a while: callers loop); fail it if a reader died holding it."""
        ctl = self._ctl
        q = HEAD + (k % RING) * SLOT
        _add(ctl, AWAITED, k - int(ctl[AWAITED]))                  # announce it (only this thread writes it)
        if ctl[q + _RES] != 0:
            return
        if self._poll.poll(_POLL_MS):
            try:
                os.eventfd_read(self._landed)
            except BlockingIOError:
                pass
            if ctl[LOST] != k:
                return
        if ctl[LOST] == k and ctl[q + _RES] == 0:
            ctl[q + _RES], ctl[LOST] = 1, -1                        # give the lost slot back
            while ctl[ALIVE] >= self.threads:                       # the exiting reader is one store away
                time.sleep(0.001)
            self._respawn()
            err = FlashReadError(f"{self.path}: a reader thread exited while reading offset "
                                 f"{t.offset if t else '?'}; the request was aborted and the thread restarted")
            if t is None:
                raise err
            t._state, t._value = "failed", err
            raise err

    def _respawn(self) -> None:
        """Start readers in place of any that exited (only fault injection makes one exit)."""
        self._ctl[EXIT_AT] = -1
        self._spawn(self.threads - int(self._ctl[ALIVE]))

    def _inject_exit(self, k: int) -> None:
        """Fault injection for tests: the reader that takes request k exits holding it."""
        self._ctl[EXIT_AT] = k

    def close(self) -> None:
        if self.fd < 0:
            return
        for _ in range(int(self._ctl[ALIVE])):
            k = self._next
            q = HEAD + (k % RING) * SLOT
            while self._ctl[q + _RES] == 0:
                self._wait_landed(k - RING)
            self._ctl[q + _LEN], self._ctl[q + _RES] = -1, 0
            self._next += 1
            os.eventfd_write(self._posted, 1)
        deadline = time.monotonic() + 5
        while self._ctl[ALIVE] > 0 and time.monotonic() < deadline:
            self._poll.poll(10)
            try:
                os.eventfd_read(self._landed)
            except BlockingIOError:
                pass
        if self._ctl[ALIVE] > 0:           # a reader stuck in the kernel: its memory must outlive it
            _STRANDED.append(self._ctl)
        os.close(self._posted)
        os.close(self._landed)
        os.close(self.fd)
        self.fd = -1
