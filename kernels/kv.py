"""Storage of the KV cache: float32, or IEEE half kept as uint16 bits (numba has no float16 arrays).

Half is what llama.cpp keeps by default, and it halves the cache: at SmolLM2's 4096-token context the
f32 cache is 180 MiB, the half one 90. Kernels read an element with `load(a[...])` and write one with
`a[...] = store(v, a)`; numba picks the conversion from the array's dtype when the kernel compiles, so
one source serves both. The conversions are exact to the nearest half (round to nearest even), one
instruction each where the target has them (x86 F16C, AArch64: kernels/target.NATIVE_HALF), else
integer arithmetic. The numpy twins use `to_storage` and `to_f32`.
"""

import numpy as np

from kernels import target
from kernels.backend import NUMBA, jit
from kernels.dequant import scale_f32

load = scale_f32      # an element as float32: from float32, or from uint16 half bits


def store(v, a):
    """v as the element type of array a: float32, or the uint16 bits of the nearest half."""
    return np.float32(v).astype(np.float16).view(np.uint16) if a.dtype == np.uint16 else np.float32(v)


def to_storage(x: np.ndarray, dtype) -> np.ndarray:
    """x f32 -> the same values in a cache of `dtype` (float32, or uint16 half bits)."""
    return x.astype(np.float16).view(np.uint16) if np.dtype(dtype) == np.uint16 else x


def to_f32(a: np.ndarray) -> np.ndarray:
    """Cache contents as float32 (a view when already float32)."""
    return a.view(np.float16).astype(np.float32) if a.dtype == np.uint16 else a


if NUMBA:
    from llvmlite import ir
    from numba import types
    from numba.core.extending import intrinsic, overload

    def _float_intrinsic(name, ret, emit):
        """An intrinsic of one float argument, taken as float32 (a float64 is rounded first), returning
        `ret`: emit(builder, v) builds the result from the float32 v."""
        def fn(typingctx, x):
            if not isinstance(x, types.Float):
                return None

            def codegen(context, builder, sig, args):
                v = args[0]
                if v.type != ir.FloatType():
                    v = builder.fptrunc(v, ir.FloatType())
                return emit(builder, v)

            return ret(x), codegen
        fn.__name__ = fn.__qualname__ = name
        return intrinsic(fn)

    # The uint32 bit pattern of a float32 (a register bitcast).
    _f32_bits = _float_intrinsic("_f32_bits", types.uint32, lambda b, v: b.bitcast(v, ir.IntType(32)))
    # float32 -> uint16 half bits by LLVM's fptrunc (vcvtps2ph / fcvt): target.NATIVE_HALF targets only.
    _half_bits_hw = _float_intrinsic("_half_bits_hw", types.uint16,
                                     lambda b, v: b.bitcast(b.fptrunc(v, ir.HalfType()), ir.IntType(16)))

    @jit()
    def half_bits_int(x):
        """float32 -> uint16 bits of the nearest half (ties to even), with integer arithmetic: targets
        without a conversion instruction. Overflow gives infinity, NaN stays NaN."""
        u = _f32_bits(np.float32(x))
        sign = np.uint32((u >> 16) & 0x8000)
        a = np.uint32(u & 0x7FFFFFFF)
        if a >= 0x7F800000:                                  # inf, nan
            return np.uint16(sign | 0x7C00 | (0x200 if a > 0x7F800000 else 0))
        if a >= 0x477FF000:                                  # rounds to above the largest half
            return np.uint16(sign | 0x7C00)
        if a < 0x38800000:                                   # below 2**-14: a subnormal half (or 0)
            shift = np.uint32(126 - (a >> 23))               # the half is m * 2**(exponent - 126)
            if shift > 24:
                return np.uint16(sign)
            m = np.uint32((a & 0x7FFFFF) | 0x800000)         # 24-bit significand
            # m / 2**shift, rounded to nearest even (a result of 1024 is the smallest normal: right)
            q = np.uint32(m >> shift)
            rem = np.uint32(m - (q << shift))
            half = np.uint32(1 << (shift - 1))
            if rem > half or (rem == half and (q & 1)):
                q += 1
            return np.uint16(sign | q)
        h = np.uint32((a - 0x38000000) >> 13)                # rebias the exponent 127 -> 15
        rem = np.uint32(a & 0x1FFF)
        if rem > 0x1000 or (rem == 0x1000 and (h & 1)):
            h += 1                                           # a carry into the exponent is right
        return np.uint16(sign | h)

    half_bits = _half_bits_hw if target.NATIVE_HALF else half_bits_int

    @overload(store, jit_options={"fastmath": True})
    def _store_ov(v, a):
        if a.dtype == types.uint16:
            return lambda v, a: half_bits(v)
        return lambda v, a: np.float32(v)
