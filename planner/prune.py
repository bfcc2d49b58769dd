"""2:4 structured pruning (`pocketinfer prune`): in every group of 4 consecutive weights along a row, keep
the 2 with the highest score and zero the others, matrix group by matrix group, under a quality budget.

A *unit* is one layer's matrix group, as for input sparsity (engine/executors/input_sparse.GROUPS): qkv,
o, gate_up or down. A group's matrices share their input, so they are pruned together and still fuse.

Scores (per weight, compared within its group of four):
  magnitude  |W_ij|
  wanda      |W_ij| * ||X_j||_2 (Sun et al. 2023, arXiv 2306.11695): the weight times the L2 norm of its
             input feature over the calibration tokens, from one dense pass (the inputs of every unit
             at once, not re-measured after pruning the layers before it).
The kept values are stored in the 2:4 layouts (kernels/sparse24.py): S4 for matrices the model holds in
4 bits, S8 for 5 to 16 bits, or, for float32 models, float32 with the zeros in place ("f32"), so that
f32 checkpoints prune exactly.

With a quality budget P, as planner/input_sparsity.py does for thresholds:
1. the calibration text splits into a first 2/3 (the Wanda norms) and a last 1/3 (sensitivity);
2. each unit is pruned alone and scored by the mean per-token KL divergence from the dense model on the
   sensitivity split (only the layers from the unit's on re-run);
3. units are taken in order of KL per byte saved while the summed KL stays within log(1 + P), then the
   whole selection is measured jointly and the prediction rescaled until the joint KL is within the
   budget, keeping the feasible selection that saves most.
Without a budget every unit is pruned. Same inputs give the same bytes: no randomness anywhere.
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engine.errors import PlanError
from engine.executors import prefill
from engine.executors.input_sparse import GROUPS, InputMask, group_weights
from engine.formats.pruned import FILE, GROUP_FIELDS
from engine.measure.input_sparsity import log_softmax, residuals, suffix_logits, token_kl, window_logits
from engine.measure.perplexity import window_nll as nll_of
from engine.model.weights import BF16Weight, F16Weight, F32Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight, Weight
from kernels import sparse24
from planner.input_sparsity import check_budget, split_windows

METHODS = ("wanda", "magnitude")
VALUES = ("auto", "int8", "4bit")
VERIFY_TRIES = 6
Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PruneSpec:
    pattern: str = "2:4"
    method: str = "wanda"
    quality_budget: float | None = None      # allowed perplexity rise (0.02 = 2%); None: prune every unit
    values: str = "auto"                     # the kept values' precision: auto (by the source), int8 or 4bit

    def check(self) -> None:
        if self.pattern != "2:4":
            raise PlanError(f"--pattern {self.pattern!r} is not supported: only 2:4 (keep 2 of every 4 weights) "
                            "has kernels")
        if self.method not in METHODS:
            raise PlanError(f"--method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.values not in VALUES:
            raise PlanError(f"--values {self.values!r}: choose one of {', '.join(VALUES)}")
        if self.quality_budget is not None:
            check_budget(self.quality_budget)


@dataclass
class Pruned:
    """One unit pruned: its weights' arrays as stored (engine/formats/pruned.py), by field name."""
    layer: int
    group: str
    form: str
    fields: dict = field(default_factory=dict)   # field name -> {suffix: array} (qs, d; or w for f32)
    dense_bytes: int = 0
    pruned_bytes: int = 0

    @property
    def saved(self) -> int:
        """Bytes the pruning saves."""
        return self.dense_bytes - self.pruned_bytes

    def matrix(self, name: str) -> np.ndarray:
        """(rows, cols) f32: the pruned weight as the runtime multiplies it (zeros, kept values as stored)."""
        arrays = self.fields[name]
        return arrays["w"] if self.form == "f32" else sparse24.unpack(arrays["qs"], arrays["d"])


@dataclass(frozen=True)
class PruneResult:
    units: tuple                  # the Pruned units chosen, in layer and GROUPS order
    total_units: int
    method: str
    budget: float | None
    predicted_change: float | None     # expm1 of the summed KL (budgeted runs)
    measured_change: float             # expm1 of the joint KL on the sensitivity split
    split_ppl_change: float            # the split's perplexity change (noisy; not what is budgeted)
    dense_bytes: int                   # the layers' matrix bytes, dense
    pruned_bytes: int                  # the same with the chosen units pruned
    lines: tuple

    def arrays(self) -> dict[str, np.ndarray]:
        """The file's arrays (engine/formats/pruned.py): layers.<i>.<field>.qs/.d, or .w for f32."""
        return {f"layers.{u.layer}.{name}.{k}": a for u in self.units for name, arrs in u.fields.items()
                for k, a in arrs.items()}

    def save(self, path) -> None:
        """The arrays as an .npz that np.load reads, byte for byte the same for the same arrays: np.savez
        stamps each member with the current time, so the members are written here with a fixed one."""
        with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as z:
            for name, a in sorted(self.arrays().items()):
                info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
                with z.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)

    def as_dict(self) -> dict:
        return {"pattern": "2:4", "layout": sparse24.LAYOUT, "method": self.method, "file": FILE,
                "matrices": [{"layer": u.layer, "group": u.group, "form": u.form, "dense_bytes": u.dense_bytes,
                              "bytes": u.pruned_bytes} for u in self.units],
                "pruned_units": len(self.units), "total_units": self.total_units,
                "quality_budget": self.budget, "predicted_ppl_change": self.predicted_change,
                "measured_ppl_change": self.measured_change, "split_ppl_change": self.split_ppl_change,
                "matrix_bytes": self.pruned_bytes, "dense_matrix_bytes": self.dense_bytes,
                "rationale": list(self.lines)}


def form_for(w: Weight, values: str) -> str:
    """The layout a pruned weight is stored in (module docstring)."""
    if values == "int8":
        return "s8"
    if values == "4bit":
        return "s4"
    if isinstance(w, F32Weight):
        return "f32"
    if isinstance(w, Q4Weight):
        return "s4"
    if isinstance(w, (I8Weight, Q5Weight, Q6Weight, F16Weight, BF16Weight)):
        return "s8"
    raise PlanError(f"a {type(w).__name__} matrix has no 2:4 layout; prune a model in F32, F16, BF16 or a GGUF "
                    "quantization")


def input_norms(model, windows: list) -> np.ndarray:
    """(units,) arrays: per unit (layer * 4 + group), the (cols,) f64 L2 norm of each input feature over the
    dense passes of `windows`."""
    n = model.config.num_hidden_layers
    sums: list = [None] * (n * len(GROUPS) + 1)

    def observe(unit, x):
        sq = np.einsum("ij,ij->j", x, x, dtype=np.float64)
        sums[unit] = sq if sums[unit] is None else sums[unit] + sq

    window_logits(model, windows, InputMask(model.weights.layers, np.zeros((n, len(GROUPS))), observer=observe))
    return [None if s is None else np.sqrt(s) for s in sums]


def prune_unit(lw, layer: int, group: str, method: str, values: str, norms: np.ndarray | None) -> Pruned:
    """One layer's group pruned 2:4 by `method`, each of its weights packed in its form."""
    names = GROUP_FIELDS[group]
    parts = [getattr(lw, f) for f in names]
    forms = {form_for(w, values) for w in parts}
    if len(forms) != 1:
        raise PlanError(f"layer {layer} {group}: its matrices' layouts ({', '.join(type(w).__name__ for w in parts)}) "
                        "map to different 2:4 forms; give --values int8 or 4bit")
    form = forms.pop()
    unit = Pruned(layer, group, form)
    for name, w in zip(names, parts):
        if w.shape[1] % sparse24.BLOCK:
            raise PlanError(f"layer {layer} {name}: {w.shape[1]} columns; 2:4 layouts need a multiple of "
                            f"{sparse24.BLOCK}")
        dense = w.to_float32()                                                  # (rows, cols) f32
        score = np.abs(dense) if method == "magnitude" else np.abs(dense) * norms[None, :].astype(np.float32)
        keep = sparse24.mask_24(dense, score)
        if form == "f32":
            arrays = {"w": np.where(keep, dense, np.float32(0.0))}
        else:
            qs, d = sparse24.pack(dense * keep, keep, form)
            arrays = {"qs": qs, "d": d}
        unit.fields[name] = arrays
        unit.dense_bytes += w.nbytes
        unit.pruned_bytes += sum(a.nbytes for a in arrays.values())
    return unit


class _Swapped(InputMask):
    """The f32 matmul of the layer-by-layer stack with the chosen units' weights replaced by their pruned
    matrices (by the identity of the weight the stack multiplies: fused or separate)."""

    def __init__(self, layers, units: list[Pruned]):
        super().__init__(layers, np.zeros((len(layers), len(GROUPS))))
        self.swap = {}
        for u in units:
            lw = layers[u.layer]
            names = GROUP_FIELDS[u.group]
            for w in group_weights(lw, u.group):
                mine = [f for f in names if getattr(lw, f) is w]
                # a fused weight (wqkv, w_gate_up) is the group's matrices stacked, in GROUP_FIELDS order
                self.swap[id(w)] = u.matrix(mine[0]) if mine else np.concatenate([u.matrix(f) for f in names])

    def __call__(self, w, x):
        sub = self.swap.get(id(w))
        return prefill.f32(w, x) if sub is None else x @ sub.T


def _joint(model, windows, dense_logp, dense_nll, units) -> tuple[float, float]:
    """(mean KL from dense, mean NLL change) on windows with `units` pruned."""
    kl = nll = 0.0
    count = 0
    for w, lp, lg in zip(windows, dense_logp, window_logits(model, windows, _Swapped(model.weights.layers, units))):
        kl += float(token_kl(lp, lg).sum())
        nll += float(nll_of(lg, w).sum())
        count += len(w) - 1
    return kl / count, nll / count - dense_nll


def prune(llm, spec: PruneSpec, text: str, progress: Progress | None = None) -> PruneResult:
    """Prune llm (an engine.llm.LLM, loaded dense) by spec on calibration text (module docstring)."""
    spec.check()
    model = llm.model
    layers = model.weights.layers
    n = model.config.num_hidden_layers
    fit, held = split_windows(llm, llm.tokenizer.encode(text))
    norms = input_norms(model, fit) if spec.method == "wanda" else [None] * (n * len(GROUPS))
    units = []
    for i, lw in enumerate(layers):
        for g, group in enumerate(GROUPS):
            units.append(prune_unit(lw, i, group, spec.method, spec.values, norms[i * len(GROUPS) + g]))
            if progress:
                progress("prune", len(units), n * len(GROUPS))
    dense_logp, dense_nll, count = [], 0.0, 0
    for w in held:
        lg = window_logits(model, [w], _Swapped(layers, []))[0]
        dense_logp.append(log_softmax(lg))
        dense_nll += float(nll_of(lg, w).sum())
        count += len(w) - 1
    dense_nll /= count
    dense_bytes = sum(u.dense_bytes for u in units)
    lines = []
    predicted = None
    if spec.quality_budget is None:
        chosen = units
        lines.append(f"every unit pruned ({spec.method})")
    else:
        kl = unit_sensitivity(model, held, dense_logp, units, progress)
        chosen, predicted, tried = select(model, held, dense_logp, dense_nll, units, kl, spec.quality_budget)
        lines.extend(tried)
        lines.extend(_cost_lines(units, kl))
    measured, split = _joint(model, held, dense_logp, dense_nll, chosen) if chosen else (0.0, 0.0)
    pruned_bytes = dense_bytes - sum(u.saved for u in chosen)
    lines.insert(0, f"{len(chosen)} of {len(units)} matrix groups pruned 2:4 ({spec.method}): the layers' matrices "
                    f"take {pruned_bytes / dense_bytes:.1%} of their dense bytes; on {count} held-out calibration "
                    f"tokens perplexity {math.expm1(split):+.2%}, KL-implied {math.expm1(measured):+.2%}")
    return PruneResult(tuple(chosen), len(units), spec.method, spec.quality_budget, predicted, math.expm1(measured),
                       math.expm1(split), dense_bytes, pruned_bytes, tuple(lines))


def unit_sensitivity(model, windows, dense_logp, units: list[Pruned], progress: Progress | None = None) -> np.ndarray:
    """(units,) mean KL from dense of each unit pruned alone, re-running only its layer and those after."""
    kl = np.zeros(len(units))
    count = sum(len(w) - 1 for w in windows)
    done = 0
    for w, lp in zip(windows, dense_logp):
        res = residuals(model, w)
        for k, u in enumerate(units):
            logits = suffix_logits(model, w, res[u.layer], u.layer, _Swapped(model.weights.layers, [u]))
            kl[k] += float(token_kl(lp, logits).sum())
            done += 1
            if progress:
                progress("sensitivity", done, len(windows) * len(units))
    return kl / count


def _cost_lines(units: list[Pruned], kl: np.ndarray, top: int = 8) -> list[str]:
    """What pruning each group alone costs: the spread, and the cheapest per byte saved."""
    ppl = np.expm1(np.maximum(kl, 0.0))
    saved = np.array([u.saved for u in units], np.float64)
    out = [f"each group pruned alone: perplexity +{ppl.min():.2%} to +{ppl.max():.2%} (KL-implied), median "
           f"+{float(np.median(ppl)):.2%}"]
    for k in sorted(range(len(units)), key=lambda k: (ppl[k] / max(saved[k], 1.0), k))[:top]:
        out.append(f"layer {units[k].layer} {units[k].group}: +{ppl[k]:.3%} alone, saves {saved[k] / 1024:.0f} KiB")
    return out


def select(model, windows, dense_logp, dense_nll, units: list[Pruned], kl: np.ndarray, budget: float):
    """The units to prune under a perplexity rise of `budget` (module docstring, step 3): (chosen units in
    layer order, predicted change, the lines tried)."""
    target = math.log1p(budget)
    saved = np.array([u.saved for u in units], np.float64)
    order = sorted(range(len(units)), key=lambda k: (max(kl[k], 0.0) / max(saved[k], 1.0), k))
    best, tried, b = None, [], target
    for _ in range(VERIFY_TRIES if target > 0 else 0):
        take, total = [], 0.0
        for k in order:
            if total + max(kl[k], 0.0) > b:
                break
            take.append(k)
            total += max(kl[k], 0.0)
        if not take:
            break
        chosen = [units[k] for k in sorted(take)]
        measured, split = _joint(model, windows, dense_logp, dense_nll, chosen)
        tried.append(f"predicted budget {math.expm1(b):+.2%}: {len(take)} groups, predicted {math.expm1(total):+.2%}, "
                     f"measured {math.expm1(measured):+.2%} (KL; the split's ppl {math.expm1(split):+.2%})")
        gain = float(saved[take].sum())
        if measured <= target and (best is None or gain > best[0]):
            best = (gain, chosen, total)
        if measured <= target and (measured >= 0.9 * target or len(take) == len(units)):
            break
        b *= min(2.0, max(0.3, target / max(measured, 1e-9)))
    if best is None:
        return [], None, tuple(["none: the budget is too small for any group", *tried])
    return best[1], math.expm1(best[2]), tuple(tried)
