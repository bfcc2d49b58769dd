"""Weight matrices in their storage precision, repacked into the layouts the kernels read.

A weight is (rows, cols) = (out_features, in_features). Layouts are documented in kernels/layouts.md.
Nothing here expands a whole quantized matrix to float32: decode reads it through a matvec kernel, and
prefill either multiplies the tokens rounded to int8 by the weights as stored (matmul_int8, kernels/gemm.py)
or dequantizes one tile of rows at a time into a small scratch buffer fed to BLAS (matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import dequant, gemm, input_sparse, matvec, sparse24
from kernels.convert import bf16_bits_to_f32, f16_bits_to_f32

# Rows per prefill tile are chosen so a tile is about this many float32 elements (512 KiB): large enough
# for BLAS to run well, small enough that the transient float32 copy stays negligible.
_TILE_ELEMS = 1 << 17


class Weight:
    """Common behaviour; subclasses hold the arrays of one layout."""

    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._arrays())

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """x (cols,) f32 -> (rows,) f32."""
        if out is None:
            out = np.empty(self.shape[0], dtype=np.float32)
        return self._matvec(x, out)

    def matmul(self, x: np.ndarray) -> np.ndarray:
        """x (n, cols) f32 -> (n, rows) f32; one token goes through the matvec kernel."""
        n = x.shape[0]
        rows, cols = self.shape
        if n == 1:
            return self._matvec(np.ascontiguousarray(x[0]), np.empty(rows, dtype=np.float32))[None, :]
        out = np.empty((n, rows), dtype=np.float32)
        tile = max(16, _TILE_ELEMS // cols)
        scratch = np.empty((min(tile, rows), cols), dtype=np.float32)
        for r0 in range(0, rows, tile):
            r1 = min(rows, r0 + tile)
            w = self.dequantize(r0, r1, scratch[: r1 - r0])
            np.matmul(x, w.T, out=out[:, r0:r1])
        return out

    def matmul_int8(self, x: np.ndarray) -> np.ndarray:
        """x (n, cols) f32 -> (n, rows) f32 with x rounded to int8 per block of 32 and integer products
        (kernels/gemm.py) where the layout has them (Q4, Q5, 32-block I8); matmul's f32 path elsewhere."""
        return self.matmul(x)

    def rows_f32(self, ids: np.ndarray) -> np.ndarray:
        """ids (n,) int -> (n, cols) f32: embedding lookup without expanding the table."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.shape[1]), dtype=np.float32)
        for i, r in enumerate(ids):
            self.dequantize(int(r), int(r) + 1, out[i : i + 1])
        return out

    def to_float32(self) -> np.ndarray:
        """The whole matrix as (rows, cols) f32: for tests and small tensors only."""
        return self.dequantize(0, self.shape[0], np.empty(self.shape, dtype=np.float32))

    def take_rows(self, order: np.ndarray) -> "Weight":
        """A weight whose row i is this weight's row order[i] (used to undo GGUF's Q/K row order)."""
        return type(self)(*[a[order] for a in self._arrays()])

    def row_slice(self, r0: int, r1: int) -> "Weight":
        """Rows r0..r1 as a view (no copy)."""
        return type(self)(*[a[r0:r1] for a in self._arrays()])

    # layout-specific
    def _arrays(self) -> tuple[np.ndarray, ...]:
        raise NotImplementedError

    def _matvec(self, x, out):
        raise NotImplementedError

    def dequantize(self, r0: int, r1: int, out: np.ndarray) -> np.ndarray:
        """Rows r0..r1 into out (r1-r0, cols) f32."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class F32Weight(Weight):
    w: np.ndarray  # (rows, cols) float32

    @property
    def shape(self):
        return self.w.shape

    def _arrays(self):
        return (self.w,)

    def _matvec(self, x, out):
        return matvec.matvec_f32(self.w, x, out)

    def matmul(self, x):
        return x @ self.w.T

    def dequantize(self, r0, r1, out):
        out[:] = self.w[r0:r1]
        return out


@dataclass(frozen=True, eq=False)
class _Bits16Weight(Weight):
    """16-bit floats kept as uint16 bit patterns (numba has no float16); subclasses pick the kernels."""

    bits: np.ndarray  # (rows, cols) uint16

    @property
    def shape(self):
        return self.bits.shape

    def _arrays(self):
        return (self.bits,)

    def _matvec(self, x, out):
        return type(self).matvec_kernel(self.bits, x, out)

    def dequantize(self, r0, r1, out):
        return type(self).dequant_kernel(self.bits[r0:r1], out)


class F16Weight(_Bits16Weight):
    """IEEE half bit patterns."""

    matvec_kernel = staticmethod(matvec.matvec_f16)
    dequant_kernel = staticmethod(dequant.dequant_f16)


class BF16Weight(_Bits16Weight):
    """bfloat16 bit patterns."""

    matvec_kernel = staticmethod(matvec.matvec_bf16)
    dequant_kernel = staticmethod(dequant.dequant_bf16)


@dataclass(frozen=True, eq=False)
class _BlockWeight(Weight):
    """Values packed below a byte in blocks of 32, one scale and optional min per block; subclasses
    pick the kernels and say what qs holds."""

    qs: np.ndarray  # (rows, ...) the packed values (subclasses)
    d: np.ndarray   # (rows, cols/32) block scale: float32, or uint16 f16 bits
    m: np.ndarray   # (rows, cols/32) block offset like d, or (rows, 0): an offset implied by the layout

    @property
    def shape(self):
        return (self.qs.shape[0], self.d.shape[1] * 32)

    def _arrays(self):
        return (self.qs, self.d, self.m)

    def _matvec(self, x, out):
        return type(self).matvec_kernel(self.qs, self.d, self.m, x, out)

    def dequantize(self, r0, r1, out):
        return type(self).dequant_kernel(self.qs[r0:r1], self.d[r0:r1], self.m[r0:r1], out)

    def matmul_int8(self, x):
        if x.shape[0] == 1:
            return self.matmul(x)
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        return type(self).gemm_kernel(self.qs, self.d, self.m, np.ascontiguousarray(x), out)


class Q4Weight(_BlockWeight):
    """qs (rows, cols/2) uint8, GGUF Q4_0 nibble order per 32-block (kernels/layouts.md); an empty m is
    Q4_0's value d*(q-8)."""

    matvec_kernel = staticmethod(matvec.matvec_q4)
    dequant_kernel = staticmethod(dequant.dequant_q4)
    gemm_kernel = staticmethod(gemm.gemm_q4)


class Q5Weight(_BlockWeight):
    """qs (rows, 5*cols/32) uint32: per group of blocks their nibbles in the Q4 order, then a word of high
    bits per block (kernels/layouts.md); an empty m is Q5_0's value d*(q-16)."""

    matvec_kernel = staticmethod(matvec.matvec_q5)
    dequant_kernel = staticmethod(dequant.dequant_q5)
    gemm_kernel = staticmethod(gemm.gemm_q5)


class Q6Weight(_BlockWeight):
    """qs (rows, 3*cols/32) uint64: per group of blocks their low nibbles in the Q4 order, then their top
    two bits (kernels/layouts.md); d (rows, cols/32) uint32, two f16 scales per block (elements 0..15 in
    the low half); m (rows, 0): value = scale * (q - 32), Q6_K's."""

    matvec_kernel = staticmethod(matvec.matvec_q6)
    dequant_kernel = staticmethod(dequant.dequant_q6)
    gemm_kernel = staticmethod(gemm.gemm_q6)


class S24Weight(_BlockWeight):
    """A 2:4 sparse weight (kernels/sparse24.py): qs (rows, cols/64 blocks) int16 (S8: mask and 32 int8
    values per block) or int32 (S4: mask and 32 nibbles), d (rows, cols/64) f16 bits, m (rows, 0)."""

    matvec_kernel = staticmethod(matvec.matvec_s24)
    dequant_kernel = staticmethod(sparse24.dequant_numpy)
    gemm_kernel = staticmethod(gemm.gemm_s24)

    @property
    def shape(self):
        return (self.qs.shape[0], self.d.shape[1] * sparse24.BLOCK)

    @property
    def form(self) -> str:
        return sparse24.form_of(self.qs)


@dataclass(frozen=True, eq=False)
class I8Weight(Weight):
    q: np.ndarray  # (rows, cols) int8
    d: np.ndarray  # (rows, cols/B) block scale, B in {16, 32}: float32, or uint16 f16 bits
    m: np.ndarray  # (rows, cols/B) block offset like d, or (rows, 0) when the format has none

    @property
    def shape(self):
        return self.q.shape

    def _arrays(self):
        return (self.q, self.d, self.m)

    def _matvec(self, x, out):
        return matvec.matvec_i8(self.q, self.d, self.m, x, out)

    def dequantize(self, r0, r1, out):
        return dequant.dequant_i8(self.q[r0:r1], self.d[r0:r1], self.m[r0:r1], out)

    def matmul_int8(self, x):
        if x.shape[0] == 1 or self.q.shape[1] != 32 * self.d.shape[1]:
            return self.matmul(x)
        out = np.empty((x.shape[0], self.shape[0]), dtype=np.float32)
        return gemm.gemm_i8(self.q, self.d, self.m, np.ascontiguousarray(x), out)


@dataclass(frozen=True, eq=False)
class Q4CWeight(Weight):
    """A Q4 weight stored column by column, the Q4C layout (kernels/layouts.md): what input-sparse decode
    reads (kernels/input_sparse.py), the same bytes as the Q4 weight it came from. Its rows are not
    contiguous, so it has no row views: a fused q|k|v or gate|up is converted whole."""

    qc: np.ndarray  # (cols, rows/2) uint8 each column's nibbles
    dc: np.ndarray  # (cols/32, rows) block scales: float32, or uint16 f16 bits
    mc: np.ndarray  # (cols/32, rows) block offsets like dc, or (cols/32, 0): Q4_0's d*(q-8)

    @staticmethod
    def from_q4(w: "Q4Weight") -> "Q4CWeight":
        return Q4CWeight(*input_sparse.pack_q4c(w.qs, w.d, w.m))

    @property
    def shape(self):
        return (self.dc.shape[1], self.qc.shape[0])

    def _arrays(self):
        return (self.qc, self.dc, self.mc)

    def _matvec(self, x, out):
        return input_sparse.matvec_q4c(self.qc, self.dc, self.mc, x, np.float32(0.0), out)

    def matvec_sparse(self, x: np.ndarray, threshold: float, out: np.ndarray) -> np.ndarray:
        """x (cols,) f32 -> out (rows,) f32 = W @ x with the entries |x| < threshold dropped."""
        return input_sparse.matvec_q4c(self.qc, self.dc, self.mc, x, np.float32(threshold), out)

    def matmul(self, x):
        """x (n, cols) f32 -> (n, rows) f32: one token through the kernel; several through BLAS, a few
        blocks of columns dequantized at a time."""
        n = x.shape[0]
        rows, cols = self.shape
        if n == 1:
            return self._matvec(np.ascontiguousarray(x[0]), np.empty(rows, dtype=np.float32))[None, :]
        out = np.zeros((n, rows), dtype=np.float32)
        for c0, c1, w in self._column_tiles():
            out += x[:, c0:c1] @ w
        return out

    def dequantize(self, r0, r1, out):
        for c0, c1, w in self._column_tiles():
            out[:, c0:c1] = w[:, r0:r1].T
        return out

    def _column_tiles(self):
        """(c0, c1, w): columns c0..c1 as w (c1-c0, rows) f32, a few blocks of 32 at a time (one scratch)."""
        rows, cols = self.shape
        step = max(1, _TILE_ELEMS // (32 * rows))                      # blocks of 32 columns per tile
        scratch = np.empty((32 * step, rows), dtype=np.float32)
        for b0 in range(0, cols // 32, step):
            b1 = min(cols // 32, b0 + step)
            yield 32 * b0, 32 * b1, input_sparse.dequant_q4c_numpy(self.qc, self.dc, self.mc, b0, b1,
                                                                   scratch[: 32 * (b1 - b0)])

    def take_rows(self, order):
        raise NotImplementedError("the Q4C layout has no row order of its own to permute")

    def row_slice(self, r0, r1):
        raise NotImplementedError("the Q4C layout has no contiguous rows to view")


def dense_from_numpy(a: np.ndarray, dtype: str) -> Weight:
    """A 2-D safetensors/GGUF array in F32, F16 or BF16 (the latter two as uint16 bits) -> Weight.
    Always a copy: `a` is usually a view into a file map that the loader releases afterwards."""
    if dtype == "F32":
        return F32Weight(np.array(a, dtype=np.float32, order="C", copy=True))
    if dtype == "F16":
        return F16Weight(np.array(a.view(np.uint16), order="C", copy=True))
    if dtype == "BF16":
        return BF16Weight(np.array(a.view(np.uint16), order="C", copy=True))
    raise ValueError(f"no dense layout for dtype {dtype}")


def vector_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    """Norm weights and biases: small, so always float32."""
    if dtype == "F16":
        return f16_bits_to_f32(a.view(np.uint16)).astype(np.float32)
    if dtype == "BF16":
        return bf16_bits_to_f32(a.view(np.uint16)).astype(np.float32)
    return np.asarray(a, dtype=np.float32).copy()
