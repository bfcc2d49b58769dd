"""Scatter neuron bundles from a read buffer into the flash FFN's slot arrays (engine/executors/flash_ffn.py).

A bundle record holds nine fields side by side (gate row, scales, mins; up; down row: see
engine/flash/bundles.py), and the kernels read each field from its own (slots, cols) array. Copying a
landed run field by field through numpy structured views (strided gathers, nine fancy-indexed copies
per run) would take most of a flash-resident decode token's time on SmolLM2. Here one call copies every
record of a run: for each record, each field's bytes are one contiguous memcpy-like loop.

    scatter(src, starts, rows, field_off, field_len, dsts)
      src        (n,) uint8      the read buffer
      starts     (k,) int64      byte offset of each record in src
      rows       (k,) int64      destination slot row of each record
      field_off  (9,) int64      byte offset of each field in a record
      field_len  (9,) int64      its byte length
      dsts       tuple of 9      (slots, field_len[f]) uint8 views of the slot arrays
"""

import numpy as np

from kernels.backend import NUMBA, jit


def scatter_numpy(src, starts, rows, field_off, field_len, dsts):
    for f, dst in enumerate(dsts):
        n = int(field_len[f])
        if n:
            idx = starts[:, None] + int(field_off[f]) + np.arange(n)[None, :]     # (k, n) byte indices
            dst[rows] = src[idx]
    return rows.shape[0]


if NUMBA:
    from numba import types
    from numba.core import cgutils
    from numba.core.extending import intrinsic

    from kernels.llvm_ir import c_array, data, to_i64

    @intrinsic
    def _copy_bytes(typingctx, dst, dst_off, src, src_off, n):
        """memcpy of n bytes from src[src_off:] to dst[dst_off:] (1-D uint8 C arrays): loops and slices
        in numba copy far below memcpy speed (negative-index checks and per-slice array objects keep
        LLVM from recognising a copy)."""
        if not (c_array(dst, 1, types.uint8) and c_array(src, 1, types.uint8)):
            return None

        def codegen(context, builder, sig, args):
            d = data(context, builder, sig.args[0], args[0])
            s_ = data(context, builder, sig.args[2], args[2])
            cgutils.raw_memcpy(builder, builder.gep(d, [to_i64(builder, args[1])]),
                               builder.gep(s_, [to_i64(builder, args[3])]), to_i64(builder, args[4]), 1)
            return context.get_dummy_value()

        return types.void(dst, dst_off, src, src_off, n), codegen

    @jit()
    def _scatter_numba(src, starts, rows, field_off, field_len, dsts):
        for f in range(len(dsts)):
            flat = dsts[f].reshape(-1)
            n = field_len[f]
            o = field_off[f]
            if n:
                for i in range(starts.shape[0]):
                    _copy_bytes(flat, rows[i] * n, src, starts[i] + o, n)
        return rows.shape[0]
else:
    _scatter_numba = None


scatter = _scatter_numba if _scatter_numba is not None else scatter_numpy


def byte_views(arrays) -> tuple:
    """The slot arrays as (slots, cols * itemsize) uint8 views, for scatter's dsts."""
    return tuple(a.view(np.uint8).reshape(a.shape[0], -1) for a in arrays)
