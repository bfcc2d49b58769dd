"""The FFN neuron-bundle file (DESIGN.md, "Flash layout"): format, header and validation at load.

One file per model. Layout:

    [0, 32)            prefix: magic b"PIBNDL01", u64 header JSON length, u64 header region size,
                       u32 crc32 of the header JSON, u32 zero; little-endian
    [32, 32+len)       header JSON (below), then zero padding up to the header region size (4096-aligned)
    per FFN layer      a contiguous, 4096-aligned region of `ffn` records, neurons ordered hot to cold,
                       zero-padded to the next multiple of 4096 (so an aligned read never passes the end)

A record is one neuron's bundle: row j of each of the nine kernel arrays of kernels/sparse_ffn.py,
back to back: gate (w, d, m), up (w, d, m), downT (w, d, m), where downT (ffn, hidden) is the down
projection stored neuron-major (column j of down becomes one row). Which arrays a layout has, their
dtypes and widths are in the header, so the runtime rebuilds the slot arrays the kernel reads without
knowing the source format.

Header JSON:
  {"format": "pocketinfer.bundles", "version": 1, "fingerprint": <model fingerprint or "">,
   "n_layers": L, "hidden": H, "ffn": F, "act": "<hidden_act>", "bits16": 0|1,
   "down_format": "i8"|"q4"|"f32"|"same",
   "fields": [{"name": "gw", "dtype": "uint8", "cols": 288}, ...nine entries],
   "record_bytes": R,
   "layers": [{"offset": o, "bytes": F*R, "order": <base64 of (F,) int32 LE: neuron id at each position>,
               "crc32": crc of the F*R record bytes,
               "dscale": <base64 of (H,) float32 LE: downT's per-hidden output scale>}, ...],
   "file_bytes": total size}

Load checks everything that can be checked without reading the records: the prefix, the header's
crc32, the version, that the file is exactly `file_bytes` long (a truncated copy fails here), that
every region is aligned, inside the file and F*R long, that each order is a permutation, and (given the
plan's) the model fingerprint and shapes. The per-layer crc32 is checked by `verify()` (reads the file).
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError

MAGIC = b"PIBNDL01"
FORMAT = "pocketinfer.bundles"
VERSION = 1
ALIGN = 4096
PREFIX = struct.Struct("<8sQQII")
FIELD_NAMES = ("gw", "gd", "gm", "uw", "ud", "um", "dw", "dd", "dm")
_DTYPES = {"float32", "uint16", "uint8", "int8", "uint32", "uint64"}


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def record_dtype(fields: list[dict]) -> np.dtype:
    """The numpy structured dtype of one record: each field a (cols,) sub-array, packed (no padding)."""
    return np.dtype([(f["name"], np.dtype(f["dtype"]), (int(f["cols"]),)) for f in fields])


def encode_order(order: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(order, dtype="<i4").tobytes()).decode("ascii")


def encode_f32(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def decode_order(text: str, ffn: int) -> np.ndarray:
    """(ffn,) int32: the neuron id stored at each position (hot to cold)."""
    return np.frombuffer(base64.b64decode(text.encode("ascii")), dtype="<i4").astype(np.int32)


def pack_prefix(header_json: bytes, region: int) -> bytes:
    return PREFIX.pack(MAGIC, len(header_json), region, zlib.crc32(header_json), 0)


@dataclass(frozen=True)
class BundleLayer:
    offset: int              # byte offset of the layer region, 4096-aligned
    nbytes: int              # ffn * record_bytes (the padding after it is not counted)
    order: np.ndarray        # (ffn,) int32 neuron id at each position, hot to cold
    inverse: np.ndarray      # (ffn,) int32 position of each neuron id
    crc32: int
    dscale: np.ndarray       # (hidden,) f32 output scale of the downT rows (engine.model.layout.transpose_down)


@dataclass(frozen=True)
class BundleFile:
    path: Path
    header: dict
    fields: list[dict]
    dtype: np.dtype          # one record
    record_bytes: int
    layers: list[BundleLayer]
    bits16: int

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden(self) -> int:
        return int(self.header["hidden"])

    @property
    def ffn(self) -> int:
        return int(self.header["ffn"])

    def field_range(self, names: tuple[str, ...]) -> tuple[int, int]:
        """(start, end) byte range inside a record covering the named consecutive fields."""
        off, start, end = 0, None, None
        for f in self.fields:
            size = np.dtype(f["dtype"]).itemsize * int(f["cols"])
            if f["name"] in names:
                start = off if start is None else start
                end = off + size
            off += size
        assert start is not None, names
        return start, end

    def verify(self) -> None:
        """Check every layer's crc32 (reads the whole file once, buffered)."""
        with open(self.path, "rb") as f:
            for i, layer in enumerate(self.layers):
                f.seek(layer.offset)
                crc, left = 0, layer.nbytes
                while left:
                    chunk = f.read(min(left, 8 << 20))
                    if not chunk:
                        raise ModelFormatError(f"{self.path}: layer {i} is cut short; re-run `pocketinfer plan`")
                    crc = zlib.crc32(chunk, crc)
                    left -= len(chunk)
                if crc != layer.crc32:
                    raise ModelFormatError(f"{self.path}: layer {i} fails its crc32 check (corrupt bundle file); "
                                           "re-run `pocketinfer plan`")


def open_bundles(path: str | os.PathLike, *, fingerprint: str | None = None, n_layers: int | None = None,
                 hidden: int | None = None, ffn: int | None = None) -> BundleFile:
    """Read and validate the header (module docstring); ModelFormatError with one line on any mismatch."""
    path = Path(path)
    redo = "re-run `pocketinfer plan`"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(PREFIX.size)
            if len(prefix) < PREFIX.size:
                raise ModelFormatError(f"{path}: {size} bytes, too short for a bundle file header; {redo}")
            magic, hlen, region, crc, _ = PREFIX.unpack(prefix)
            if magic != MAGIC:
                raise ModelFormatError(f"{path}: not a pocketinfer bundle file (magic {magic!r}); {redo}")
            if PREFIX.size + hlen > region or region % ALIGN or region > size:
                raise ModelFormatError(f"{path}: header of {hlen} bytes does not fit its region of {region} bytes "
                                       f"in a {size}-byte file (truncated or corrupt); {redo}")
            raw = f.read(hlen)
    except OSError as e:
        raise ModelFormatError(f"{path}: cannot read the bundle file ({e.strerror or e}); {redo}") from None
    if len(raw) != hlen or zlib.crc32(raw) != crc:
        raise ModelFormatError(f"{path}: the bundle header fails its crc32 check (corrupt file); {redo}")
    try:
        h = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: unreadable bundle header ({e}); {redo}") from None
    if h.get("format") != FORMAT or h.get("version") != VERSION:
        raise ModelFormatError(f"{path}: bundle format {h.get('format')!r} version {h.get('version')!r}, this "
                               f"engine reads {FORMAT} version {VERSION}; {redo}")
    if h["file_bytes"] != size:
        raise ModelFormatError(f"{path}: the file is {size} bytes but its header says {h['file_bytes']} "
                               f"({'truncated' if size < h['file_bytes'] else 'extra bytes'}); {redo}")
    want = {"fingerprint": fingerprint, "n_layers": n_layers, "hidden": hidden, "ffn": ffn}
    for key, value in want.items():
        if value is not None and h.get(key) != value:
            raise ModelFormatError(f"{path}: bundle {key} {str(h.get(key))[:16]!r} does not match the model's "
                                   f"{str(value)[:16]!r}: the bundle file belongs to another model; {redo}")
    fields = h["fields"]
    if [f["name"] for f in fields] != list(FIELD_NAMES) or any(f["dtype"] not in _DTYPES for f in fields):
        raise ModelFormatError(f"{path}: unexpected bundle record fields {[f['name'] for f in fields]}; {redo}")
    dtype = record_dtype(fields)
    if dtype.itemsize != h["record_bytes"]:
        raise ModelFormatError(f"{path}: record fields add up to {dtype.itemsize} bytes, header says "
                               f"{h['record_bytes']}; {redo}")
    F = int(h["ffn"])
    layers, end_prev = [], region
    for i, lay in enumerate(h["layers"]):
        off, nbytes = int(lay["offset"]), int(lay["bytes"])
        if off % ALIGN or off < end_prev or nbytes != F * dtype.itemsize or off + align_up(nbytes) > size:
            raise ModelFormatError(f"{path}: layer {i} region [{off}, {off + nbytes}) is misaligned, overlapping, "
                                   f"of the wrong size or past the end of the {size}-byte file; {redo}")
        order = decode_order(lay["order"], F)
        inverse = np.full(F, -1, dtype=np.int32)
        if len(order) == F and order.min(initial=0) >= 0 and order.max(initial=0) < F:
            inverse[order] = np.arange(F, dtype=np.int32)
        if len(order) != F or (inverse < 0).any():
            raise ModelFormatError(f"{path}: layer {i}'s neuron order is not a permutation of {F} neurons; {redo}")
        dscale = np.frombuffer(base64.b64decode(lay["dscale"].encode("ascii")), dtype="<f4").astype(np.float32)
        if len(dscale) != int(h["hidden"]):
            raise ModelFormatError(f"{path}: layer {i}'s down scale has {len(dscale)} values, not hidden={h['hidden']}; {redo}")
        layers.append(BundleLayer(off, nbytes, order, inverse, int(lay["crc32"]), dscale))
        end_prev = off + align_up(nbytes)
    if len(layers) != h["n_layers"]:
        raise ModelFormatError(f"{path}: header lists {len(layers)} layers, expects {h['n_layers']}; {redo}")
    return BundleFile(path, h, fields, dtype, dtype.itemsize, layers, int(h.get("bits16", 0)))
