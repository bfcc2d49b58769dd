"""The read arena (engine/flash/arena.py): spans never overlap while live, space comes back in first-in
first-out order, and a wrapped request starts at the front."""

import numpy as np

from engine.flash.arena import ReadArena
from engine.flash.bundles import ALIGN


def test_spans_are_aligned_disjoint_and_reused_in_order():
    a = ReadArena(8 * ALIGN)
    s1, s2, s3 = a.alloc(3 * ALIGN), a.alloc(3 * ALIGN), a.alloc(2 * ALIGN)
    assert (s1.start, s2.start, s3.start) == (0, 3 * ALIGN, 6 * ALIGN)
    assert a.alloc(ALIGN) is None                       # full
    a.release(s2)
    assert a.alloc(ALIGN) is None                       # s1 is older and still held
    a.release(s1)
    s4 = a.alloc(4 * ALIGN)                              # wraps to the front, into s1's and s2's space
    assert s4.start == 0
    assert a.alloc(3 * ALIGN) is None                   # only 2 pages free before s3
    s5 = a.alloc(2 * ALIGN)
    assert s5.start == 4 * ALIGN
    a.release(s3), a.release(s4), a.release(s5)
    assert a.in_use == 0 and a.alloc(8 * ALIGN).start == 0


def test_random_traffic_never_overlaps_live_spans():
    rng = np.random.default_rng(0)
    a = ReadArena(16 * ALIGN)
    live = []
    for _ in range(2000):
        if live and (rng.random() < 0.5 or len(live) > 6):
            a.release(live.pop(0))                       # consumed in submission order
        s = a.alloc(int(rng.integers(1, 6)) * ALIGN)
        if s is not None:
            assert s.start % ALIGN == 0 and s.end <= a.size
            assert all(s.end <= o.start or o.end <= s.start for o in live)
            live.append(s)
        elif not live:
            raise AssertionError("an empty arena holds any request that fits it")
