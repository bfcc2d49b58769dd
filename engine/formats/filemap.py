"""Read-only memory maps of model files, shared by the GGUF and safetensors readers."""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError

FOLIO_SLACK = 2 << 20   # bytes released beyond each side of a range (see release)


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

    The range is widened by FOLIO_SLACK on both sides: the page cache holds files in large folios
    (up to 2 MiB on Linux 6.x), and a fault on one page maps its whole folio, so reading a tensor also
    maps most of its neighbours, released already or not, which would then stay resident and set the
    load's peak. Dropping pages of a tensor not yet read costs nothing: it faults them back in when it
    is read.
    """
    mm = getattr(mapped, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return  # not a memmap, or a platform without madvise: memory is released when the map closes
    start = max(0, offset - FOLIO_SLACK) // mmap.PAGESIZE * mmap.PAGESIZE
    end = min(len(mapped), offset + nbytes + FOLIO_SLACK)
    if end > start:
        mm.madvise(mmap.MADV_DONTNEED, start, end - start)
