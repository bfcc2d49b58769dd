"""Give back memory the runtime no longer needs once the kernels are loaded.

Loading numba's compiled kernels, from its on-disk cache or by compiling, touches tens of MiB of
LLVM's own machine code in libllvmlite.so, on top of what `import numba` touches. Those pages are
file-backed and clean, so they count in the process's RSS although decode never executes them: the
kernels run from separately allocated memory. After a warm-up that has loaded every kernel,
`release_compiler_pages` asks the kernel to page them out (MADV_PAGEOUT, Linux 5.4+): about a quarter
of SmolLM2's steady-state RSS. Nothing is lost: if numba compiles again later (a new argument type),
the pages fault back in from the page cache.

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


_M_MMAP_THRESHOLD = -3   # <malloc.h>


def pin_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Keep glibc's malloc from moving large blocks onto its heap.

    glibc serves blocks above a threshold with mmap, and each time such a block is freed it raises the
    threshold (up to 32 MiB), so that blocks of that size come from its heap instead, where freed
    memory stays in the process until malloc_trim, and prefill's MiB-sized temporaries would keep a
    process ~10% above its loaded size after the first prompt. A fixed
    threshold turns the adjustment off: blocks of 1 MiB and more are mapped and unmapped, smaller ones
    (a decode step's, reused every token) stay on the heap. Returns whether it was set (glibc only)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None) if libc is not None else None
    if mallopt is None:
        return False
    return mallopt(_M_MMAP_THRESHOLD, nbytes) == 1


_MADV_NOHUGEPAGE = 15   # <linux/mman.h>


def small_pages(a) -> bool:
    """Ask for 4 KiB pages under a large, lazily filled array (the KV cache): numpy asks the kernel for
    transparent huge pages on every allocation of 4 MiB or more, and then writing the first positions of
    each head's (max_seq, head_dim) block faulted in a whole 2 MiB page: a 4096-token cache became
    resident at its full size (+86 MiB on SmolLM2) on the first prompt. Returns whether it was applied."""
    if not sys.platform.startswith("linux") or a.nbytes < (4 << 20):
        return False
    libc = _libc()
    if libc is None:
        return False
    page = 4096
    start = a.ctypes.data // page * page
    end = a.ctypes.data + a.nbytes
    return libc.madvise(start, end - start, _MADV_NOHUGEPAGE) == 0


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
    trim_heap()
    return advised


def trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim; musl has none): small arrays freed
    at load (repacking, stacking layers: ~9 MiB on SmolLM2) otherwise stay in the process."""
    if not sys.platform.startswith("linux"):
        return
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None) if libc is not None else None
    if trim is not None:
        trim(0)
