"""A whole weight matrix left in the model file and read from flash on every use: the token embeddings
and the LM head of a deploy whose budget cannot hold them (plan.json execution.lm_head == "flash").

Why: on small models the vocabulary matrix dominates. SmolLM2-135M's tied embedding/LM head is Q8_0,
28.7 MiB of its 92 MiB, so a 30% budget (27.6 MiB) cannot keep it resident however the FFN neurons are
split. PowerInfer-2 keeps it in memory, as this engine does whenever the budget allows; below that,
streaming it is the only way to honour the budget. Each use costs one sequential pass over the tensor.

- matmul(x): the rows are read in chunks of ~CHUNK_BYTES into two aligned buffers, the next chunk's read
  in flight (engine/flash/reader.py: O_DIRECT, a reader thread, the GIL released) while the current
  one is converted to the kernels' layout (engine/formats/gguf_quants.py) and multiplied. Chunks are whole
  rows, so for one token the arithmetic per row is the resident kernel's (same layout, same row-wise
  matvec): quantized logits equal the resident run's bit for bit (F32 goes through BLAS GEMV, whose
  blocking follows the row count: equal within float rounding, as are several tokens' BLAS tiles).
- rows_f32(ids): one small read per looked-up row (a token's embedding).
Resident bytes: the two chunk buffers and the small row buffer, nothing else.
"""

from __future__ import annotations

import os
import time

import numpy as np

from engine.errors import FlashReadError
from engine.flash.bundles import ALIGN
from engine.flash.open_reader import open_reader
from engine.flash.reader import aligned_buffer
from engine.formats.gguf_quants import tensor_nbytes, weight_from_gguf

CHUNK_BYTES = 1 << 20   # per request: 1 MiB sequential reads run at the disk's sequential speed here


class FlashMatrix:
    """rows x cols matrix of GGUF type `ggml_type` whose bytes start at `offset` in the file at `path`."""

    def __init__(self, path, offset: int, ggml_type: int, shape: tuple[int, int], name: str, *,
                 direct: bool = True, chunk_bytes: int = CHUNK_BYTES):
        self.path = str(path)
        self.name = name
        self.offset = int(offset)
        self.ggml_type = int(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        rows, cols = self.shape
        self.row_bytes = tensor_nbytes(self.ggml_type, cols)
        self.file_bytes = os.path.getsize(self.path)
        if self.offset + rows * self.row_bytes > self.file_bytes:
            raise FlashReadError(f"{self.path}: tensor {name!r} ends at byte {self.offset + rows * self.row_bytes}, "
                                 f"past the end of the file ({self.file_bytes} bytes): the file is truncated; "
                                 "copy the deploy directory again or re-run `pocketinfer plan`")
        self.rows_per_chunk = max(1, min(rows, chunk_bytes // self.row_bytes))
        span = self.rows_per_chunk * self.row_bytes + 2 * ALIGN      # a chunk widened to 4096-byte bounds
        self._bufs = [aligned_buffer(span) for _ in range(2)]        # (mmap, (span,) uint8 view) x 2
        self._row_buf = aligned_buffer(self.row_bytes + 2 * ALIGN)   # one looked-up row
        self.reader = open_reader(self.path, direct=direct, threads=1)
        self.bytes_read = 0          # counters since creation (aligned request bytes)
        self.io_wait_s = 0.0

    @property
    def nbytes(self) -> int:
        """Resident bytes: the read buffers only (ModelWeights.nbytes counts this)."""
        return sum(len(v) for _, v in self._bufs) + len(self._row_buf[1])

    def close(self) -> None:
        self.reader.close()

    # ------------------------------------------------------------------ what it reports (engine/executors/base.py)

    def describe(self) -> str:
        return f"{self.name}: streamed from the weights file at every use (flash)"

    def reports(self) -> list:
        return [self]

    def snapshot(self) -> int:
        return self.bytes_read

    def since(self, before: int) -> dict:
        """Bytes of embedding rows and LM head passes read since `before` (prefill's too)."""
        return {"lm_head_bytes": self.bytes_read - before}

    # ------------------------------------------------------------------ reads

    def _span(self, r0: int, r1: int) -> tuple[int, int, int]:
        """(aligned file offset, aligned length, where rows r0..r1 start inside it)."""
        start = self.offset + r0 * self.row_bytes
        end = self.offset + r1 * self.row_bytes
        a0 = start // ALIGN * ALIGN
        a1 = -(-end // ALIGN) * ALIGN
        return a0, a1 - a0, start - a0

    def _read(self, buf: np.ndarray, r0: int, r1: int, wait: bool):
        """Read rows r0..r1 into buf (a Future when not wait). The aligned span may run past the end of
        the file when the tensor is the file's last: that tail is read with a plain pread instead, since
        an O_DIRECT read there comes back short."""
        a0, n, _ = self._span(r0, r1)
        self.bytes_read += n
        if a0 + n > self.file_bytes:
            return self._read_tail(buf, a0, n)
        if wait:
            return self.reader.read(buf[:n], a0)
        return self.reader.submit(buf[:n], a0)

    def _read_tail(self, buf: np.ndarray, a0: int, n: int) -> float:
        t0 = time.perf_counter()
        want = self.file_bytes - a0
        try:
            with open(self.path, "rb", buffering=0) as f:
                got = f.readinto(memoryview(buf)[:want]) if f.seek(a0) == a0 else 0
        except OSError as e:
            raise FlashReadError(f"{self.path}: read of {want} bytes at offset {a0} failed ({e.strerror or e}); "
                                 "the request was aborted, retry it") from None
        if got != want:
            raise FlashReadError(f"{self.path}: short read at offset {a0}: {got} of {want} bytes (the file changed "
                                 "or was truncated while running); the request was aborted")
        return time.perf_counter() - t0

    def _chunk(self, buf: np.ndarray, r0: int, r1: int):
        """Rows r0..r1 (already read into buf) as a Weight in the kernels' layout."""
        _, _, skip = self._span(r0, r1)
        raw = buf[skip:skip + (r1 - r0) * self.row_bytes]
        return weight_from_gguf(self.ggml_type, raw, (r1 - r0, self.shape[1]), self.name, self.path)

    # ------------------------------------------------------------------ the Weight interface the model uses

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (n, cols) f32 -> (n, rows) f32, streaming the matrix once."""
        rows = self.shape[0]
        step = self.rows_per_chunk
        out = np.empty((x.shape[0], rows), dtype=np.float32)
        pending = self._read(self._bufs[0][1], 0, min(rows, step), wait=False)
        for i, r0 in enumerate(range(0, rows, step)):
            r1 = min(rows, r0 + step)
            buf = self._bufs[i % 2][1]
            t0 = time.perf_counter()
            if not isinstance(pending, float):
                pending.result()                 # FlashReadError surfaces here
            self.io_wait_s += time.perf_counter() - t0
            if r1 < rows:                        # the next chunk's read overlaps this chunk's compute
                pending = self._read(self._bufs[(i + 1) % 2][1], r1, min(rows, r1 + step), wait=False)
            out[:, r0:r1] = self._chunk(buf, r0, r1).matmul(x)
        return out

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        y = self.matmul(x.reshape(1, -1))[0]
        if out is not None:
            out[:] = y
            return out
        return y

    def rows_f32(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int -> (n, cols) f32: the looked-up rows, one read each."""
        ids = np.asarray(ids).reshape(-1)
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)
        buf = self._row_buf[1]
        for k, r in enumerate(ids):
            r = int(r)
            self._read(buf, r, r + 1, wait=True)
            out[k] = self._chunk(buf, r, r + 1).rows_f32(np.array([0]))[0]
        return out


def attach_head(weights, g, direct: bool = True) -> None:
    """Give ModelWeights whose embed / lm_head were left unloaded (gguf_loader skip) FlashMatrix objects
    over the GGUF file `g` they come from; a tied LM head is the embedding's object."""
    from engine.errors import ModelFormatError

    def flash(name: str) -> FlashMatrix:
        t = g.tensors[name]
        if len(t.shape) != 2:
            raise ModelFormatError(f"{g.path}: tensor {name!r} has shape {t.shape}, expected a matrix")
        return FlashMatrix(g.path, t.offset, t.ggml_type, t.shape, name, direct=direct)

    weights.embed = flash("token_embd.weight")
    weights.lm_head = flash("output.weight") if "output.weight" in g.tensors else weights.embed
