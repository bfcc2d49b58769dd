"""One thread setting for numba and BLAS together (and ONNX Runtime's sessions, which read it), and
`one_pool`: a block of work in which only one of the two pools runs threads.

Numba's and OpenBLAS's worker threads both spin for a while after their work; when a prefill alternates
numba kernels and multi-threaded BLAS calls, each pool's spinning threads take the cores the other's
work needs, and both slow down: a TinyLlama-shape prefill through the int8 GEMM ran at half the speed
with numpy's attention on 2 BLAS threads than on 1 (BENCHMARKS.md).
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from kernels.backend import set_threads as _set_numba_threads


def default_threads() -> int:
    """Physical cores: hyper-threads share the memory bandwidth that decode is bound by."""
    try:
        import psutil
        n = psutil.cpu_count(logical=False)
    except ImportError:
        n = None
    return n or os.cpu_count() or 1


_current: int | None = None     # the last setting, for engines with pools of their own (ONNX Runtime)


def current_threads() -> int:
    """The thread count set last (the default before any)."""
    return _current or default_threads()


def set_threads(n: int | None) -> int:
    global _current
    n = default_threads() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads must be at least 1, got {n}")
    _current = n
    _set_numba_threads(n)
    try:
        from threadpoolctl import threadpool_limits
        threadpool_limits(n)
    except ImportError:  # optional: without it BLAS keeps its own default
        pass
    return n


_controller = None


@contextmanager
def one_pool(keep: str):
    """Inside the block only the `keep` pool ("numba" or "blas") runs more than one thread; the other
    runs its work on the calling thread."""
    global _controller
    if keep == "blas":
        from kernels.backend import NUMBA

        if not NUMBA:
            yield
            return
        import numba

        before = numba.get_num_threads()
        numba.set_num_threads(1)
        try:
            yield
        finally:
            numba.set_num_threads(before)
        return
    assert keep == "numba", keep
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # optional: without it BLAS keeps its threads
        yield
        return
    if _controller is None:
        _controller = ThreadpoolController()
    with _controller.limit(limits=1, user_api="blas"):
        yield
