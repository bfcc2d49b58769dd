"""The flash FFN's read buffers: one page-aligned arena handed out front to back as a ring.

Why a ring and not fixed slots: a slot must hold the longest request (a merged run of up to
`request_bytes`), while most decode requests are one or two bundles; with slots the read buffers grow
with the queue depth times the longest request, and that memory comes out of the neuron budget. Reads
are consumed in the order they were submitted, so the space they hold is freed in that order too: a
first-in first-out ring wastes nothing but the unused end of the arena when a request wraps.

alloc(n) gives a Span of n bytes (a multiple of 4096, at a 4096-aligned offset) or None when the
arena is full; release(span) frees it; space is reused once every older span is released.
"""

from __future__ import annotations

from collections import deque

import numpy as np

from engine.flash.bundles import ALIGN
from engine.flash.reader import aligned_buffer


class Span:
    __slots__ = ("start", "end", "released")

    def __init__(self, start: int, end: int):
        self.start, self.end, self.released = start, end, False


class ReadArena:
    def __init__(self, nbytes: int):
        self._map, self.bytes = aligned_buffer(nbytes)      # (nbytes rounded to 4096,) uint8
        self.size = len(self.bytes)
        self._live: deque[Span] = deque()                    # spans not yet freed, oldest first
        self._head = 0                                       # where the next span starts

    def alloc(self, n: int) -> Span | None:
        assert n % ALIGN == 0 and 0 < n <= self.size, "requests are aligned and fit the arena"
        if not self._live:
            self._head = 0
            start = 0
        else:
            tail = self._live[0].start
            if self._head > tail:          # in use: [tail, head); free: [head, size) then [0, tail)
                start = self._head if self.size - self._head >= n else (0 if tail >= n else -1)
            else:                          # wrapped, in use: [tail, end) and [0, head); free: [head, tail)
                start = self._head if tail - self._head >= n else -1
            if start < 0:
                return None
        span = Span(start, start + n)
        self._live.append(span)
        self._head = start + n
        return span

    def view(self, span: Span) -> np.ndarray:
        return self.bytes[span.start:span.end]

    def release(self, span: Span) -> None:
        span.released = True
        while self._live and self._live[0].released:
            self._live.popleft()

    @property
    def in_use(self) -> int:
        return len(self._live)
