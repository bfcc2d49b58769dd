"""The sparse FFN executor of single-token decode: compute only the FFN neurons that matter
(PowerInfer-2's neuron-cluster engine, arXiv 2406.06282 section 4).

Modes, per layer (engine/executors/plan.py chooses them):
- relu-exact  gate for every neuron, then up and down only where relu(gate) > 0. Exact for ReLU and
              dReLU models (for dReLU, neurons with relu(up) = 0 also skip their down column);
- predicted   a low-rank predictor (engine/executors/predictor.py) picks the neurons from the FFN
              input; gate, up and down are computed for those only. Its threshold was calibrated by
              whoever trained it (the planner): on |act(gate)*up| for SwiGLU, on act != 0 for ReLU;
- oracle      dense gate and up, then down only where |act(gate)*up| > a per-layer threshold. It
              reads every gate and up row, so it never saves time: it measures what a perfect
              predictor at that threshold would cost in quality (engine/measure/sparsity.py).
Dense layers take engine/executors/dense.py's executor.

Neurons are taken in clusters of `cluster` consecutive neurons (a cluster is computed when any of its
neurons is chosen): the unit the flash cache reads (DESIGN.md, "Flash layout"); 1 in RAM.

The down projection is read neuron-major, from a second copy downT (ffn, hidden) whose row j is
column j of down, so that a chosen neuron reads one contiguous row; engine/model/layout.py builds it
and the neuron records. Its precision for quantized sources is int8 with one f16 scale per 32 values,
after dividing each hidden dimension by its largest |value| (the kernel multiplies that back once per
output element): without that division SmolLM2's few outlier dimensions set the scale of every block
they sit in. A 4-bit downT ("q4") costs +8.7% perplexity on SmolLM2 and its axpy is no faster
(BENCHMARKS.md); it is kept for measurement only. The dense down stays for prefill.

Each executor keeps its layer's statistics (tokens, neurons chosen, FFN seconds; with `track_truth`
also the true active set for recall and precision), which `pocketinfer eval-sparsity` reports.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from engine.errors import ConfigError
from engine.executors.base import Executor
from engine.executors.dense import DenseFFN
from engine.executors.predictor import LayerPredictor
from engine.model.layout import sparse_arrays
from kernels.activation import DRELU, RELU, glu
from kernels.backend import NUMBA
from kernels.sparse_ffn import predict, select, sparse_ffn

MODES = ("dense", "relu-exact", "predicted", "oracle")
RECORDS = ("off", "copy", "move")
_EMPTY = np.zeros(0, dtype=np.float32)     # "no precomputed gate" for the kernel


@dataclass
class LayerStats:
    tokens: int = 0
    chosen: int = 0         # neurons whose up (and gate, unless relu-exact) rows were read
    true_active: int = 0    # with track_truth: neurons whose |act| exceeds the truth threshold
    hits: int = 0           # with track_truth: chosen and truly active
    seconds: float = 0.0    # FFN wall time, predictor included

    def sparsity(self, ffn: int) -> float:
        return 1.0 - self.chosen / max(1, self.tokens * ffn)


class _Scratch:
    """Buffers the sparse layers of one model share (decode runs one layer at a time)."""

    def __init__(self, hidden: int, ffn: int):
        self.out = np.empty(hidden, np.float32)        # (hidden,) f32 FFN output
        self.idx = np.empty(ffn, np.int32)             # (ffn,) int32 chosen neurons
        self.acts = np.empty(ffn, np.float32)          # (ffn,) f32 their act(gate)*up
        self.scores = np.empty(ffn, np.float32)        # (ffn,) f32 predictor scores


class SparseFFN(Executor):
    """One layer's FFN for one token, over the neurons its mode chooses."""

    kind = "sparse"

    def __init__(self, lw, mode: str, act_kind: int, scratch: _Scratch, *, predictor: LayerPredictor | None = None,
                 oracle_threshold: float | None = None, down_format: str = "auto", cluster: int = 1,
                 records: str = "move"):
        self.mode = mode
        self.dense = DenseFFN(lw, act_kind)        # the oracle's and track_truth's dense activations
        self.act = act_kind
        self.predictor = predictor
        self.oracle_threshold = oracle_threshold
        self.cluster = cluster
        self.scratch = scratch
        self.track_truth = False
        self.stats = LayerStats()
        self.arrays = sparse_arrays(lw, mode != "relu-exact", down_format, records)
        self.lw = lw

    def describe(self) -> str:
        return f"sparse ({self.mode}, clusters of {self.cluster})"

    @property
    def extra_bytes(self) -> int:
        """Memory added for decode: downT and the predictor."""
        return self.arrays.extra_bytes + (self.predictor.nbytes if self.predictor else 0)

    def __call__(self, h: np.ndarray) -> np.ndarray:
        """h (1, hidden) f32, the FFN input after its RMSNorm -> (hidden,) f32 FFN output (a buffer
        reused by the next call)."""
        t0 = time.perf_counter()
        s, st, x = self.scratch, self.stats, h[0]
        threads = _threads()
        gate = _EMPTY
        if self.mode == "predicted":
            p = self.predictor
            n = predict(*p.arrays, x, np.float32(p.threshold), threads, s.scores, s.idx)
        elif self.mode == "relu-exact":
            gate = self.lw.w_gate.matvec(x)                                  # (ffn,) f32
            n = select(gate, np.float32(0.0), s.idx)
        else:
            gate, act = self._dense_act(h)
            n = select(np.abs(act), np.float32(self.oracle_threshold), s.idx)
        idx = s.idx[:n]
        if self.cluster > 1 and n:
            idx = _whole_clusters(idx, self.cluster)
            n = len(idx)
        sparse_ffn(*self.arrays.args, x, idx, gate, self.act, threads, s.acts[:n], s.out)
        st.seconds += time.perf_counter() - t0
        st.tokens += 1
        st.chosen += n
        if self.track_truth:
            self._count_truth(h, idx)
        return s.out

    def _dense_act(self, h):
        """gate (ffn,) and act(gate)*up (ffn,) f32 of every neuron."""
        gate, up = self.dense.gate_up(h)
        gate = gate[0].copy()
        return gate, glu(gate[None, :], up, self.act, np.empty_like(up))[0]

    def _count_truth(self, h, idx) -> None:
        """Recall and precision counts against the true active set (measurement only: recomputes the
        dense activations). Truth is act != 0 for ReLU-family models; otherwise |act| above the
        predictor's label threshold, or the oracle's threshold."""
        _, act = self._dense_act(h)
        if self.mode == "predicted" and self.act not in (RELU, DRELU):
            thr = self.predictor.label_threshold
        elif self.mode == "oracle":
            thr = self.oracle_threshold
        else:
            thr = 0.0
        true = np.abs(act) > thr
        self.stats.true_active += int(true.sum())
        self.stats.hits += int(true[idx].sum())


def decode_ffns(config, layers, modes, *, predictors=None, oracle_thresholds=None, down_format: str = "auto",
                cluster: int = 1, records: str = "move") -> list:
    """One decode FFN executor per layer: SparseFFN for the sparse modes, DenseFFN for "dense".
    records: see engine/model/layout.sparse_arrays ("move" at load, "copy" to measure beside dense)."""
    c = config
    if len(modes) != len(layers):
        raise ConfigError(f"{len(modes)} sparse modes given for {len(layers)} layers")
    if cluster < 1 or c.intermediate_size % cluster:
        raise ConfigError(f"cluster size {cluster} must be positive and divide the FFN size {c.intermediate_size}")
    if records not in RECORDS:
        raise ConfigError(f"records={records!r} is not one of {', '.join(RECORDS)}")
    predictors = predictors or {}
    scratch = _Scratch(c.hidden_size, c.intermediate_size)
    out = []
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
        if mode == "dense":
            out.append(DenseFFN(lw, c.act_kind))
            continue
        out.append(SparseFFN(lw, mode, c.act_kind, scratch, predictor=predictors.get(i), cluster=cluster,
                             oracle_threshold=None if oracle_thresholds is None else oracle_thresholds[i],
                             down_format=down_format, records=records))
    return out


def _threads() -> int:
    if not NUMBA:
        return 1
    import numba
    return numba.get_num_threads()


def _whole_clusters(idx: np.ndarray, cluster: int) -> np.ndarray:
    """idx (n,) int32 ascending -> every neuron of each cluster that idx touches, ascending."""
    cl = np.unique(idx // cluster)
    return (cl[:, None] * cluster + np.arange(cluster, dtype=np.int32)).ravel().astype(np.int32)
