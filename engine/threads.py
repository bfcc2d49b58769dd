"""One thread setting for numba and BLAS together (and ONNX Runtime's sessions, which read it)."""

from __future__ import annotations

import os

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
