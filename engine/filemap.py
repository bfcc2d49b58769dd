"""Read-only memory maps of model files, shared by the GGUF and safetensors readers."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError


def map_file(path: Path) -> tuple[np.ndarray, int]:
    """(uint8 read-only view of the whole file, its size). Raises ModelFormatError if it is missing."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: file not found") from None
    if size == 0:
        return np.zeros(0, dtype=np.uint8), 0
    return np.memmap(path, dtype=np.uint8, mode="r"), size


def release(mapped: np.ndarray, offset: int, nbytes: int) -> None:
    """Drop the mapped pages of bytes offset..offset+nbytes from this process's resident set.

    Loading copies every tensor into its own layout; without this, the file's pages would stay
    resident next to the copies and peak RSS at load would be about twice the model. The pages stay in
    the OS page cache, and touching them again simply re-reads them.
    """
    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return  # not a memmap, or a platform without madvise: memory is released when the map closes
    start = offset // mmap.PAGESIZE * mmap.PAGESIZE
    mm.madvise(mmap.MADV_DONTNEED, start, offset + nbytes - start)
