"""Streaming detokenizer: turns token ids one at a time into text chunks that never split a
UTF-8 character.

Why this is not just `decode([token])`:
- Byte-level BPE (GPT-2, Llama 3, Qwen) and SentencePiece byte fallback (Llama 2) can spread one
  character over several tokens; decoding a prefix then ends in U+FFFD, which must not be shown.
- SentencePiece decoders strip the leading space of whatever they decode (the `Strip` step after
  `Replace('▁', ' ')`), so decoding a token alone loses the space that separates it from the
  previous word. Decoding `context + new` and diffing against `decode(context)` keeps it.
- Re-decoding the whole sequence each step is O(n) per token. Only a short window is decoded:
  it starts at a recent clean boundary (a point where the text decoded so far did not end in an
  incomplete character) and carries one token of left context.

Invariant: `"".join(chunks) == decode_fn(all ids)` for any ids whose bytes are valid UTF-8.
For invalid bytes it also holds with byte-level decoders (lossy UTF-8 decoding resynchronises at
the next lead byte). One exception is inherent to SentencePiece byte fallback: its decoder turns a
whole run of byte tokens into U+FFFD per byte when any byte in the run is invalid, so a valid
character already emitted from the start of such a run cannot be taken back.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"

# A UTF-8 character is at most 4 bytes, so valid text leaves a character incomplete for at most
# 3 tokens after a clean boundary. Past this many, the window is either byte-level tokens that
# each straddle two characters, or invalid bytes: then we emit all but the trailing U+FFFD
# (which covers the at most 3 bytes that can still complete) and re-anchor the window.
_MAX_HELD_TOKENS = 4


class StreamingDetokenizer:
    """Feed ids with `add`, get newly completed text back; `flush` at the end.

    `decode_fn(ids) -> str` is a full decode, e.g. `lambda ids: tok.decode(ids)` from `tokenizers`.
    """

    def __init__(self, decode_fn: Callable[[list[int]], str]) -> None:
        self._decode = decode_fn
        self._ids: list[int] = []
        self._start = 0        # window start: ids[_start:] is what each step decodes
        self._emitted = 0      # chars of decode(ids[_start:]) already returned to the caller
        self._last_clean = 0   # largest n such that decode(ids[:n]) did not end mid-character
        self._chunks: list[str] = []

    @property
    def ids(self) -> list[int]:
        """All token ids added so far (a copy)."""
        return list(self._ids)

    @property
    def text(self) -> str:
        """Everything emitted so far by `add` and `flush`."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes ("" while a character is incomplete)."""
        self._ids.append(int(token_id))
        n = len(self._ids)
        window = self._decode(self._ids[self._start:])

        if not window.endswith(REPLACEMENT):
            chunk = window[self._emitted:]
            if self._last_clean > self._start:
                # Slide to the previous clean boundary: the window keeps >= 1 token of left context,
                # so a stripped leading space only ever hits text that has already been emitted.
                self._start = self._last_clean
                self._emitted = len(self._decode(self._ids[self._start:n]))
            else:
                self._emitted = len(window)
            self._last_clean = n
            return self._emit(chunk)

        if n - self._last_clean <= _MAX_HELD_TOKENS:
            return ""  # hold back: the trailing U+FFFD is probably a character still arriving

        stable = len(window) - 1
        chunk = window[self._emitted:stable]
        self._emitted = max(self._emitted, stable)
        self._reanchor(window)
        return self._emit(chunk)

    def flush(self) -> str:
        """Return whatever is still held back (an incomplete character decodes as U+FFFD)."""
        window = self._decode(self._ids[self._start:])
        chunk = window[self._emitted:]
        self._emitted = max(self._emitted, len(window))
        return self._emit(chunk)

    def _reanchor(self, window: str) -> None:
        # Move the window start to the last few tokens, which hold every byte that is not yet
        # final. Text is aligned from the end: the unemitted tail of the old window must be the
        # tail of the new one. If it is not (a decoder that is not self-synchronising), keep the
        # old window: correct, only slower.
        start = len(self._ids) - _MAX_HELD_TOKENS
        if start <= self._start:
            return
        tail = window[self._emitted:]
        new_window = self._decode(self._ids[start:])
        if new_window.endswith(tail) and len(new_window) > len(tail):
            self._start = start
            self._emitted = len(new_window) - len(tail)

    def _emit(self, chunk: str) -> str:
        if chunk:
            self._chunks.append(chunk)
        return chunk
