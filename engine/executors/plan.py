"""The execution plan the runtime follows: a deploy directory's plan.json (written by `pocketinfer
plan`; this module never imports planner/), or the defaults for a model run directly.

plan.json's parts read here:
- decode.layers[i].mode: "dense", or "sparse" (the planner's word for predicted: the layer's predictor
  picks the neurons; predictors from files.predictors). decode.layers[i].threshold overrides a
  predictor's threshold; decode.cluster_size groups neurons. relu-exact and oracle are accepted too;
- decode.input_sparsity.thresholds: per layer, the thresholds on |input| of its qkv, o, gate_up and down
  inputs (`pocketinfer plan --quality-budget`, planner/input_sparsity.py): decode then runs input-sparse
  (engine/executors/input_sparse_decode.py);
- execution.weights == "flash": every FFN runs from the bundle file files.bundles, per layer with
  hot_neurons resident and cold_cache_neurons cached; io.direct_io, io.reader_threads and
  io.request_bytes set its reader, flash.cache_policy the cache;
- execution.lm_head == "flash": the embeddings and LM head stream from the weights file;
- sparsity: 2:4-pruned matrices that replace the weights file's (`pocketinfer prune`, engine/formats/pruned.py);
- prefill.engine: "int8", "onnx" or "f32", the prefill engine (engine/executors/prefill.py); without it,
  the default. prefill.fallback ("int8" or "f32") runs when ONNX Runtime cannot; prefill.providers lists
  ONNX Runtime's execution providers in order of preference.
Without a plan (`default_plan`): relu-exact for ReLU-family models (exact, and trained ReLU models leave
85-97% of neurons at zero), dense for the rest: on SwiGLU models the predictors are too imprecise for
neuron sparsity to pay (BENCHMARKS.md, tools/sparsity_curve.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from engine.errors import ModelFormatError
from engine.executors import prefill as prefill_engines
from engine.executors.flash_ffn import LayerPlan
from engine.executors.predictor import LayerPredictor, load_predictors
from engine.executors.sparse import MODES
from engine.formats.pruned import PrunedPlan, read_section as read_pruned
from kernels.activation import DRELU, RELU


@dataclass(frozen=True)
class FlashPlan:
    bundles: Path              # the bundle file
    fingerprint: str           # the model's, checked against the bundle file's header
    layers: tuple[LayerPlan, ...]
    reader_threads: int = 1
    request_bytes: int = 256 << 10
    cache_policy: str = "lru"
    max_gap: int | None = None # bundles between misses read through (None: the executor's default)


@dataclass(frozen=True)
class Plan:
    decode: tuple[str, ...]                                    # per layer: one of sparse.MODES
    predictors: dict[int, LayerPredictor] = field(default_factory=dict)
    cluster: int = 1                                           # neurons per cluster in sparse layers
    flash: FlashPlan | None = None                             # FFNs from the bundle file, else resident
    head_on_flash: bool = False                                # embeddings / LM head streamed from the file
    direct_io: bool = True                                     # O_DIRECT reads for whatever streams from flash
    prefill: str = field(default_factory=prefill_engines.default_engine)   # one of prefill.ENGINES
    prefill_fallback: str = field(default_factory=prefill_engines.default_engine)  # a MATMUL_ENGINES one
    providers: tuple[str, ...] = ("CPUExecutionProvider",)    # ONNX Runtime's, in order of preference
    source: str = "defaults (engine/executors/plan.py)"       # where the plan came from, for describe()
    input_thresholds: tuple[tuple[float, ...], ...] | None = None   # (n_layers, 4) decode input thresholds
    pruned: PrunedPlan | None = None                           # 2:4-pruned matrices (engine/formats/pruned.py)

    @property
    def stack_engine(self) -> str:
        """The matmul engine of the layer-by-layer prefill: the plan's engine, or under "onnx" its fallback."""
        return self.prefill_fallback if self.prefill == "onnx" else self.prefill

    def unloaded(self) -> set[str]:
        """Our names of the matrices the plan serves from flash, which the reader must not load."""
        out = set()
        if self.flash is not None:
            out |= {f"layers.{i}.{f}" for i in range(len(self.decode)) for f in ("w_gate", "w_up", "w_down")}
        if self.head_on_flash:
            out |= {"embed", "lm_head"}
        if self.pruned is not None:
            out |= self.pruned.names()
        return out


def default_plan(config, sparse: bool = True) -> Plan:
    """The plan of a model run without one (module docstring); sparse=False: every layer dense."""
    mode = "relu-exact" if sparse and config.act_kind in (RELU, DRELU) else "dense"
    return Plan(decode=(mode,) * config.num_hidden_layers)


def read_plan(path: str | Path, config) -> Plan:
    """The plan in `path`: a deploy's plan.json (module docstring), or a predictors.npz (every layer
    with a predictor runs predicted, the rest dense)."""
    c = config
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such plan or predictor file")
    if path.suffix == ".npz":
        preds = load_predictors(path, c.hidden_size, c.intermediate_size)
        modes = tuple("predicted" if i in preds else "dense" for i in range(c.num_hidden_layers))
        return Plan(decode=modes, predictors=preds, source=str(path))
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        decode = plan["decode"]
        layers = decode["layers"]
        modes = tuple(layer.get("mode", "dense") for layer in layers)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ModelFormatError(f"{path}: not a plan with a decode.layers list ({e}); re-run `pocketinfer plan`") from None
    if len(layers) != c.num_hidden_layers:
        raise ModelFormatError(f"{path}: decode.layers has {len(layers)} entries, the model has "
                               f"{c.num_hidden_layers} layers; the plan is for another model")
    modes = tuple("predicted" if m == "sparse" else m for m in modes)       # the planner's word
    for i, mode in enumerate(modes):
        if mode not in MODES:
            raise ModelFormatError(f"{path}: decode.layers[{i}].mode is {mode!r}, expected one of {', '.join(MODES)}")
    files = plan.get("files") or {}
    pred_file = decode.get("predictors") or files.get("predictors")
    preds = {}
    if pred_file and "predicted" in modes:
        preds = load_predictors(path.parent / pred_file, c.hidden_size, c.intermediate_size)
    for i, layer in enumerate(layers):
        if layer.get("threshold") is not None and i in preds:
            preds[i] = dataclasses.replace(preds[i], threshold=float(layer["threshold"]))
    execution, io = plan.get("execution") or {}, plan.get("io") or {}
    pre = plan.get("prefill") or {}
    engine = pre.get("engine") or prefill_engines.default_engine()
    if engine not in prefill_engines.ENGINES:
        raise ModelFormatError(f"{path}: prefill.engine is {engine!r}, expected one of "
                               f"{', '.join(prefill_engines.ENGINES)}")
    fallback = pre.get("fallback") or prefill_engines.default_engine()
    if fallback not in prefill_engines.MATMUL_ENGINES:
        raise ModelFormatError(f"{path}: prefill.fallback is {fallback!r}, expected one of "
                               f"{', '.join(prefill_engines.MATMUL_ENGINES)}")
    providers = pre.get("providers") or ["CPUExecutionProvider"]
    if not isinstance(providers, list) or not all(isinstance(p, str) for p in providers):
        raise ModelFormatError(f"{path}: prefill.providers is {providers!r}, expected a list of ONNX Runtime "
                               "execution provider names")
    flash = None
    if execution.get("weights") == "flash":
        if "bundles" not in files:
            raise ModelFormatError(f"{path}: a flash plan without files.bundles; re-run `pocketinfer plan`")
        flash = FlashPlan(
            bundles=path.parent / files["bundles"], fingerprint=plan["model"]["fingerprint"],
            layers=tuple(LayerPlan("predicted" if m == "predicted" else "dense", int(lay.get("hot_neurons", 0)),
                                    int(lay.get("cold_cache_neurons", 0))) for m, lay in zip(modes, layers)),
            # The readers' queue depth is about twice reader_threads; 0 or none means one.
            reader_threads=max(1, _io_count(path, io, "reader_threads", 256) or 1),
            request_bytes=int(io.get("request_bytes") or 256 << 10),
            max_gap=_io_count(path, io, "max_gap_records", 64),
            cache_policy=(plan.get("flash") or {}).get("cache_policy", "lru"))
    thresholds = _input_thresholds(path, decode.get("input_sparsity"), c.num_hidden_layers)
    if thresholds is not None and (flash is not None or any(m != "dense" for m in modes)):
        raise ModelFormatError(f"{path}: decode.input_sparsity needs every layer dense and resident; "
                               "re-run `pocketinfer plan --quality-budget` with a memory budget of 100%")
    pruned = read_pruned(path, plan.get("sparsity"), c.num_hidden_layers)
    if pruned is not None and (flash is not None or thresholds is not None):
        raise ModelFormatError(f"{path}: 2:4-pruned matrices need the weights resident and decode without input "
                               "sparsity; re-run `pocketinfer prune`")
    return Plan(decode=modes, predictors=preds, cluster=int(decode.get("cluster_size", 1)), flash=flash,
                head_on_flash=execution.get("lm_head") == "flash", direct_io=bool(io.get("direct_io", True)),
                prefill=engine, prefill_fallback=fallback, providers=tuple(providers), source=str(path),
                input_thresholds=thresholds, pruned=pruned)


def _io_count(path: Path, io: dict, key: str, high: int) -> int | None:
    """io.<key>: a whole number from 0 to high, or None where the plan has none (older plans)."""
    value = io.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise ModelFormatError(f"{path}: io.{key} is {value!r}, expected a whole number from 0 to {high}; "
                               "re-run `pocketinfer plan`")
    return value


def _input_thresholds(path: Path, section, layers: int) -> tuple[tuple[float, ...], ...] | None:
    """decode.input_sparsity.thresholds checked: (layers, 4) finite numbers >= 0; None without the section."""
    if section is None:
        return None
    rows = section.get("thresholds") if isinstance(section, dict) else None
    try:
        out = tuple(tuple(float(v) for v in row) for row in rows)
    except (TypeError, ValueError):
        out = None
    if out is None or len(out) != layers or any(len(r) != 4 or not all(math.isfinite(v) and v >= 0 for v in r)
                                                 for r in out):
        raise ModelFormatError(f"{path}: decode.input_sparsity.thresholds must be {layers} rows of 4 numbers >= 0 "
                               "(qkv, o, gate_up, down); re-run `pocketinfer plan --quality-budget`")
    return out if any(v > 0 for r in out for v in r) else None          # all 0: the budget allowed none
