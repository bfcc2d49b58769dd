"""Neuron records: the rows one FFN neuron needs at decode (its gate row, up row and transposed down
row, and their scales) side by side in one record, one record per neuron, in neuron order.

Why: the sparse FFN (kernels/sparse_ffn.py) reads, per chosen neuron, one row of each of six arrays
(three weights, three scale arrays) at six unrelated addresses; a core then keeps too few misses in
flight and the hardware prefetchers see no streams. In records, a neuron is one contiguous 8,960-byte
read at Llama-2-7B shapes (Q4_0 gate and up, int8 downT), and neurons next to each other in the
planner's hot-to-cold order are next to each other in memory: runs of active neurons become one
stream (tools/bench_sparse.py measures both layouts side by side).

    records, views = pack(fields)
      fields   list of (rows, k_i) arrays, any dtypes: row r of each is neuron r's part
      records  (rows, R) uint8, R = the fields' row bytes, each field at an offset that is a multiple
               of its item size, R rounded up to 64 (records start on cache lines)
      views    list: field i as a (rows, k_i) view of records with its dtype (numpy strides (R, item),
               numba layout "A": kernels/llvm_ir.rows_array); empty fields (k_i = 0) stay as they are

The kernels take the views where they took the separate arrays, with the same results bit for bit:
only the addresses change. Packing is a numpy copy; `check_rows` (`check_weight_rows` for one weight's
three arrays) is the numba kernels' guard (its
numpy twin is rows_contiguous): numba types a view's layout as "A" whatever its strides, and the
intrinsics' row pointers (kernels/llvm_ir.row_ptr) assume contiguous rows.
"""

import numpy as np

from kernels.backend import jit

LINE = 64          # bytes: the record stride is a multiple of a cache line


def layout(fields) -> tuple[list[int], int]:
    """(byte offset of each field in a record, record bytes) for `fields` as pack() places them."""
    offsets, pos = [], 0
    for f in fields:
        item = f.dtype.itemsize
        pos = -(-pos // item) * item
        offsets.append(pos)
        pos += f.shape[1] * item
    return offsets, max(LINE, -(-pos // LINE) * LINE)


def pack(fields):
    """See the module docstring."""
    rows = fields[0].shape[0]
    for f in fields:
        if f.ndim != 2 or f.shape[0] != rows:
            raise ValueError(f"neuron record fields must be 2-D with {rows} rows, got shape {f.shape}")
    offsets, size = layout(fields)
    records = np.zeros((rows, size), np.uint8)                 # (rows, R) uint8
    views = []
    for f, off in zip(fields, offsets):
        if f.shape[1] == 0:
            views.append(f)
            continue
        nbytes = f.shape[1] * f.dtype.itemsize
        v = records[:, off:off + nbytes].view(f.dtype)          # (rows, k) f.dtype, rows R bytes apart
        v[:] = f
        views.append(v)
    return records, views


def rows_contiguous(a) -> bool:
    """Whether each row of 2-D array a is contiguous (what the kernels' row pointers assume)."""
    return a.ndim == 2 and (a.shape[1] <= 1 or a.strides[1] == a.itemsize)


@jit()
def check_rows(a):
    """Raise ValueError unless each row of 2-D array a is contiguous (rows_contiguous, in numba)."""
    if a.shape[1] > 1 and a.strides[1] != a.itemsize:
        raise ValueError("each row of a weight or scale array must be contiguous (a C array or a neuron-record field)")


@jit()
def check_weight_rows(w, d, m):
    """check_rows on one weight's three arrays (values, scales, mins): the kernels' guard."""
    check_rows(w)
    check_rows(d)
    check_rows(m)
