"""An untied token-embedding table left in the GGUF file's mapping and read only by row lookups.

An untied table is never multiplied (the LM head is its own matrix), so repacking it for the kernels would
only add its bytes to the resident set. Left in the mapping, as llama.cpp's mmap leaves it, only the pages
of the rows a conversation looks up become resident: file-backed pages that the kernel can reclaim. Each
lookup converts just the looked-up rows to the kernels' layout (engine/formats/gguf_quants.py) and
dequantizes them with the same kernels a resident table uses, so the embedded values are the same.
"""

from __future__ import annotations

import numpy as np

from engine.errors import ModelFormatError
from engine.formats.gguf_quants import tensor_nbytes, weight_from_gguf
from engine.model.weights import Weight


class MappedRows:
    """(rows, cols) matrix of GGUF type `ggml_type` whose bytes are `raw`, a view into the file mapping."""

    def __init__(self, ggml_type: int, raw: np.ndarray, shape: tuple[int, int], name: str, source: str):
        self.ggml_type = int(ggml_type)
        self.shape = (int(shape[0]), int(shape[1]))
        self.name, self.source = name, source
        rows, cols = self.shape
        row_bytes = tensor_nbytes(self.ggml_type, cols)
        if raw.nbytes != rows * row_bytes:
            raise ModelFormatError(f"{source}: tensor {name!r} has {raw.nbytes} bytes, expected {rows * row_bytes} "
                                   f"for shape {self.shape}; the file is corrupt, re-download it")
        self.raw = raw.reshape(rows, row_bytes)          # (rows, row_bytes) uint8, file-backed

    @property
    def nbytes(self) -> int:
        """The bytes that can become resident: all of them once every row has been looked up (the planner
        counts them all)."""
        return self.raw.nbytes

    def rows(self, ids: np.ndarray) -> Weight:
        """ids (n,) int -> the looked-up rows as an (n, cols) Weight in the kernels' layout."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return weight_from_gguf(self.ggml_type, self.raw[ids].reshape(-1), (len(ids), self.shape[1]), self.name,
                                self.source)

    def rows_f32(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int -> (n, cols) f32: the looked-up rows, converted and dequantized."""
        w = self.rows(ids)
        return w.dequantize(0, w.shape[0], np.empty(w.shape, dtype=np.float32))

    def to_float32(self) -> np.ndarray:
        """The whole matrix as (rows, cols) f32: for tests and small tensors only."""
        return self.rows_f32(np.arange(self.shape[0]))
