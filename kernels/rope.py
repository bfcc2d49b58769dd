"""Rotary position embedding (Su et al. 2021, RoFormer), in Hugging Face's "rotate half" convention.

For each head the first and second halves of the head dimension form the rotated pairs (x1, x2):
    y1 = x1*cos - x2*sin,   y2 = x2*cos + x1*sin.
GGUF files store Q/K rows in the interleaved-pair order instead; the GGUF loader undoes that permutation
at load so this one convention serves every source.
"""

from kernels.backend import jit, pick


def rope_numpy(x, cos, sin, out):
    """x (n, heads, head_dim) f32, cos and sin (n, head_dim/2) f32 -> out (n, heads, head_dim) f32 (may alias x)."""
    half = x.shape[2] // 2
    x1 = x[:, :, :half].copy()
    x2 = x[:, :, half:].copy()
    c = cos[:, None, :]
    s = sin[:, None, :]
    out[:, :, :half] = x1 * c - x2 * s
    out[:, :, half:] = x2 * c + x1 * s
    return out


@jit(inline=True)
def rope_head(x, cos, sin, i, h, out):
    """Head h of row i: out[i, h] = x[i, h] rotated by cos[i], sin[i] (may alias x). Also a work item of
    kernels/decode_token.py."""
    half = x.shape[2] // 2
    for j in range(half):
        a = x[i, h, j]
        b = x[i, h, j + half]
        out[i, h, j] = a * cos[i, j] - b * sin[i, j]
        out[i, h, j + half] = b * cos[i, j] + a * sin[i, j]


@jit(parallel=False)  # tiny per-token work: a parallel launch (~3 us) would cost more than it saves
def _rope_numba(x, cos, sin, out):
    n, heads, hd = x.shape
    for i in range(n):
        for h in range(heads):
            rope_head(x, cos, sin, i, h, out)
    return out


rope = pick(_rope_numba, rope_numpy)
