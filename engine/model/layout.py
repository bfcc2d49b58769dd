"""The one module that arranges a model's weights for the executors chosen at load: everything that
rewrites LayerWeights or builds a second layout of them. `fuse` stacks q|k|v and gate|up, `stack_layers`
fuses and stacks the layers for the one-region decode, `transpose_down` and `sparse_arrays` build the neuron-major
down and the neuron records of sparse layers, `to_columns` stores the matrices of input-sparse groups column by
column. engine/executors/choose.py calls them for the executors it
chose, for a loaded model and for its miniature (engine/model/miniature.py) alike, so that the warm-up
compiles exactly the layouts the model will run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError
from engine.memory import trim_heap
from engine.model.weights import (BF16Weight, F16Weight, F32Weight, I8Weight, Q4CWeight, Q4Weight, Q5Weight,
                                  Q6Weight, S24Weight, Weight)
from kernels import dequant, input_sparse
from kernels.neuron_records import pack

FUSED = (("wqkv", ("wq", "wk", "wv")), ("w_gate_up", ("w_gate", "w_up")))
# a layer's matrix groups, each as the weight it runs as once fused and the weights that one stacks, in
# the order of kernels/decode_token.py's steps and of engine/executors/input_sparse.GROUPS (qkv, o,
# gate_up, down)
MATRIX_GROUPS = (("wqkv", ("wq", "wk", "wv")), ("wo", ("wo",)), ("w_gate_up", ("w_gate", "w_up")),
                     ("w_down", ("w_down",)))
DOWN_FORMATS = ("auto", "i8", "q4", "f32")
_TILE_ROWS = 256                            # rows of down dequantized at a time while transposing


# ---------------------------------------------------------------- fused rows and layer stacks

def fuse(lw) -> None:
    """Stack wq|wk|wv and w_gate|w_up where their layouts match (module docstring)."""
    for fused_name, names in FUSED:
        parts = [getattr(lw, n) for n in names]
        if any(w is None for w in parts) or getattr(lw, fused_name) is not None:   # left on flash, or fused in the file
            continue
        fused = concat_rows(parts)
        if fused is not None:
            setattr(lw, fused_name, fused)
            _split_views(lw, fused_name, names)


def match_fused_layouts(lw) -> None:
    """Where the parts of q|k|v or gate|up differ in layout but each can run in the one-region decode
    (a Q4_K_M file's Q4_K q and k beside a Q6_K v, a Q5_0 q beside a Q8_0 v), turn them all into the
    32-block I8 layout, value for value, so that they fuse: the one-region decode runs fused matrices
    only. It costs the widening of the narrower parts (int8 where they held 4 or 5 bits)."""
    for fused_name, names in FUSED:
        parts = [getattr(lw, n) for n in names]
        if any(w is None for w in parts) or getattr(lw, fused_name) is not None:
            continue
        if not all(_one_region_weight(w) for w in parts) or _same_arrays(parts) \
                or any(isinstance(w, S24Weight) for w in parts):       # 2:4 groups are pruned whole, one form
            continue
        d_dtype = np.uint16 if all(w.d.dtype == np.uint16 for w in parts) else np.float32
        with_m = any(w.m.shape[1] for w in parts)
        m_dtype = np.uint16 if all(w.m.dtype == np.uint16 for w in parts) else np.float32
        for n, w in zip(names, parts):
            setattr(lw, n, _as_i8(w, d_dtype, with_m, m_dtype))


def _same_arrays(weights: list[Weight]) -> bool:
    """Same layout, and arrays of the same row shapes and dtypes: what np.concatenate can stack."""
    first = weights[0]
    tails = {tuple((a.shape[1:], a.dtype) for a in w._arrays()) for w in weights}
    return all(type(w) is type(first) for w in weights) and len(tails) == 1


def _as_i8(w, d_dtype, with_m: bool, m_dtype) -> I8Weight:
    """A Q4, Q5 or 32-block I8 weight as a 32-block I8 one with the same values: scales as d_dtype (f16
    bits widen to float32 exactly), mins as m_dtype, zeros where it has none and with_m asks for them.
    A Q6 weight's two scales per block merge into one (_merged_q6)."""
    rows, nb = w.d.shape
    if isinstance(w, Q6Weight):
        q, d = _merged_q6(w)
        return I8Weight(q, d, np.zeros((rows, nb if with_m else 0), m_dtype))
    if isinstance(w, I8Weight):
        q, offset = w.q, 0
    else:
        if isinstance(w, Q4Weight):
            values, offset = dequant.nibble_values_numpy(w.qs.reshape(rows, nb, 16)), 8   # (rows, nb, 32)
        else:
            values, offset = dequant.q5_values_numpy(w.qs, nb), 16
        if w.m.shape[1]:
            offset = 0
        q = (values.astype(np.int16) - offset).astype(np.int8).reshape(rows, 32 * nb)

    def scales(a, dtype):
        if a.dtype == dtype:
            return a
        return dequant.scales_f32_numpy(a).astype(np.float32)

    d = scales(w.d, d_dtype)
    if w.m.shape[1]:
        m = scales(w.m, m_dtype)
    else:
        m = np.zeros((rows, nb if with_m else 0), m_dtype)        # zero bits are +0.0 in f16 too
    return I8Weight(np.ascontiguousarray(q), d, m)


def _merged_q6(w: Q6Weight) -> tuple[np.ndarray, np.ndarray]:
    """A Q6 weight as q (rows, cols) int8 and d (rows, cols/32) f32 in blocks of 32: the block's scale is
    S/3, S the larger |scale| of its two halves, and q becomes round((q - 32) * scale / (S/3)), within +-96.
    The half with the larger scale stays exact; the other is rounded to a step of S/3, a third of its
    6-bit step."""
    rows, nb = w.d.shape
    ds = dequant.q6_scales_numpy(w.d)                                  # (rows, nb, 2) f32
    d = np.abs(ds).max(axis=2) / np.float32(3)                         # (rows, nb) f32
    factor = ds / np.where(d > 0, d, np.float32(1))[:, :, None]        # (rows, nb, 2), within +-3
    v = (dequant.q6_values_numpy(w.qs, nb).astype(np.float32) - 32).reshape(rows, nb, 2, 16) * factor[..., None]
    return np.rint(v).astype(np.int8).reshape(rows, 32 * nb), d.astype(np.float32)


def concat_rows(weights: list[Weight]) -> Weight | None:
    """One weight holding the rows of all `weights`, or None when their layouts differ.

    Decode runs q/k/v (and gate/up) as one matvec over the stacked rows: one parallel kernel launch
    instead of three (a few microseconds each, DESIGN.md), and longer row loops for each thread."""
    first = weights[0]
    parts = [w._arrays() for w in weights]
    if any(type(w) is not type(first) for w in weights):
        return None
    # Same layout also means the same number of scale blocks per row (I8's B = 16 or 32) and the same
    # scale dtype (float32, or f16 bits), else np.concatenate would silently convert.
    if any(tuple((a.shape[1:], a.dtype) for a in p) != tuple((a.shape[1:], a.dtype) for a in parts[0]) for p in parts):
        return None
    return type(first)(*[np.concatenate(arrs) for arrs in zip(*parts)])


def to_columns(layers, thresholds) -> None:
    """For every layer's group with a threshold above 0 (thresholds (n_layers, 4)), store its weight in the
    Q4C layout (kernels/layouts.md) when it is a Q4 weight of a shape the layout takes, in place: q|k|v and
    gate|up fused first, then converted whole, their separate weights set to None (the Q4C layout has no
    row views). Other layouts stay as they are (engine/executors/input_sparse_decode.py masks their input)."""
    for lw, row in zip(layers, thresholds):
        fuse(lw)
        for (name, parts), thr in zip(MATRIX_GROUPS, row):
            w = getattr(lw, name)
            if thr <= 0 or not isinstance(w, Q4Weight) or not input_sparse.fits(*w.shape):
                continue
            setattr(lw, name, Q4CWeight.from_q4(w))
            for p in parts:
                if p != name:                            # the row views of a fused weight
                    setattr(lw, p, None)


def _split_views(lw, fused_name: str, names: tuple[str, ...]) -> None:
    """The separate weights `names` as row views of the fused one, in order."""
    fused, r0 = getattr(lw, fused_name), 0
    for n in names:
        rows = getattr(lw, n).shape[0]
        setattr(lw, n, fused.row_slice(r0, r0 + rows))
        r0 += rows


def _one_region_weight(w) -> bool:
    return isinstance(w, (Q4Weight, Q5Weight, Q6Weight, S24Weight)) or (isinstance(w, I8Weight) and w.q.shape[1] == 32 * w.d.shape[1])


def _stack_signature(lw) -> list | None:
    """Per fused one-region matrix, the (rows, ...) shape and dtype of each of its arrays; None when
    kernels/decode_token.py cannot run the layer (a layout other than Q4, Q5, Q6 or 32-block I8, parts of a fused
    matrix in different layouts, or biases). Shapes only: it keeps no reference to the weights."""
    if any(b is not None for b in (lw.bq, lw.bk, lw.bv, lw.bo)):
        return None
    sig = []
    for _, names in MATRIX_GROUPS:
        parts = [getattr(lw, n) for n in names]
        if not all(_one_region_weight(w) and type(w) is type(parts[0]) for w in parts):
            return None
        tails = {tuple((a.shape[1:], a.dtype) for a in w._arrays()) for w in parts}
        if len(tails) != 1:
            return None
        rows = sum(w.shape[0] for w in parts)
        sig.append([((rows,) + tail, dtype) for tail, dtype in tails.pop()])
    return sig


VARIANTS = 2      # layouts a one-region group may mix across layers (a Q4_K_M file's Q4_K and Q6_K downs)
# the norm vectors kernels/decode_token.py reads, in its order
ONE_REGION_NORMS = ("attn_norm", "ffn_norm", "q_norm", "k_norm", "post_attn_norm", "post_ffn_norm")


def _variants(sigs: list) -> list[list] | None:
    """Per one-region group, the distinct signatures (of `_stack_signature`, one per layer) in order of
    first appearance; None when a layer cannot run in the one-region decode or a group mixes more than
    VARIANTS layouts."""
    if any(s is None for s in sigs):
        return None
    out = []
    for g in range(len(MATRIX_GROUPS)):
        distinct = []
        for s in sigs:
            if s[g] not in distinct:
                distinct.append(s[g])
        if len(distinct) > VARIANTS:
            return None
        out.append(distinct)
    return out


def stackable(layers) -> bool:
    """Whether the one-region decode (kernels/decode_token.py) can run every layer: Q4, Q5, Q6, 32-block I8 or 2:4
    matrices, no biases, the same shapes in every layer, at most VARIANTS layouts per matrix group."""
    return _variants([_stack_signature(lw) for lw in layers]) is not None


@dataclass
class OneRegionStacks:
    """The layers' weights as kernels/decode_token.py reads them, each field stacked over layers:
    - norms: attn_norm, ffn_norm (L, hidden) f32; q_norm, k_norm (L, head_dim) f32, or (L, 0) when the
      model has no q/k norms; post_attn_norm, post_ffn_norm (L, hidden) f32, or (L, 0);
    - groups: per group of MATRIX_GROUPS, the arrays (qs or q, d, m) of its first layout stacked over
      the layers that have it, then those of its second layout (empty (0, ...) copies of the first's when
      every layer has one layout), six arrays per group;
    - where (L, groups) int64: layer i's slot in its group's first-layout stacks, or -1 - its slot in the
      second-layout ones."""
    norms: tuple
    groups: tuple
    where: np.ndarray

    def arrays(self) -> tuple[np.ndarray, ...]:
        """Every array, in decode_token's argument order."""
        return (*self.norms, *(a for g in self.groups for a in g), self.where)


def stack_layers(layers) -> OneRegionStacks:
    """Fuses and stacks in one pass (the layers pass `stackable`): every layer's norms and arrays of q|k|v,
    o, gate|up and down stacked per field and layout, the layers' weights turned into views of them.
    Arrays passed one by one would cost ~450 unboxings per token, numba's typed lists ~50 MiB of compiler
    memory at load. Each source matrix is copied once, into its place in the stack, and dropped right
    after, so loading peaks one matrix above the model, not a layer."""
    L = len(layers)
    norms = tuple(_stack_vectors(layers, f) for f in ONE_REGION_NORMS)
    sigs = [_stack_signature(lw) for lw in layers]
    variants = _variants(sigs)
    where = np.empty((L, len(MATRIX_GROUPS)), np.int64)
    groups = []
    for g, distinct in enumerate(variants):
        counts = [0] * len(distinct)
        for i, s in enumerate(sigs):
            v = distinct.index(s[g])
            where[i, g] = counts[v] if v == 0 else -1 - counts[v]
            counts[v] += 1
        stacks = [[np.empty((n,) + shape, dtype) for shape, dtype in sig] for sig, n in zip(distinct, counts)]
        if len(stacks) == 1:
            stacks.append([a[:0] for a in stacks[0]])
        groups.append(stacks)
    for i, lw in enumerate(layers):
        for f, stack in zip(ONE_REGION_NORMS, norms):
            if getattr(lw, f) is not None:
                setattr(lw, f, stack[i])
        for (fused_name, names), stacks, w in zip(MATRIX_GROUPS, groups, where[i]):
            arrays, slot = (stacks[0], w) if w >= 0 else (stacks[1], -1 - w)
            kind, r0, bounds = type(getattr(lw, names[0])), 0, []
            for n in names:
                rows = getattr(lw, n).shape[0]
                for s, a in zip(arrays, getattr(lw, n)._arrays()):
                    s[slot, r0:r0 + rows] = a
                setattr(lw, n, None)          # the last reference to the source (or its view of a fused copy)
                bounds.append((n, r0, r0 + rows))
                r0 += rows
            fused = kind(*[s[slot] for s in arrays])
            setattr(lw, fused_name, fused)
            for n, a, b in bounds:
                setattr(lw, n, fused if n == fused_name else fused.row_slice(a, b))
            trim_heap()     # glibc keeps freed blocks of these sizes on its heap: give them back now
    return OneRegionStacks(norms, tuple(tuple(stacks[0]) + tuple(stacks[1]) for stacks in groups), where)


def _stack_vectors(layers, field: str) -> np.ndarray:
    """(L, n) f32 of every layer's vector `field`, or (L, 0) when the layers have none."""
    if getattr(layers[0], field) is None:
        return np.empty((len(layers), 0), np.float32)
    return np.stack([getattr(lw, field) for lw in layers])


# ---------------------------------------------------------------- sparse decode: downT and neuron records

def kernel_arrays(w: Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A weight's arrays as kernels/sparse_ffn.py takes them, (w, d, m), and the bits16 flag (1 = BF16,
    0 = F16, -1 = not 16-bit)."""
    if isinstance(w, (Q4Weight, Q5Weight, Q6Weight, I8Weight)):
        return (*w._arrays(), -1)
    if not isinstance(w, (F32Weight, F16Weight, BF16Weight)):
        raise ConfigError(f"sparse decode has no kernel for weight layout {type(w).__name__}")
    e = np.zeros((w.shape[0], 0), np.float32)
    if isinstance(w, F32Weight):
        return w.w, e, e, -1
    return w.bits, e, e, int(isinstance(w, BF16Weight))


def bits16_flag(*flags: int) -> int:
    """The one 16-bit float kind of an FFN's arrays (0 when none is 16-bit)."""
    kinds = {f for f in flags if f >= 0}
    if len(kinds) > 1:
        raise ConfigError("sparse decode cannot mix F16 and BF16 weights in one FFN layer; convert the model "
                          "to one 16-bit format")
    return kinds.pop() if kinds else 0
def quantize_i8(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a (rows, cols) f32, cols % 32 == 0 -> q (rows, cols) int8, d (rows, cols/32) uint16 f16 bits:
    value = d*q with d = max|block|/127 (Q8_0's rule, the scale rounded to f16 before dividing)."""
    rows, cols = a.shape
    blocks = a.reshape(rows, cols // 32, 32)
    d = (np.abs(blocks).max(axis=2) / 127.0).astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(d.shape, np.float32), where=d != 0)
    q = np.clip(np.rint(blocks * inv[:, :, None]), -127, 127).astype(np.int8).reshape(rows, cols)
    return q, d.view(np.uint16)


def quantize_q4(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """a (rows, cols) f32 -> Q4_1-style qs (rows, cols/2) uint8 in GGUF nibble order, d and m
    (rows, cols/32) uint16 f16 bits: value = d*q + m, q in 0..15 (kernels/layouts.md)."""
    rows, cols = a.shape
    blocks = a.reshape(rows, cols // 32, 32)
    lo, hi = blocks.min(axis=2), blocks.max(axis=2)
    d = ((hi - lo) / 15.0).astype(np.float16)
    m = lo.astype(np.float16)
    inv = np.divide(1.0, d.astype(np.float32), out=np.zeros(d.shape, np.float32), where=d != 0)
    q = np.clip(np.rint((blocks - m.astype(np.float32)[:, :, None]) * inv[:, :, None]), 0, 15).astype(np.uint8)
    qs = dequant.nibble_bytes_numpy(q).reshape(rows, cols // 2)
    return qs, d.view(np.uint16), m.view(np.uint16)


def transpose_down(down: Weight, down_format: str = "auto") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """down (hidden, ffn) -> the kernel arrays of downT (ffn, hidden), its per-hidden-dimension output
    scale (hidden,) f32 and its bits16 flag (module docstring). Quantized formats are built one tile of
    down's rows at a time (whole 32-blocks along hidden), so no full float32 copy ever exists; each
    hidden dimension is divided by its largest |value| before quantizing (kernels/sparse_ffn.py)."""
    if down_format not in DOWN_FORMATS:
        raise ConfigError(f"down_format {down_format!r} is not one of {', '.join(DOWN_FORMATS)}")
    hidden, ffn = down.shape
    ones = np.ones(hidden, np.float32)
    if isinstance(down, F32Weight) or (down_format == "f32"):
        t = np.ascontiguousarray(down.w.T if isinstance(down, F32Weight) else down.to_float32().T)
        e = np.zeros((ffn, 0), np.float32)
        return t, e, e, ones, -1
    if isinstance(down, (F16Weight, BF16Weight)):
        e = np.zeros((ffn, 0), np.float32)
        return np.ascontiguousarray(down.bits.T), e, e, ones, int(isinstance(down, BF16Weight))
    fmt = "i8" if down_format == "auto" else down_format
    if hidden % 32:
        raise ConfigError(f"hidden size {hidden} is not a multiple of 32: use down_format='f32'")
    q = np.empty((ffn, hidden if fmt == "i8" else hidden // 2), np.int8 if fmt == "i8" else np.uint8)
    d = np.empty((ffn, hidden // 32), np.uint16)
    m = np.empty((ffn, hidden // 32 if fmt == "q4" else 0), np.uint16)
    scale = np.empty(hidden, np.float32)                              # (hidden,) f32
    tile = np.empty((_TILE_ROWS, ffn), np.float32)                   # (rows of down, ffn) f32
    for r0 in range(0, hidden, _TILE_ROWS):
        r1 = min(hidden, r0 + _TILE_ROWS)
        rows = down.dequantize(r0, r1, tile[: r1 - r0])
        s = np.abs(rows).max(axis=1)
        s[s == 0] = 1.0
        scale[r0:r1] = s
        cols = np.ascontiguousarray((rows / s[:, None]).T)           # (ffn, r1-r0) f32
        b0, b1 = r0 // 32, r1 // 32
        if fmt == "i8":
            q[:, r0:r1], d[:, b0:b1] = quantize_i8(cols)
        else:
            q[:, r0 // 2:r1 // 2], d[:, b0:b1], m[:, b0:b1] = quantize_q4(cols)
    return q, d, m, scale, -1



@dataclass
class SparseArrays:
    """What a sparse layer's kernel reads: kernels/sparse_ffn.sparse_ffn's weight arguments."""
    args: tuple                     # (gw, gd, gm, uw, ud, um, dw, dd, dm, dscale (hidden,) f32, bits16)
    records: np.ndarray | None      # (ffn, R) uint8 neuron records the arrays are views of, or None
    extra_bytes: int                # memory beyond the model's own weights: downT (and copied rows)


def sparse_arrays(lw, with_gate: bool, down_format: str = "auto", records: str = "move") -> SparseArrays:
    """The kernel arrays of a sparse layer: its gate and up as they are, downT (transpose_down) and,
    for the Q4 and I8 layouts with records != "off", all three in neuron records.
    with_gate=False leaves gate out of the records (relu-exact reads it densely, as one matvec).
    records: "move" makes the layer's gate and up views of the records and drops its fused gate|up
    (the records then cost no memory beyond downT); "copy" leaves the layer untouched (the records
    are a copy, for measuring sparse decode beside the real dense path); "off" keeps separate arrays."""
    gw, gd, gm, gf = kernel_arrays(lw.w_gate)
    uw, ud, um, uf = kernel_arrays(lw.w_up)
    dw, dd, dm, dscale, df = transpose_down(lw.w_down, down_format)
    bits16 = bits16_flag(gf, uf, df)
    extra = dw.nbytes + dd.nbytes + dm.nbytes + dscale.nbytes
    recordable = type(lw.w_gate) is type(lw.w_up) and isinstance(lw.w_gate, (Q4Weight, Q5Weight, Q6Weight, I8Weight))
    if records == "off" or not recordable:
        return SparseArrays((gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, bits16), None, extra)
    fields = [gw, uw, dw, gd, ud, dd, gm, um, dm] if with_gate else [uw, dw, ud, dd, um, dm]
    model_rows = sum(a.nbytes for a in ((gw, gd, gm, uw, ud, um) if with_gate else (uw, ud, um)))
    rec, views = pack(fields)                                         # (ffn, R) uint8
    if with_gate:
        gw, uw, dw, gd, ud, dd, gm, um, dm = views
    else:
        uw, dw, ud, dd, um, dm = views
    if records == "move":
        g = lw.w_gate
        if with_gate:
            lw.w_gate = type(g)(gw, gd, gm)
        elif lw.w_gate_up is not None:        # gate is a view of the fused gate|up: give it its own rows
            lw.w_gate = type(g)(*[a.copy() for a in g._arrays()])
        lw.w_up = type(lw.w_up)(uw, ud, um)
        lw.w_gate_up = None
    return SparseArrays((gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, bits16), rec,
                        rec.nbytes - model_rows + dscale.nbytes)
