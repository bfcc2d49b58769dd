"""Parses GGUF files (v2 and v3): header, metadata key/values, tensor infos, then memory-maps the data.

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

from engine.errors import ModelFormatError
from engine.formats.filemap import map_file, release
from engine.formats.gguf_quants import GGML_TYPE_NAMES, tensor_nbytes

# GGUF value type -> (struct format, size) for scalars; 8 string, 9 array.
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}


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
        n = self.scalar(10)
        try:
            return bytes(self.take(n)).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelFormatError(f"{self.path}: corrupt GGUF string at byte {self.pos}; re-download the file") from None

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(vtype)
        if vtype == 8:
            return self.string()
        if vtype == 9:
            item_type, count = self.scalar(4), self.scalar(10)
            if item_type in _NUMPY:
                size = np.dtype(_NUMPY[item_type]).itemsize
                return np.frombuffer(self.take(count * size), dtype=_NUMPY[item_type]).copy()
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
        self.version = cur.scalar(4)
        if self.version not in (2, 3):
            raise ModelFormatError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are); "
                                   "re-convert it with a current llama.cpp")
        n_tensors, n_kv = cur.scalar(10), cur.scalar(10)
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise ModelFormatError(f"{self.path}: corrupt GGUF header (counts {n_tensors}, {n_kv}); re-download it")
        self.meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.meta[key] = cur.value(cur.scalar(4))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            n_dims = cur.scalar(4)
            if n_dims > 4:
                raise ModelFormatError(f"{self.path}: corrupt tensor info for {name!r} ({n_dims} dims); re-download it")
            dims = [cur.scalar(10) for _ in range(n_dims)]
            infos.append((name, dims, cur.scalar(4), cur.scalar(10)))
        align = int(self.meta.get("general.alignment", 32))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, gtype, offset in infos:
            if gtype not in GGML_TYPE_NAMES:
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

    def release(self, name: str) -> None:
        """Call once a tensor has been copied out: its file pages leave our resident set."""
        t = self.tensors[name]
        release(self._mm, t.offset, t.nbytes)
