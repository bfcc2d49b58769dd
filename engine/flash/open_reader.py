"""Which flash reader runs: kernel AIO where the system allows it, else Python reader threads, or the
one POCKETINFER_FLASH_READER (or the caller) names.

  aio     kernel AIO from the submitting thread (engine/flash/aio_reader.py): Linux but not Android,
          O_DIRECT, x86-64 or AArch64. Near fio's IOPS, and the fastest in the flash FFN's pipeline.
  python  Python reader threads (engine/flash/reader.py): runs everywhere.
  native  native reader threads running a numba cfunc (engine/flash/native_reader.py): needs numba,
          pthreads and eventfd. Only on request: alone it reaches more IOPS than Python threads, but
          inside the flash FFN on 2 cores its threads take the CPU from the compute and it ran slower
          than Python threads (BENCHMARKS.md, flash readers).
All three read the same bytes into the same buffers; "auto" takes aio where it can, else python.
"""

from __future__ import annotations

import os

from engine.errors import ConfigError
from engine.flash import aio_reader, native_reader
from engine.flash.reader import FlashReader

KINDS = ("auto", "aio", "native", "python")
ENV = "POCKETINFER_FLASH_READER"


def open_reader(path, *, direct: bool = True, threads: int = 2, kind: str | None = None) -> FlashReader:
    kind = (kind or os.environ.get(ENV) or "auto").strip().lower()
    if kind not in KINDS:
        raise ConfigError(f"flash reader {kind!r} (from {ENV} or the caller) is not one of {', '.join(KINDS)}")
    if kind in ("auto", "aio") and direct and aio_reader.available():
        try:
            return aio_reader.AioReader(path, direct=direct, threads=threads)
        except OSError as e:
            if kind == "aio":
                raise ConfigError(f"flash reader 'aio' cannot run on {path}: {e}; choose auto, native or python") from None
    elif kind == "aio":
        raise ConfigError("flash reader 'aio' needs Linux (not Android), O_DIRECT and x86-64 or AArch64; "
                          "choose auto, native or python")
    if kind == "native":
        if not native_reader.available():
            raise ConfigError("flash reader 'native' needs numba, pthreads and eventfd (Linux or Android); "
                              "choose auto or python")
        return native_reader.NativeReader(path, direct=direct, threads=threads)
    return FlashReader(path, direct=direct, threads=threads)
