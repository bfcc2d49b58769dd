"""Activation predictors: which FFN neurons a token will use, from the FFN input, before computing them.

The format is shared by the planner, which trains predictors (planner/), and the sparse decode executor,
which runs them (engine/); the runtime only ever reads it.

Per layer, a low-rank MLP in the style of Deja Vu (Liu et al., ICML 2023, section 4.1) and PowerInfer
(section 5.1): score = relu(h @ w1 + b1) @ w2 + b2, with h the FFN input after the FFN RMSNorm. Neuron j
is predicted active when score[j] > threshold. Scores are logits of "|act_j| > label threshold", where
act = act_fn(gate) * up is the activation product the down projection reads.

File: predictors.npz (np.savez, no pickles) holding, for each layer i that has a predictor,
  layer{i}.w1 (hidden, rank) f32, layer{i}.b1 (rank,) f32, layer{i}.w2 (rank, ffn) f32, layer{i}.b2 (ffn,) f32
and `meta`, a 0-d str array with JSON: {"schema_version": 1, "hidden": H, "ffn": F,
"layers": {"<i>": {"rank": r, "threshold": t, "label_threshold": l}}}.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class LayerPredictor:
    w1: np.ndarray          # (hidden, rank) f32
    b1: np.ndarray          # (rank,) f32
    w2: np.ndarray          # (rank, ffn) f32
    b2: np.ndarray          # (ffn,) f32
    threshold: float        # score above which a neuron is predicted active
    label_threshold: float  # |act| above which a neuron counted as active in training

    @property
    def rank(self) -> int:
        return self.w1.shape[1]

    @property
    def nbytes(self) -> int:
        return self.w1.nbytes + self.b1.nbytes + self.w2.nbytes + self.b2.nbytes

    def scores(self, h: np.ndarray) -> np.ndarray:
        """h (n, hidden) f32 -> (n, ffn) f32 logits."""
        z = h @ self.w1 + self.b1
        np.maximum(z, 0, out=z)
        return z @ self.w2 + self.b2

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
        for name in ("w1", "b1", "w2", "b2"):
            arrays[f"layer{i}.{name}"] = np.ascontiguousarray(getattr(p, name), dtype=np.float32)
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
            arrs = {n: data[f"layer{i}.{n}"] for n in ("w1", "b1", "w2", "b2")}
        except KeyError as e:
            raise ModelFormatError(f"{path}: missing array {e} for layer {i}") from None
        r = int(info["rank"])
        want = {"w1": (hidden, r), "b1": (r,), "w2": (r, ffn), "b2": (ffn,)}
        for n, shape in want.items():
            if arrs[n].shape != shape or arrs[n].dtype != np.float32:
                raise ModelFormatError(f"{path}: layer{i}.{n} is {arrs[n].dtype}{arrs[n].shape}, expected "
                                       f"float32{shape}")
        out[i] = LayerPredictor(threshold=float(info["threshold"]),
                                label_threshold=float(info["label_threshold"]), **arrs)
    return out
