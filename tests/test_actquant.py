"""ggml-style activation rounding (kernels/actquant.py): numba against the numpy twin, and the rules."""

import numpy as np
import pytest

from kernels import actquant as aq

KINDS = [aq.Q8_0, aq.Q8_1, aq.Q8_K, aq.F16, aq.BF16]


def _x(n, cols, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, cols)) * rng.uniform(0.01, 20)).astype(np.float32)
    x[0, :32] = 0.0                       # an all-zero block
    if cols >= 64:
        x[-1, 32:64] = -3.5               # a constant negative block
    return x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 256), (3, 512), (5, 1536)])
def test_selected_kernel_equals_numpy_twin(kind, shape):
    x = _x(*shape)
    a = aq.quantize_activations(x, kind, np.empty_like(x))
    b = aq.quantize_activations_numpy(x, kind, np.empty_like(x))
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind,block", [(aq.Q8_0, 32), (aq.Q8_K, 256)])
def test_block_rounding_rules(kind, block):
    x = _x(4, 512, seed=3)
    y = aq.quantize_activations_numpy(x, kind, np.empty_like(x))
    xb, yb = x.reshape(4, -1, block), y.reshape(4, -1, block)
    amax = np.abs(xb).max(axis=2, keepdims=True)
    step = amax / 127
    # Half a step of rounding, plus Q8_0's fp16 scale error of up to 127 * 2^-11 of a step.
    assert np.all(np.abs(yb - xb) <= step * (0.5 + 127 * 2.0**-11) * 1.0001 + 1e-30)
    assert np.all(y.reshape(4, -1, block)[amax[..., 0] == 0] == 0)
    levels = yb / np.where(step > 0, step, 1)
    assert np.abs(levels).max() <= 127.5


def test_q8_1_block_sums_are_fp16_rounded():
    x = _x(2, 256, seed=5)
    s = aq.q8_1_block_sums(x)
    assert s.shape == (2, 8)
    assert np.array_equal(s, s.astype(np.float16).astype(np.float32))
    y = aq.quantize_activations_numpy(x, aq.Q8_1, np.empty_like(x)).reshape(2, 8, 32).sum(axis=2)
    assert np.allclose(s, y, rtol=5e-3, atol=1e-3)


def test_half_precisions_round_to_nearest_even():
    x = np.array([[1.0 + 2**-11, 1.0 + 3 * 2**-11, -65504.0, 1e-8]], dtype=np.float32)
    f16 = aq.quantize_activations_numpy(x, aq.F16, np.empty_like(x))
    assert f16[0, 0] == 1.0 and f16[0, 1] == 1.0 + 2**-9 and f16[0, 2] == -65504.0
    b = np.array([[1.0 + 2**-8, 1.0 + 3 * 2**-8]], dtype=np.float32)
    bf = aq.quantize_activations_numpy(b, aq.BF16, np.empty_like(b))
    assert bf[0, 0] == 1.0 and bf[0, 1] == 1.0 + 2**-6
