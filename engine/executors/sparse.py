"""Decode-time FFN executor: for one token, compute only the FFN neurons that matter (PowerInfer-2's
neuron-cluster engine, arXiv 2406.06282 section 4; the CPU half of DESIGN.md's polymorphic engine).

Modes, per layer:
- dense       the unfused dense FFN (gate|up matvec, activation, down matvec);
- relu-exact  gate for every neuron, then up and down only where relu(gate) > 0. Exact for ReLU and
              dReLU models (for dReLU, neurons with relu(up) = 0 also skip their down column);
- predicted   a low-rank predictor (engine/executors/predictor.py) picks the neurons from the FFN input; gate,
              up and down are computed for those only. Its threshold was calibrated by whoever trained
              it (the planner): on |act(gate)*up| for SwiGLU, on act != 0 for ReLU-family models;
- oracle      dense gate and up, then down only where |act(gate)*up| > a per-layer threshold. It
              reads every gate and up row, so it never saves time: it measures what a perfect
              predictor at that threshold would cost in quality.

Neurons are taken in clusters of `cluster` consecutive neurons (a cluster is computed when any of its
neurons is chosen): that is the unit the flash cache reads (DESIGN.md, "Flash layout"); 1 in RAM.

The down projection is kept a second time, neuron-major (downT (ffn, hidden): row j is column j of
down), so each chosen neuron reads one contiguous row. Its storage precision (`down_format`):
- F32 / F16 / BF16 sources: the same format, transposed exactly;
- quantized sources (Q4, I8 layouts): "i8" (default), int8 with one f16 scale per 32 values (Q8_0's
  precision), re-quantized from the dequantized column after dividing each hidden dimension by its
  largest |value| (the kernel multiplies that back once per output element). Without that division,
  blocks run along hidden and SmolLM2's few outlier dimensions set the scale of every block they sit
  in: at 0% sparsity perplexity went +3.0% (i8) / +8.4% (q4); with it, i8 is as good as an exact f32
  transpose (SmolLM2 Q4_1, ppl_text.txt, ctx 256 x 2 windows, decoded token by token: exact f32
  14.887, i8 14.860, q4 16.055; dense decode 14.773 with float activations, 15.064 with the int8-rounded
  activations of the current Q4 matvec). "q4" (Q4_1-style, f16 scale and min per 32) is kept for
  measurement only: +8.7% perplexity, and though it reads 2,560 bytes per 4096-wide row against
  4,352, its axpy (kernels/gather.py, nibble unpacking) was no faster: 1100 rows at Llama-2-7B shapes,
  2 threads, 0.17 against 0.11 ms from cache and 0.37 against 0.27 ms from DRAM.
The dense copy of down stays for prefill (batched, through BLAS); the extra memory is downT's bytes.

Neuron records (`records`, Q4 and I8 gate/up only): each sparse layer keeps, per neuron, its gate row,
up row, downT row and their scales side by side in one record (kernels/neuron_records.py), so that a
chosen neuron is one contiguous read and runs of neighbouring neurons one stream: the sparse kernel took
0.63-0.76x the time of the same rows in separate arrays with Q4_0 weights, 0.84-0.99x with Q8_0
(Llama-2-7B shapes, 90% sparsity, 2 threads, tools/bench_sparse.py, BENCHMARKS.md). relu-exact's
records leave gate out: it reads gate densely.
- "move" (engine.llm's loads): the layer's gate and up Weights become views of the records (prefill and
  any dense use read them there, strided), so the records cost no memory beyond downT's. The model
  then gives up its one-call decode paths, which read every layer's stacked gate|up
  (Transformer.drop_decode_stacks): with sparse layers, decode runs layer by layer anyway.
- "copy" (the default; eval-sparsity, tools): the records are a copy and the model is untouched, so
  dense decode measured beside the sparse path is the real dense path. Costs gate and up once more.
- "off": the separate arrays, as before.

The executor keeps per-layer statistics (tokens, neurons chosen, FFN seconds; with `track_truth`
also the true active set for recall/precision), which `pocketinfer eval-sparsity` reports.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, ModelFormatError
from engine.executors.predictor import LayerPredictor, load_predictors
from engine.model.weights import BF16Weight, F16Weight, F32Weight, I8Weight, Q4Weight, Weight
from kernels.activation import DRELU, RELU, glu
from kernels.backend import NUMBA
from kernels.neuron_records import pack
from kernels.sparse_ffn import predict, select, sparse_ffn

MODES = ("dense", "relu-exact", "predicted", "oracle")
RECORDS = ("off", "copy", "move")
DOWN_FORMATS = ("auto", "i8", "q4", "f32")
_EMPTY = np.zeros(0, dtype=np.float32)     # "no precomputed gate" for the kernel
_TILE_ROWS = 256                            # rows of down dequantized at a time while transposing


# ---------------------------------------------------------------- packing

def _arrays(w: Weight) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A weight's kernel arrays (w, d, m) and its bits16 flag (1 = BF16), -1 when not 16-bit."""
    if isinstance(w, F32Weight):
        e = np.zeros((w.shape[0], 0), np.float32)
        return w.w, e, e, -1
    if isinstance(w, (F16Weight, BF16Weight)):
        e = np.zeros((w.shape[0], 0), np.float32)
        return w.bits, e, e, int(isinstance(w, BF16Weight))
    if isinstance(w, Q4Weight):
        return w.qs, w.d, w.m, -1
    if isinstance(w, I8Weight):
        return w.q, w.d, w.m, -1
    raise ConfigError(f"sparse decode has no kernel for weight layout {type(w).__name__}")


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
    qs = (q[:, :, :16] | (q[:, :, 16:] << 4)).reshape(rows, cols // 2)
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


def _recordable(lw) -> bool:
    """Whether a layer's gate and up can go into neuron records: the Q4 and I8 layouts, whose Weights
    take the records' row views (the float layouts keep separate arrays)."""
    return type(lw.w_gate) is type(lw.w_up) and isinstance(lw.w_gate, (Q4Weight, I8Weight))


def _flags(*flags: int) -> int:
    kinds = {f for f in flags if f >= 0}
    if len(kinds) > 1:
        raise ConfigError("sparse decode cannot mix F16 and BF16 weights in one FFN layer; convert the model "
                          "to one 16-bit format")
    return kinds.pop() if kinds else 0


# ---------------------------------------------------------------- the executor

@dataclass
class LayerStats:
    tokens: int = 0
    chosen: int = 0         # neurons whose up (and gate, unless relu-exact) rows were read
    true_active: int = 0    # with track_truth: neurons whose |act| exceeds the truth threshold
    hits: int = 0           # with track_truth: chosen and truly active
    seconds: float = 0.0    # FFN wall time, predictor included

    def sparsity(self, ffn: int) -> float:
        return 1.0 - self.chosen / max(1, self.tokens * ffn)


class _Layer:
    def __init__(self, lw, mode: str, down_format: str, predictor: LayerPredictor | None,
                 oracle_threshold: float | None, records: str):
        self.mode = mode
        self.lw = lw
        self.predictor = predictor
        self.oracle_threshold = oracle_threshold
        self.moved = False
        self.records = None                        # (ffn, R) uint8 neuron records, when used
        if mode == "dense":
            return
        gw, gd, gm, gf = _arrays(lw.w_gate)
        uw, ud, um, uf = _arrays(lw.w_up)
        dw, dd, dm, dscale, df = transpose_down(lw.w_down, down_format)
        self.bits16 = _flags(gf, uf, df)
        # What this executor adds to the model's memory (the records' gate and up rows replace the
        # model's under "move"; under "copy" they are a measuring convenience, not counted).
        self.down_bytes = dw.nbytes + dd.nbytes + dm.nbytes + dscale.nbytes
        if records != "off" and _recordable(lw):
            with_gate = mode != "relu-exact"       # relu-exact's gate is one dense matvec: a matrix
            fields = [gw, uw, dw, gd, ud, dd, gm, um, dm] if with_gate else [uw, dw, ud, dd, um, dm]
            model_rows = sum(a.nbytes for a in ((gw, gd, gm, uw, ud, um) if with_gate else (uw, ud, um)))
            self.records, views = pack(fields)     # (ffn, R) uint8
            if with_gate:
                gw, uw, dw, gd, ud, dd, gm, um, dm = views
            else:
                uw, dw, ud, dd, um, dm = views
            self.down_bytes = self.records.nbytes - model_rows + dscale.nbytes
            if records == "move":
                g = lw.w_gate
                if with_gate:
                    lw.w_gate = type(g)(gw, gd, gm)
                elif lw.w_gate_up is not None:     # gate is a view of the stacked gate|up: its own rows
                    lw.w_gate = type(g)(*[a.copy() for a in g._arrays()])
                lw.w_up = type(lw.w_up)(uw, ud, um)
                lw.w_gate_up = None
                self.moved = True
        self.args = (gw, gd, gm, uw, ud, um, dw, dd, dm, dscale, self.bits16)


class SparseFFN:
    """Per-layer FFN for single-token decode; `Transformer.sparse` holds one (engine/model/transformer.py)."""

    def __init__(self, model, modes: list[str], *, predictors: dict[int, LayerPredictor] | None = None,
                 oracle_thresholds: list[float] | None = None, down_format: str = "auto", cluster: int = 1,
                 track_truth: bool = False, run_dense: bool = False, records: str = "copy"):
        c = model.config
        layers = model.weights.layers
        if len(modes) != len(layers):
            raise ConfigError(f"{len(modes)} sparse modes given for {len(layers)} layers")
        if cluster < 1 or c.intermediate_size % cluster:
            raise ConfigError(f"cluster size {cluster} must be positive and divide the FFN size {c.intermediate_size}")
        if records not in RECORDS:
            raise ConfigError(f"records={records!r} is not one of {', '.join(RECORDS)}")
        predictors = predictors or {}
        self.config = c
        self.ffn_size = c.intermediate_size
        self.act = c.act_kind
        self.cluster = cluster
        self.track_truth = track_truth
        self.run_dense = run_dense      # dense layers through ffn() too, to time them (eval-sparsity)
        self.layers = []
        for i, (lw, mode) in enumerate(zip(layers, modes)):
            if mode not in MODES:
                raise ConfigError(f"layer {i}: sparse mode {mode!r} is not one of {', '.join(MODES)}")
            if mode == "relu-exact" and c.act_kind not in (RELU, DRELU):
                raise ConfigError(f"layer {i}: relu-exact needs a ReLU or dReLU model, this one has "
                                  f"hidden_act={c.hidden_act!r}; use predicted or dense")
            if mode == "predicted" and i not in predictors:
                raise ConfigError(f"layer {i}: mode predicted but the predictor file has no layer {i}")
            if mode == "oracle" and (oracle_thresholds is None or oracle_thresholds[i] is None):
                raise ConfigError(f"layer {i}: mode oracle needs a threshold (calibrate with oracle_thresholds())")
            self.layers.append(_Layer(lw, mode, down_format, predictors.get(i),
                                      None if oracle_thresholds is None else oracle_thresholds[i], records))
        if any(layer.moved for layer in self.layers):
            model.drop_decode_stacks()
        self.any_sparse = any(layer.mode != "dense" for layer in self.layers)
        f, hdim = c.intermediate_size, c.hidden_size
        self._out = np.empty(hdim, np.float32)                # (hidden,) f32 FFN output
        self._idx = np.empty(f, np.int32)                     # (ffn,) int32 chosen neurons
        self._acts = np.empty(f, np.float32)                  # (ffn,) f32 their act(gate)*up
        self._scores = np.empty(f, np.float32)                # (ffn,) f32 predictor scores
        self.stats = [LayerStats() for _ in layers]

    @property
    def extra_bytes(self) -> int:
        """Memory added for decode: downT copies and predictors."""
        return sum(getattr(layer, "down_bytes", 0) + (layer.predictor.nbytes if layer.predictor else 0)
                   for layer in self.layers)

    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in self.layers]

    def handles(self, i: int) -> bool:
        return self.run_dense or self.layers[i].mode != "dense"

    def ffn(self, i: int, h: np.ndarray) -> np.ndarray:
        """h (hidden,) f32, the FFN input after its RMSNorm -> (hidden,) f32 FFN output (a buffer
        reused by the next call)."""
        t0 = time.perf_counter()
        layer, st = self.layers[i], self.stats[i]
        threads = _threads()
        gate, truth = _EMPTY, None
        if layer.mode == "predicted":
            p = layer.predictor
            n = predict(*p.arrays, h, np.float32(p.threshold), threads, self._scores, self._idx)
        elif layer.mode == "relu-exact":
            gate = layer.lw.w_gate.matvec(h)                               # (ffn,) f32
            n = select(gate, np.float32(0.0), self._idx)
        elif layer.mode == "oracle":
            gate, act = self._dense_act(layer, h)
            n = select(np.abs(act), np.float32(layer.oracle_threshold), self._idx)
        else:
            gate, act = self._dense_act(layer, h)
            out = layer.lw.w_down.matvec(act)
            st.tokens += 1
            st.chosen += self.ffn_size
            st.seconds += time.perf_counter() - t0
            return out
        idx = self._idx[:n]
        if self.cluster > 1 and n:
            idx = _whole_clusters(idx, self.cluster)
            n = len(idx)
        sparse_ffn(*layer.args, h, idx, gate, self.act, threads, self._acts[:n], self._out)
        st.seconds += time.perf_counter() - t0
        st.tokens += 1
        st.chosen += n
        if self.track_truth:
            self._count_truth(layer, st, h, idx)
        return self._out

    def _dense_act(self, layer, h):
        lw = layer.lw
        gu = (lw.w_gate_up.matvec(h) if lw.w_gate_up is not None
              else np.concatenate([lw.w_gate.matvec(h), lw.w_up.matvec(h)]))  # (2*ffn,) f32
        f = self.ffn_size
        gate = gu[:f].copy()
        act = glu(gu[None, :f], gu[None, f:], self.act, np.empty((1, f), np.float32))[0]
        return gate, act

    def _count_truth(self, layer, st: LayerStats, h, idx) -> None:
        """Recall and precision counts against the true active set (measurement only: recomputes the
        dense activations). Truth is act != 0 for ReLU-family models; otherwise |act| above the
        predictor's label threshold, or the oracle's threshold."""
        _, act = self._dense_act(layer, h)
        if layer.mode == "predicted" and self.act not in (RELU, DRELU):
            thr = layer.predictor.label_threshold
        elif layer.mode == "oracle":
            thr = layer.oracle_threshold
        else:
            thr = 0.0
        true = np.abs(act) > thr
        st.true_active += int(true.sum())
        st.hits += int(true[idx].sum())


def _threads() -> int:
    if not NUMBA:
        return 1
    import numba
    return numba.get_num_threads()


def _whole_clusters(idx: np.ndarray, cluster: int) -> np.ndarray:
    """idx (n,) int32 ascending -> every neuron of each cluster that idx touches, ascending."""
    cl = np.unique(idx // cluster)
    return (cl[:, None] * cluster + np.arange(cluster, dtype=np.int32)).ravel().astype(np.int32)


# ---------------------------------------------------------------- defaults, plans, calibration

def default_modes(config) -> list[str]:
    """Without a plan: relu-exact for ReLU-family models (exact, and in trained ReLU models 85-97% of
    neurons are zero); dense for the rest. Why dense for SwiGLU (SmolLM2-135M Q4_1, tools/sparsity_curve.py,
    BENCHMARKS.md): even a perfect (oracle) selection keeps perplexity within 2% only up to ~50% sparsity,
    low-rank predictors of rank 16 to 128 (int8: 3-17% of the layer's FFN bytes, read every token) have
    56-60% precision and reach under 2% sparsity within +2% perplexity, and the sparse path decodes slower than
    dense on such small matrices: sparsity does not pay on small SwiGLU models."""
    mode = "relu-exact" if config.act_kind in (RELU, DRELU) else "dense"
    return [mode] * config.num_hidden_layers


def attach(model, modes: list[str] | None = None, **kwargs) -> SparseFFN | None:
    """Give the model a sparse executor (None and dense decode when every layer is dense)."""
    modes = default_modes(model.config) if modes is None else modes
    model.sparse = SparseFFN(model, modes, **kwargs) if any(m != "dense" for m in modes) else None
    return model.sparse


def decode_plan(path: str | Path | None, config) -> tuple[list[str], dict[int, LayerPredictor], int]:
    """(modes, predictors, cluster) for in-RAM decode: a deploy's plan.json (read_plan), or with no
    plan the defaults (default_modes, no predictors, clusters of one)."""
    if path is None:
        return default_modes(config), {}, 1
    return read_plan(path, config)


def read_plan(path: str | Path, config) -> tuple[list[str], dict[int, LayerPredictor], int]:
    """The decode part of a plan for a model with this config: (modes, predictors, cluster). `path` is
    a predictors.npz (every layer with a predictor runs predicted, the rest dense) or a plan.json whose
    "decode" holds {"layers": [{"mode": ..., "threshold": optional float}, ...], "cluster_size":
    optional int, "predictors": optional path relative to the plan}. A layer threshold overrides the
    predictor's. `pocketinfer plan`'s plan.json says "sparse" for a layer its predictor runs (read as
    predicted) and names the predictor file in files.predictors."""
    c = config
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such plan or predictor file")
    if path.suffix == ".npz":
        preds = load_predictors(path, c.hidden_size, c.intermediate_size)
        modes = ["predicted" if i in preds else "dense" for i in range(c.num_hidden_layers)]
        return modes, preds, 1
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
        decode = plan["decode"]
        layers = decode["layers"]
    except (ValueError, KeyError, TypeError) as e:
        raise ModelFormatError(f"{path}: not a plan with a decode.layers list ({e}); re-run `pocketinfer plan`") from None
    if len(layers) != c.num_hidden_layers:
        raise ModelFormatError(f"{path}: decode.layers has {len(layers)} entries, the model has "
                               f"{c.num_hidden_layers} layers; the plan is for another model")
    modes_in = [layer.get("mode", "dense") if isinstance(layer, dict) else None for layer in layers]
    modes_in = ["predicted" if m == "sparse" else m for m in modes_in]       # the planner's word
    pred_file = decode.get("predictors") or (plan.get("files") or {}).get("predictors")
    preds = {}
    if pred_file and "predicted" in modes_in:
        preds = load_predictors(path.parent / pred_file, c.hidden_size, c.intermediate_size)
    modes = []
    for i, (layer, mode) in enumerate(zip(layers, modes_in)):
        if mode not in MODES:
            raise ModelFormatError(f"{path}: decode.layers[{i}].mode is {mode!r}, expected one of {', '.join(MODES)}")
        if layer.get("threshold") is not None and i in preds:
            p = preds[i]
            preds[i] = dataclasses.replace(p, threshold=float(layer["threshold"]))
        modes.append(mode)
    return modes, preds, int(decode.get("cluster_size", 1))


def oracle_thresholds(model, ids: np.ndarray, sparsity: float) -> list[float]:
    """Per-layer thresholds on |act(gate)*up| that leave `sparsity` of the neurons below them, on the
    calibration tokens `ids` (a quantile per layer; DESIGN.md: the product, not |act(gate)| alone)."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"oracle sparsity must be in [0, 1), got {sparsity}")
    thr = [0.0] * model.config.num_hidden_layers

    def observe(i, h, gate, up, act):
        thr[i] = float(np.quantile(np.abs(act), sparsity)) if sparsity > 0 else -1.0

    prev, model.ffn_observer = model.ffn_observer, observe
    try:
        model.forward(np.asarray(ids), model.new_cache(len(ids)))
    finally:
        model.ffn_observer = prev
    return thr
