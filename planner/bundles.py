"""Writes the FFN neuron-bundle file (format: engine/flash/bundles.py) from a loaded model's FFN weights.

Per layer the neurons go hot to cold, in the order the planner's activation frequencies give (the same
order whose first H neurons the solver made hot), so the resident segment is one sequential read at load
and the warm cold neurons sit next to each other, where merged reads pick them up together.

The down projection is stored transposed, through engine.model.layout.transpose_down: F32/F16/BF16 exactly,
quantized sources re-quantized to `down_format` ("i8" by default: int8 with one f16 scale per 32 values;
its perplexity cost: engine/executors/sparse.py).
"""

from __future__ import annotations

import json
import os
import secrets
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from engine.errors import PlanError
from engine.flash.bundles import (
    FIELD_NAMES,
    FORMAT,
    PREFIX,
    VERSION,
    align_up,
    encode_f32,
    encode_order,
    pack_prefix,
    record_dtype,
)
from engine.model.layout import bits16_flag, kernel_arrays, transpose_down


def layer_arrays(lw, down_format: str = "auto") -> tuple[list[np.ndarray], np.ndarray, int]:
    """The nine kernel arrays (each (ffn, cols)) of one layer's bundles, downT's per-hidden output scale
    (hidden,) f32 (engine.model.layout.transpose_down) and the bits16 flag."""
    gw, gd, gm, gf = kernel_arrays(lw.w_gate)
    uw, ud, um, uf = kernel_arrays(lw.w_up)
    dw, dd, dm, dscale, df = transpose_down(lw.w_down, down_format)
    return [gw, gd, gm, uw, ud, um, dw, dd, dm], np.asarray(dscale, np.float32), bits16_flag(gf, uf, df)


def write_bundles(path: str | os.PathLike, layers: list, orders: list[np.ndarray], *, fingerprint: str = "",
                  act: str = "", down_format: str = "auto",
                  progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Write the bundle file for `layers` (LayerWeights) with per-layer neuron orders (ffn,) (hot to
    cold) into `path`, through a temporary file renamed at the end. Returns the header dict."""
    path = Path(path)
    if len(orders) != len(layers):
        raise PlanError(f"{len(orders)} neuron orders for {len(layers)} layers")
    tmp = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        header = _write(tmp, layers, orders, fingerprint, act, down_format, progress)
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return header


def _write(tmp: Path, layers, orders, fingerprint, act, down_format, progress) -> dict:
    first, first_scale, bits16 = layer_arrays(layers[0], down_format)
    ffn, hidden = first[0].shape[0], layers[0].w_down.shape[0]
    fields = [{"name": n, "dtype": a.dtype.name, "cols": int(a.shape[1])} for n, a in zip(FIELD_NAMES, first)]
    dtype = record_dtype(fields)
    nbytes = ffn * dtype.itemsize
    header = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "n_layers": len(layers),
              "hidden": hidden, "ffn": ffn, "act": act, "bits16": bits16,
              "down_format": "same" if first[6].dtype in (np.float32, np.uint16) else first[6].dtype.name,
              "fields": fields, "record_bytes": dtype.itemsize, "layers": []}
    # The header's size is known before the records are written, except for the crc32 values: reserve
    # room for the widest ones (10 digits) and pad the real header with spaces up to it.
    for order in orders:
        header["layers"].append({"offset": 0, "bytes": nbytes, "order": encode_order(order), "crc32": 0xFFFFFFFF,
                                 "dscale": encode_f32(first_scale)})
    region = align_up(PREFIX.size + len(json.dumps(header).encode()) + 64 * len(layers) + 256)
    offsets = [region + i * align_up(nbytes) for i in range(len(layers))]
    with open(tmp, "wb") as f:
        f.write(b"\0" * region)
        for i, (lw, order) in enumerate(zip(layers, orders)):
            arrays, dscale, flag = (first, first_scale, bits16) if i == 0 else layer_arrays(lw, down_format)
            if flag != bits16 or [a.dtype.name for a in arrays] != [fd["dtype"] for fd in fields]:
                raise PlanError(f"layer {i}: FFN weight layout differs from layer 0's; bundles need one layout")
            order = np.asarray(order, dtype=np.int64)
            if sorted(order.tolist()) != list(range(ffn)):
                raise PlanError(f"layer {i}: the neuron order is not a permutation of {ffn} neurons")
            rec = np.empty(ffn, dtype=dtype)                       # (ffn,) records, hot to cold
            for name, a in zip(FIELD_NAMES, arrays):
                rec[name] = a[order]
            raw = rec.tobytes()
            f.write(raw)
            f.write(b"\0" * (align_up(nbytes) - nbytes))
            header["layers"][i].update(offset=offsets[i], crc32=zlib.crc32(raw), dscale=encode_f32(dscale))
            if progress:
                progress("bundle file", i + 1, len(layers))
        header["file_bytes"] = f.tell()
        text = json.dumps(header).encode()
        assert PREFIX.size + len(text) <= region, "header room reserved above"
        f.seek(0)
        f.write(pack_prefix(text, region) + text)
        f.flush()
        os.fsync(f.fileno())
    return header


def hot_to_cold(freq: np.ndarray) -> np.ndarray:
    """(ffn,) activation frequencies -> (ffn,) int32 neuron ids, most frequent first, ties by id (the
    same order planner/pipeline.py uses to pick the hot neurons)."""
    return np.lexsort((np.arange(len(freq)), -np.asarray(freq))).astype(np.int32)

