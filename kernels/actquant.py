"""Activation rounding that reproduces ggml's CPU numerics for GGUF weights.

llama.cpp never multiplies a quantized weight by float32 activations: it first quantizes the
activation row to the weight type's "vec_dot_type" (ggml-cpu type_traits) and dots integers.
Reproducing that rounding is what makes our greedy output equal llama.cpp's token for token; on the
SmolLM2 Q4_1 fixture, exact float32 activations diverge within 5-27 tokens on 3 of 5 prompts.

Each kind returns the activations as the float32 values ggml actually multiplies:
- Q8_0 (for Q4_0, Q5_0, Q8_0) and Q8_1 (for Q4_1, Q5_1): 32-element blocks,
  q = round_half_even(x * 127/amax), value q * fp16(amax/127) (ggml-cpu/arch/x86/quants.c).
  Q8_1 also keeps each block's sum as s = fp16(d * sum(q)), d = amax/127 unrounded, and the weight's
  min term uses that rounded s: `q8_1_block_sums` computes it, engine/weights.py applies it.
- Q8_K (for the K-quants): 256-element blocks, iscale = -127/max with max the signed value of largest
  magnitude, q = min(127, round_half_even(iscale*x)), value q / iscale.
- F16 / BF16 (for F16 / BF16 weights): x rounded to that precision (round to nearest even).
"""

import numpy as np

from kernels.backend import NUMBA, jit


NONE, Q8_0, Q8_K, F16, BF16, Q8_1 = 0, 1, 2, 3, 4, 5


def quantize_activations_numpy(x, kind, out):
    """x (n, cols) f32, kind int -> out (n, cols) f32 holding the rounded values (may alias x)."""
    n, cols = x.shape
    if kind == NONE:
        out[:] = x
    elif kind in (Q8_0, Q8_1):
        xb = x.reshape(n, -1, 32)
        amax = np.abs(xb).max(axis=2, keepdims=True)
        with np.errstate(divide="ignore"):
            mul = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
        d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
        out.reshape(n, -1, 32)[:] = np.round(xb * mul) * d
    elif kind == Q8_K:
        xb = x.reshape(n, -1, 256)
        idx = np.abs(xb).argmax(axis=2)[..., None]
        mx = np.take_along_axis(xb, idx, axis=2)
        with np.errstate(divide="ignore"):
            iscale = np.where(mx != 0, np.float32(-127.0) / mx, np.float32(0.0)).astype(np.float32)
        q = np.minimum(np.round(iscale * xb), 127)
        with np.errstate(divide="ignore"):
            d = np.where(iscale != 0, np.float32(1.0) / iscale, np.float32(0.0)).astype(np.float32)
        out.reshape(n, -1, 256)[:] = q * d
    elif kind == F16:
        out[:] = x.astype(np.float16)
    elif kind == BF16:
        bits = x.view(np.uint32)
        rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) & np.uint32(0xFFFF0000)
        out.view(np.uint32)[:] = np.where(np.isnan(x), bits | np.uint32(0x00400000), rounded) & np.uint32(0xFFFF0000)
    else:
        raise ValueError(f"unknown activation kind {kind}")
    return out


@jit(parallel=False)
def _block_extremes_numba(x, block, amax, signed_max):
    """Per block: the largest magnitude and the signed value that has it (first one on ties)."""
    n, cols = x.shape
    for i in range(n):
        for b in range(cols // block):
            a_best = np.float32(0.0)
            s_best = np.float32(0.0)
            for j in range(b * block, (b + 1) * block):
                a = abs(x[i, j])
                if a > a_best:
                    a_best = a
                    s_best = x[i, j]
            amax[i, b] = a_best
            signed_max[i, b] = s_best


@jit(parallel=False)
def _apply_scales_numba(x, block, mul, d, clip_hi, out):
    """out = min(round_half_even(x * mul), clip_hi) * d, with per-block mul and d."""
    n, cols = x.shape
    for i in range(n):
        for j in range(cols):
            b = j // block
            q = np.round(x[i, j] * mul[i, b])
            if q > clip_hi:
                q = clip_hi
            out[i, j] = np.float32(q) * d[i, b]
    return out


def _quantize_activations_numba(x, kind, out):
    if kind not in (Q8_0, Q8_1, Q8_K):
        return quantize_activations_numpy(x, kind, out)  # elementwise roundings: numpy is already fast
    block = 256 if kind == Q8_K else 32
    n, cols = x.shape
    amax = np.empty((n, cols // block), dtype=np.float32)
    smax = np.empty_like(amax)
    _block_extremes_numba(x, block, amax, smax)
    # The scale roundings are per block (1/32 of the work): numpy does them, numba has no float16.
    with np.errstate(divide="ignore"):
        if kind != Q8_K:
            mul = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
            d = (amax / np.float32(127.0)).astype(np.float16).astype(np.float32)
        else:
            mul = np.where(smax != 0, np.float32(-127.0) / smax, np.float32(0.0)).astype(np.float32)
            d = np.where(mul != 0, np.float32(1.0) / mul, np.float32(0.0)).astype(np.float32)
    return _apply_scales_numba(x, block, mul, d, 127.0, out)


quantize_activations = _quantize_activations_numba if NUMBA else quantize_activations_numpy


def q8_1_block_sums(x):
    """x (n, cols) f32 -> (n, cols/32) f32: Q8_1's per-block s = fp16(d * sum(q)) with d = amax/127."""
    n = x.shape[0]
    xb = x.reshape(n, -1, 32)
    amax = np.abs(xb).max(axis=2)
    with np.errstate(divide="ignore"):
        mul = np.where(amax > 0, np.float32(127.0) / amax, np.float32(0.0)).astype(np.float32)
    q = np.round(xb * mul[:, :, None]).sum(axis=2, dtype=np.float32)
    return ((amax / np.float32(127.0)) * q).astype(np.float16).astype(np.float32)
