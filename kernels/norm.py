"""RMSNorm (Zhang & Sennrich 2019): y = x / sqrt(mean(x^2) + eps) * w, computed in float32 like HF."""

import numpy as np

from kernels.backend import jit, pick


def rmsnorm_numpy(x, w, eps, out):
    """x (n, dim) f32, w (dim,) f32, eps float -> out (n, dim) f32 (may alias x)."""
    var = np.mean(np.square(x), axis=1, keepdims=True, dtype=np.float32)
    np.multiply(x, (1.0 / np.sqrt(var + np.float32(eps))).astype(np.float32), out=out)
    out *= w
    return out


@jit(parallel=False)  # tiny per-token work: a parallel launch (~3 us) would cost more than it saves
def _rmsnorm_numba(x, w, eps, out):
    n, dim = x.shape
    for i in range(n):
        ss = np.float32(0.0)
        for k in range(dim):
            ss += x[i, k] * x[i, k]
        scale = np.float32(1.0) / np.sqrt(ss / np.float32(dim) + np.float32(eps))
        for k in range(dim):
            out[i, k] = x[i, k] * scale * w[k]
    return out


rmsnorm = pick(_rmsnorm_numba, rmsnorm_numpy)
