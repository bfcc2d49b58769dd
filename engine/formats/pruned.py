"""A deploy's 2:4-pruned matrices (`pocketinfer prune`, planner/prune.py): plan.json's `sparsity` section,
and the file holding the matrices, which replace the weights file's at load.

plan.json:
  "sparsity": {"pattern": "2:4", "layout": 2, "method": ..., "file": "sparse24.npz",
               "matrices": [{"layer": i, "group": "qkv" | "o" | "gate_up" | "down", "form": F}, ...], ...}
Every matrix of a listed (layer, group) is in the file (a group's matrices share their input, and fuse):
  form "s8" or "s4": layers.<i>.<field>.qs and .d, the 2:4 layouts (kernels/sparse24.py);
  form "f32": layers.<i>.<field>.w, the pruned matrix as float32 with its zeros (float32 models).
<field> is our name (wq, wk, wv, wo, w_gate, w_up, w_down), rows in Hugging Face's order. The loader leaves
those matrices of the weights file unloaded (Plan.unloaded) and puts these in their place. "layout" is
kernels/sparse24.LAYOUT, the version of the byte layouts the file was packed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError
from engine.executors.input_sparse import GROUPS
from engine.model.layout import MATRIX_GROUPS
from engine.model.weights import F32Weight, S24Weight
from kernels import sparse24

FILE = "sparse24.npz"
# per group name (engine/executors/input_sparse.GROUPS), our names of its matrices, in MATRIX_GROUPS' order
GROUP_FIELDS = dict(zip(GROUPS, (names for _, names in MATRIX_GROUPS)))
FORMS = ("s8", "s4", "f32")


@dataclass(frozen=True)
class PrunedPlan:
    file: Path                                   # the matrices (module docstring)
    matrices: tuple[tuple[int, str, str], ...]   # (layer, group, form) of every pruned group

    def names(self) -> set[str]:
        """Our names of the weights the file replaces ("layers.3.w_gate", ...)."""
        return {f"layers.{i}.{f}" for i, g, _ in self.matrices for f in GROUP_FIELDS[g]}


def read_section(plan_path: Path, section, n_layers: int) -> PrunedPlan | None:
    """plan.json's sparsity section checked; None without one."""
    if section is None:
        return None
    where = f"{plan_path}: sparsity"
    if not isinstance(section, dict) or section.get("pattern") != "2:4":
        raise ModelFormatError(f"{where}.pattern must be \"2:4\"; re-run `pocketinfer prune`")
    if section.get("layout") != sparse24.LAYOUT:
        raise ModelFormatError(f"{where}.layout is {section.get('layout')!r}: this pocketinfer reads 2:4 layout "
                               f"{sparse24.LAYOUT}, and the bytes differ; re-run `pocketinfer prune`")
    name = section.get("file")
    if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
        raise ModelFormatError(f"{where}.file is {name!r}, expected a file name inside the deploy; re-run "
                               "`pocketinfer prune`")
    out, seen = [], set()
    for k, m in enumerate(section.get("matrices") or []):
        try:
            layer, group, form = int(m["layer"]), m["group"], m["form"]
        except (KeyError, TypeError, ValueError):
            raise ModelFormatError(f"{where}.matrices[{k}] needs layer, group and form; re-run `pocketinfer prune`") from None
        if not 0 <= layer < n_layers or group not in GROUP_FIELDS or form not in FORMS or (layer, group) in seen:
            raise ModelFormatError(f"{where}.matrices[{k}] is {m!r}: layer 0..{n_layers - 1}, group one of "
                                   f"{', '.join(GROUP_FIELDS)}, form one of {', '.join(FORMS)}, each (layer, group) "
                                   "once; re-run `pocketinfer prune`")
        seen.add((layer, group))
        out.append((layer, group, form))
    path = plan_path.parent / name
    if out and not path.exists():
        raise ModelFormatError(f"{path}: the plan's pruned matrices are missing; re-run `pocketinfer prune`")
    return PrunedPlan(path, tuple(out)) if out else None


def apply(weights, pruned: PrunedPlan) -> None:
    """Put the pruned matrices in place of the unloaded ones in weights (engine/model/transformer.ModelWeights)."""
    try:
        with np.load(pruned.file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ModelFormatError(f"{pruned.file}: cannot read the pruned matrices ({e}); re-run `pocketinfer prune`") from None
    for layer, group, form in pruned.matrices:
        lw = weights.layers[layer]
        for field in GROUP_FIELDS[group]:
            key = f"layers.{layer}.{field}"
            setattr(lw, field, _weight(pruned.file, key, form, arrays))


def _weight(path: Path, key: str, form: str, arrays: dict):
    """The weight `key` of the file in its form, its arrays checked."""
    try:
        if form == "f32":
            w = arrays[key + ".w"]
            if w.dtype != np.float32 or w.ndim != 2:
                raise ValueError("not a float32 matrix")
            return F32Weight(np.ascontiguousarray(w))
        qs, d = arrays[key + ".qs"], arrays[key + ".d"]
        if sparse24.form_of(qs) != form or d.dtype != np.uint16 or qs.ndim != 2 or d.shape[0] != qs.shape[0] \
                or qs.nbytes != qs.shape[0] * d.shape[1] * sparse24.BLOCK_BYTES[form]:
            raise ValueError(f"arrays {qs.dtype}{qs.shape} and {d.dtype}{d.shape} are not the {form} layout")
        return S24Weight(np.ascontiguousarray(qs), np.ascontiguousarray(d), np.zeros((qs.shape[0], 0), np.uint16))
    except KeyError:
        raise ModelFormatError(f"{path}: {key} is missing; re-run `pocketinfer prune`") from None
    except ValueError as e:
        raise ModelFormatError(f"{path}: {key}: {e}; re-run `pocketinfer prune`") from None
