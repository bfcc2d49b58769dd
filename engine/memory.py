"""Give back memory the runtime no longer needs once the kernels are loaded.

Measured on SmolLM2-135M Q4_1 (2 threads, this machine): loading numba's compiled kernels, from its
on-disk cache or by compiling, touches ~50 MiB of LLVM's own machine code in libllvmlite.so, on top of
~40 MiB touched by `import numba`. Those pages are file-backed and clean, so they count in the
process's RSS although decode never executes them: the kernels run from separately allocated memory.
After a warm-up that has loaded every kernel, `release_compiler_pages` asks the kernel to page them out
(MADV_PAGEOUT, Linux 5.4+). Nothing is lost: if numba compiles again later (a new argument type), the
pages fault back in from the page cache. Steady-state RSS went from ~265 to ~200 MiB.

Linux only; elsewhere (macOS, Termux on old kernels, no numba) it does nothing and returns 0.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_MADV_PAGEOUT = 21   # <linux/mman.h>
_LIBRARIES = ("libllvmlite",)


def _libc():
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc


def _mappings(names: tuple[str, ...]) -> list[tuple[int, int]]:
    """(start, end) of every mapping of a file whose name contains one of `names`."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) >= 6 and any(n in fields[5] for n in names):
                start, end = (int(v, 16) for v in fields[0].split("-"))
                out.append((start, end))
    return out


def start_compiler() -> None:
    """Run one tiny kernel, then release: the first kernel numba loads initializes its compiler, ~45 MiB
    here (target machine, JIT engine, typing tables), and doing that before the weights are read keeps
    it out of the load's peak RSS."""
    import numpy as np

    from kernels.norm import rmsnorm

    x = np.ones((1, 8), dtype=np.float32)       # (1, 8) f32
    rmsnorm(x, np.ones(8, dtype=np.float32), 1e-6, x)
    release_compiler_pages()


def release_compiler_pages() -> int:
    """Page out the JIT compiler's library and return freed heap to the OS; bytes advised, or 0."""
    if not sys.platform.startswith("linux"):
        return 0
    libc = _libc()
    if libc is None:
        return 0
    try:
        ranges = _mappings(_LIBRARIES)
    except OSError:
        return 0
    advised = 0
    for start, end in ranges:
        # A refusal (EINVAL before Linux 5.4) only means the pages stay resident.
        if libc.madvise(start, end - start, _MADV_PAGEOUT) == 0:
            advised += end - start
    trim = getattr(libc, "malloc_trim", None)   # glibc: hand freed heap pages back (musl has none)
    if trim is not None:
        trim(0)
    return advised
