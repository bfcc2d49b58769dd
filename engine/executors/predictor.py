"""Activation predictors: which FFN neurons a token will use, from the FFN input, before computing them.

The format is shared by the planner, which trains predictors (planner/), and the sparse decode executor,
which runs them (engine/); the runtime only ever reads it.

Per layer, a low-rank MLP in the style of Deja Vu (Liu et al., ICML 2023, section 4.1) and PowerInfer
(section 5.1): score = relu(h @ w1 + b1) @ w2 + b2, with h the FFN input after the FFN RMSNorm. Neuron j
is predicted active when score[j] > threshold. Scores are logits of "|act_j| > label threshold", where
act = act_fn(gate) * up is the activation product the down projection reads.

The two matrices are stored int8 with f32 scales: a predictor is read in full every token, and at 90%
sparsity f32 predictors would be a third of what the sparse FFN reads (rank 64 at Llama-2-7B shapes).
w1 has one scale per ROW (per input dimension): the planner folds the input standardization into w1
(w1 / sigma per row), so its rows differ in size by orders of magnitude as h's dimensions do, and one
scale per column would let the largest rows round the others to zero (several times the perplexity
cost, BENCHMARKS.md). w2 has one per column (per neuron scored). The planner quantizes right after training and calibrates the threshold on the
quantized scores, so the threshold fits what runs.

File: predictors.npz (np.savez, no pickles) holding, for each layer i that has a predictor,
  layer{i}.w1 (hidden, rank) int8, layer{i}.w1_scale (hidden,) f32, layer{i}.b1 (rank,) f32,
  layer{i}.w2 (rank, ffn) int8, layer{i}.w2_scale (ffn,) f32, layer{i}.b2 (ffn,) f32
and `meta`, a 0-d str array with JSON: {"schema_version": 2, "hidden": H, "ffn": F,
"layers": {"<i>": {"rank": r, "threshold": t, "label_threshold": l}}}. (Schema 1 stored f32 matrices.)
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError

SCHEMA_VERSION = 2

ARRAYS = ("w1", "w1_scale", "b1", "w2", "w2_scale", "b2")      # the kernel's argument order


def quantize_int8(w: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """w (k, n) f32 -> (q (k, n) int8, scale) with w ~ q * scale, symmetric: one f32 scale per row
    (axis=1, scale (k,)) or per column (axis=0, scale (n,))."""
    scale = (np.abs(w).max(axis=axis) / 127.0).astype(np.float32)
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(w / np.expand_dims(scale, axis)), -127, 127).astype(np.int8)
    return q, scale


@dataclass(frozen=True)
class LayerPredictor:
    w1: np.ndarray          # (hidden, rank) int8
    w1_scale: np.ndarray    # (hidden,) f32: row k of w1 is w1[k] * w1_scale[k]
    b1: np.ndarray          # (rank,) f32
    w2: np.ndarray          # (rank, ffn) int8
    w2_scale: np.ndarray    # (ffn,) f32
    b2: np.ndarray          # (ffn,) f32
    threshold: float        # score above which a neuron is predicted active
    label_threshold: float  # |act| above which a neuron counted as active in training

    @classmethod
    def from_float(cls, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, threshold: float,
                   label_threshold: float) -> "LayerPredictor":
        """From f32 w1 (hidden, rank), b1 (rank,), w2 (rank, ffn), b2 (ffn,): the matrices quantized."""
        q1, s1 = quantize_int8(np.asarray(w1, np.float32), axis=1)
        q2, s2 = quantize_int8(np.asarray(w2, np.float32), axis=0)
        return cls(q1, s1, np.asarray(b1, np.float32), q2, s2, np.asarray(b2, np.float32), threshold, label_threshold)

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    @property
    def arrays(self) -> tuple[np.ndarray, ...]:
        """(w1, w1_scale, b1, w2, w2_scale, b2): kernels.sparse_ffn.predict's first arguments."""
        return tuple(getattr(self, n) for n in ARRAYS)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h (n, hidden) f32 -> (n, ffn) f32 logits, as kernels.sparse_ffn.predict computes them."""
        z = (h * self.w1_scale) @ self.w1.astype(np.float32) + self.b1
        np.maximum(z, 0, out=z)
        return (z @ self.w2.astype(np.float32)) * self.w2_scale + self.b2

    def active(self, h: np.ndarray) -> np.ndarray:
        """h (n, hidden) f32 -> (n, ffn) bool."""
        return self.scores(h) > self.threshold


def save_predictors(path: str | os.PathLike, predictors: dict[int, LayerPredictor], hidden: int, ffn: int) -> None:
    """Write predictors.npz atomically (temporary file in the same directory, then rename)."""
    path = Path(path)
    meta = {"schema_version": SCHEMA_VERSION, "hidden": hidden, "ffn": ffn,
            "layers": {str(i): {"rank": p.rank, "threshold": float(p.threshold),
                                "label_threshold": float(p.label_threshold)} for i, p in sorted(predictors.items())}}
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for i, p in sorted(predictors.items()):
        for name, a in zip(ARRAYS, p.arrays):
            arrays[f"layer{i}.{name}"] = np.ascontiguousarray(a)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def load_predictors(path: str | os.PathLike, hidden: int, ffn: int) -> dict[int, LayerPredictor]:
    """Read predictors.npz; raise ModelFormatError naming the file and field when it does not fit."""
    path = Path(path)
    try:
        data = np.load(path, allow_pickle=False)
        meta = json.loads(str(data["meta"]))
    except (OSError, ValueError, KeyError) as e:
        raise ModelFormatError(f"{path}: not a predictor file ({e}); re-run `pocketinfer plan`") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ModelFormatError(f"{path}: predictor schema_version {meta.get('schema_version')!r}, this "
                               f"engine reads {SCHEMA_VERSION}; re-run `pocketinfer plan`")
    if (meta.get("hidden"), meta.get("ffn")) != (hidden, ffn):
        raise ModelFormatError(f"{path}: predictors for hidden={meta.get('hidden')} ffn={meta.get('ffn')}, "
                               f"the model has hidden={hidden} ffn={ffn}")
    out = {}
    for key, info in meta["layers"].items():
        i = int(key)
        try:
            arrs = {n: data[f"layer{i}.{n}"] for n in ARRAYS}
        except KeyError as e:
            raise ModelFormatError(f"{path}: missing array {e} for layer {i}; re-run `pocketinfer plan`") from None
        r = int(info["rank"])
        want = {"w1": ((hidden, r), np.int8), "w1_scale": ((hidden,), np.float32), "b1": ((r,), np.float32),
                "w2": ((r, ffn), np.int8), "w2_scale": ((ffn,), np.float32), "b2": ((ffn,), np.float32)}
        for n, (shape, dtype) in want.items():
            if arrs[n].shape != shape or arrs[n].dtype != dtype:
                raise ModelFormatError(f"{path}: layer{i}.{n} is {arrs[n].dtype}{arrs[n].shape}, expected "
                                       f"{np.dtype(dtype).name}{shape}")
        out[i] = LayerPredictor(threshold=float(info["threshold"]),
                                label_threshold=float(info["label_threshold"]), **arrs)
    return out
