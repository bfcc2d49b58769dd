"""Chooses numba or the plain-numpy twins, once, at import.

numba is used when it imports and POCKETINFER_NO_NUMBA is not set. On Termux (no numba wheel) or with
POCKETINFER_NO_NUMBA=1 every kernel falls back to its numpy twin of the same signature: slower, same
results within float rounding.
"""

import hashlib
import os
import warnings

_disabled = os.environ.get("POCKETINFER_NO_NUMBA", "").strip().lower() in ("1", "true", "yes", "on")

numba = None
if not _disabled:
    try:
        import numba  # noqa: F811
    except ImportError:  # numba is optional at run time (phones)
        numba = None

NUMBA = numba is not None


def kernel_cache_dir() -> str:
    """Where numba keeps compiled kernels: a directory named by a hash of every kernels/*.py source.

    numba's own cache checks only the timestamp of the file that defines a jitted function, not of the
    functions it calls: when kernels/matvec.py changes, kernels/decode_token.py's cached code would silently
    keep the old matvec. Keying the whole cache by the sources of all kernels makes any kernel change (or a
    pocketinfer upgrade) start from a fresh cache. NUMBA_CACHE_DIR, if set, is the parent directory."""
    here = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.sha1()
    for name in sorted(os.listdir(here)):
        if name.endswith(".py"):
            with open(os.path.join(here, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    home = os.environ.get("POCKETINFER_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "pocketinfer")
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(home, "numba")
    return os.path.join(base, "kernels-" + h.hexdigest()[:16])


if NUMBA:
    # Small row helpers are inlined into their callers' loops (jit(inline=True), overloads with
    # inline="always"): a call per row passing arrays costs numba's reference counting on each array
    # (atomic updates of counters both threads share), more than the row's arithmetic. numba's own
    # pedantic SSA check then warns about the inlined loops' accumulators ("variable ... is not in
    # scope"), though the numpy-twin tests show the results are right; users should not see it.
    from numba.core.errors import NumbaIRAssumptionWarning

    warnings.filterwarnings("ignore", category=NumbaIRAssumptionWarning)
    # Read by numba when each cache=True function is decorated, so before any kernel module is imported.
    numba.config.CACHE_DIR = kernel_cache_dir()


def jit(parallel: bool = False, inline: bool = False):
    """njit with the project's defaults, or None when numba is off.

    fastmath lets LLVM reorder float sums, which it needs to vectorize the dot-product loops; the numpy
    twin tests use a tolerance for exactly that reason. cache=True keeps the second start-up cheap.
    """
    if not NUMBA:
        return lambda fn: None
    if inline:
        return numba.njit(cache=True, nogil=True, fastmath=True, parallel=parallel, inline="always")
    return numba.njit(cache=True, nogil=True, fastmath=True, parallel=parallel)


def prange(*args):
    return numba.prange(*args) if NUMBA else range(*args)


def pick(numba_fn, numpy_fn):
    """The kernel to run: the numba version when available, else the numpy twin."""
    return numba_fn if numba_fn is not None else numpy_fn


def set_threads(n: int) -> None:
    """Numba's thread count (BLAS threads are set by the engine through threadpoolctl-like env)."""
    if NUMBA:
        numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
