"""Reads safetensors files: an 8-byte little-endian header length, a JSON header, then raw tensor bytes.

Parsed here rather than with the safetensors package because its numpy backend cannot return BF16, and
because we want errors that name the file and the tensor. Tensors are views into a read-only memmap;
the model loader copies them into their final layout.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError
from engine.formats.filemap import map_file, release

# safetensors dtype -> numpy dtype used to view the bytes (F16/BF16 travel as uint16 bit patterns).
_DTYPES = {"F32": np.float32, "F16": np.uint16, "BF16": np.uint16}


class SafetensorsFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mm, size = map_file(self.path)
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFormatError(f"{self.path}: truncated safetensors file ({size} bytes); re-download it")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100_000_000:
                raise ModelFormatError(
                    f"{self.path}: corrupt or truncated safetensors header (claims {n} bytes, file has {size}); re-download it")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ModelFormatError(f"{self.path}: corrupt safetensors header ({e}); re-download it") from None
        if not isinstance(header, dict):
            raise ModelFormatError(f"{self.path}: corrupt safetensors header (not a JSON object); re-download it")
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self._entries = header
        end = 0
        for name, e in header.items():
            try:
                lo, hi = e["data_offsets"]
                e["shape"] = [int(s) for s in e["shape"]]
                dtype = e["dtype"]
            except (KeyError, TypeError, ValueError):
                raise ModelFormatError(f"{self.path}: corrupt header entry for tensor {name!r}; re-download it") from None
            if dtype in _DTYPES and hi - lo != int(np.prod(e["shape"], dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize:
                raise ModelFormatError(f"{self.path}: tensor {name!r} has {hi - lo} bytes for shape {e['shape']}; the file is corrupt")
            end = max(end, hi)
        if self._data_start + end > size:
            raise ModelFormatError(
                f"{self.path}: truncated: tensors need {self._data_start + end} bytes, the file has {size}; re-download it")

    def keys(self):
        return self._entries.keys()

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def dtype(self, name: str) -> str:
        return self._entries[name]["dtype"]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only view: float32, or uint16 bit patterns for F16/BF16."""
        e = self._entries[name]
        dtype = _DTYPES.get(e["dtype"])
        if dtype is None:
            raise ModelFormatError(
                f"{self.path}: tensor {name!r} has dtype {e['dtype']}; pocketinfer reads F32, F16 and BF16 safetensors "
                "(convert the checkpoint to one of them, or use a GGUF)")
        lo, hi = e["data_offsets"]
        raw = self._mm[self._data_start + lo:self._data_start + hi]
        return raw.view(dtype).reshape(e["shape"])

    def release(self, name: str) -> None:
        """Call once a tensor has been copied out: its file pages leave our resident set."""
        lo, hi = self._entries[name]["data_offsets"]
        release(self._mm, self._data_start + lo, hi - lo)
