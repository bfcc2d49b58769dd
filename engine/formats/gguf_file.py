"""Parses GGUF files (v2 and v3): header, metadata key/values, tensor infos, then memory-maps the data.

Hand-written rather than gguf-py's GGUFReader (whose type tables and constants it uses): on SmolLM2's
file GGUFReader takes ~5x as long and ~90 MiB more memory, making an object per token string
(BENCHMARKS.md).

Layout (ggml's docs/gguf.md): magic "GGUF", uint32 version, uint64 tensor count, uint64 kv count,
kv pairs (string key, uint32 type, value), tensor infos (name, uint32 n_dims, uint64 dims[n_dims]
with dims[0] the fastest-varying, uint32 ggml type, uint64 offset), padding to `general.alignment`
(default 32), tensor data. All little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUFValueType as V

from engine.errors import ModelFormatError
from engine.formats.filemap import map_file, release
from engine.formats.gguf_quants import tensor_nbytes

# GGUF value type -> (struct format, size) for scalars, and numpy dtypes for arrays of them.
_SCALARS = {V.UINT8: ("<B", 1), V.INT8: ("<b", 1), V.UINT16: ("<H", 2), V.INT16: ("<h", 2), V.UINT32: ("<I", 4),
            V.INT32: ("<i", 4), V.FLOAT32: ("<f", 4), V.BOOL: ("<?", 1), V.UINT64: ("<Q", 8), V.INT64: ("<q", 8),
            V.FLOAT64: ("<d", 8)}
_NUMPY = {v: np.dtype(fmt) for v, (fmt, _) in _SCALARS.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # numpy order: (rows, cols) for a matrix, i.e. GGUF dims reversed
    offset: int              # from the start of the file
    nbytes: int


class _Cursor:
    def __init__(self, buf: memoryview, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        if self.pos + n > len(self.buf):
            raise ModelFormatError(f"{self.path}: truncated GGUF header; re-download the file")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, vtype: int):
        fmt, size = _SCALARS[vtype]
        return struct.unpack(fmt, self.take(size))[0]

    def string(self) -> str:
        n = self.scalar(V.UINT64)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{self.path}: corrupt GGUF string at byte {self.pos}; re-download the file") from None

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == V.STRING:
            return self.string()
        if vtype == V.ARRAY:
            item_type, count = self.scalar(V.UINT32), self.scalar(V.UINT64)
            if item_type in _NUMPY:
                dtype = _NUMPY[item_type]
                return np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype).copy()
            return [self.value(item_type) for _ in range(count)]
        raise ModelFormatError(f"{self.path}: corrupt GGUF metadata (value type {vtype}); re-download the file")


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mm, size = map_file(self.path)
        if size < 24:
            raise ModelFormatError(f"{self.path}: not a GGUF file ({size} bytes); re-download it")
        cur = _Cursor(memoryview(self._mm), self.path)
        if bytes(cur.take(4)) != b"GGUF":
            raise ModelFormatError(f"{self.path}: not a GGUF file (bad magic); check the path or re-download it")
        self.version = cur.scalar(V.UINT32)
        if self.version not in (2, 3):
            raise ModelFormatError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are); "
                                   "re-convert it with a current llama.cpp")
        n_tensors, n_kv = cur.scalar(V.UINT64), cur.scalar(V.UINT64)
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFormatError(f"{self.path}: corrupt GGUF header (counts {n_tensors}, {n_kv}); re-download it")
        self.meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.meta[key] = cur.value(cur.scalar(V.UINT32))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(V.UINT32)
            if n_dims > 4:
                raise ModelFormatError(f"{self.path}: corrupt tensor info for {name!r} ({n_dims} dims); re-download it")
            dims = [cur.scalar(V.UINT64) for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar(V.UINT32), cur.scalar(V.UINT64)))
        align = int(self.meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, gtype, offset in infos:
            if gtype not in GGML_QUANT_SIZES:
                raise ModelFormatError(
                    f"{self.path}: tensor {name!r} has unknown ggml type {gtype}; this file needs a newer reader "
                    "or is corrupt")
            n_el = int(np.prod(dims, dtype=np.int64)) if dims else 1
            nbytes = tensor_nbytes(gtype, n_el)
            start = data_start + offset
            if start + nbytes > size:
                raise ModelFormatError(
                    f"{self.path}: truncated: tensor {name!r} ends at byte {start + nbytes}, the file has {size}; "
                    "re-download it")
            self.tensors[name] = TensorInfo(name, gtype, tuple(reversed(dims)), start, nbytes)

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes as a read-only uint8 view into the file."""
        t = self.tensors[name]
        return self._mm[t.offset:t.offset + t.nbytes]

    def release(self, name: str, start: int = 0, nbytes: int | None = None) -> None:
        """Call once a tensor (or its bytes start..start+nbytes) has been copied out: those file pages
        leave our resident set."""
        t = self.tensors[name]
        release(self._mm, t.offset + start, t.nbytes - start if nbytes is None else nbytes)
