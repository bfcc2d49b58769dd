"""Stop strings over a text stream.

Generation stops as soon as the text produced so far contains any stop string; the caller gets
the text before it and never the stop string itself (OpenAI and llama.cpp behave the same).
Because a stop string can arrive split over several chunks, `StopChecker` holds back the longest
tail that could still grow into one, and releases it once it cannot (or at `flush`).

The result does not depend on how the text was chunked: the stop is the occurrence that ends
first in the stream (ties: the one that starts first, i.e. the longest), which is what a
character-by-character check would find.
"""

from __future__ import annotations

from collections.abc import Sequence


class StopChecker:
    """`feed(chunk) -> (text_to_emit, stopped)`; `flush()` at the end of a stream with no stop.

    `stop` is a list of non-empty strings (a single str is taken as one stop string, as in the
    OpenAI API). An empty list never stops and never holds anything back.
    """

    def __init__(self, stop: Sequence[str] | str) -> None:
        stops = [stop] if isinstance(stop, str) else list(stop)
        for s in stops:
            if not isinstance(s, str):
                raise ValueError(f"stop strings must be str, got {s!r} ({type(s).__name__})")
            if s == "":
                raise ValueError("empty stop string: it would match before any text; remove it from `stop`")
        self.stop: tuple[str, ...] = tuple(dict.fromkeys(stops))  # dedupe, keep order
        self.matched: str | None = None  # the stop string that ended the stream, once stopped
        self._held = ""

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, chunk: str) -> tuple[str, bool]:
        """Add text; return what is safe to show now and whether a stop string was hit.

        After a hit every further call returns ("", True).
        """
        if self.stopped:
            return "", True
        buf = self._held + chunk
        hit = self._first_match(buf)
        if hit is not None:
            start, self.matched = hit
            self._held = ""
            return buf[:start], True
        keep = self._partial_tail_len(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release held-back text at the end of the stream ("" if a stop string was hit)."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _first_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, start, stop string)
        for s in self.stop:
            i = buf.find(s)  # the first occurrence of s is also the one that ends first
            if i >= 0 and (best is None or (i + len(s), i) < best[:2]):
                best = (i + len(s), i, s)
        return None if best is None else (best[1], best[2])

    def _partial_tail_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop string."""
        longest = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(buf)), longest, -1):
                if buf.endswith(s[:k]):
                    longest = k
                    break
        return longest
