"""The cost model: predicted time per token and bytes for each way of running a layer, from the device
profile's measured speeds and the model's shapes.

Decode is bound by bytes read: a matrix costs nbytes / speed, where speed is the matvec kernel's
measured GB/s at the nearest weight size, capped by the streaming figure (decode walks the whole model
every token, so caches only help within one matrix). FFN neurons read from flash cost bytes / the
storage throughput at the request size used; reads overlap the compute of what is already resident
(PowerInfer-2, section 4.4, I/O-compute pipeline), so a layer takes max(compute, I/O).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.flash.matrix import CHUNK_BYTES as FLASH_CHUNK_BYTES
from planner.device import PREDICT, DeviceProfile

# Where the device profile has no measured sparse kernel ("sparse_q4_1"), a sparse FFN is assumed to run
# at this share of the dense kernel's GB/s on the rows it reads (gathered rows defeat part of the
# prefetching).
SPARSE_EFFICIENCY = 0.6
# Process memory beyond the weights and KV cache: the interpreter with numpy, numba and tokenizers
# (~76 MiB once the compiler's pages are given back), the loaded kernels (~10), the tokenizer (~8),
# rope tables and scratch: peak RSS minus resident weights minus KV cache for SmolLM2-135M Q4_1
# generating 256 tokens (`python tools/check_plan.py`, BENCHMARKS.md), with ~7% margin.
RUNTIME_BASE_BYTES = 128 << 20
KV_TOKENS = 512            # tokens of KV cache the memory prediction counts (prompt + 256 generated, rounded up)
TTFT_PROMPT_TOKENS = 128   # the prompt length TTFT is predicted for


@dataclass(frozen=True)
class ModelShape:
    n_layers: int
    hidden: int
    ffn: int
    vocab: int
    fmt: str                   # kernel family of the FFN weights: "q4_1", "q8_0" or "f32"
    attn_bytes: int            # per layer: wq, wk, wv, wo
    ffn_bytes: int             # per layer: gate, up, down
    embed_bytes: int
    lm_head_bytes: int         # 0 when tied to the embeddings (counted once)
    norm_bytes: int            # all norm vectors
    kv_bytes_per_token: int    # all layers, K and V, in the cache's element type (engine/llm.py)
    attn_matrix_bytes: int     # the largest attention matrix (for the kernel-speed lookup)
    # The FFN weights' storage as loaded ("q4_0", "q4_1", "int8/32", "f32", ...), for people to read
    # (plan.json's model.format); fmt above is the kernel family whose measured speed applies.
    weight_format: str = ""
    # Whether the runtime can stream the embeddings / LM head from the weights file when the budget
    # cannot hold them (engine/flash/matrix.py reads GGUF tensors; not safetensors yet).
    head_streamable: bool = False
    # An untied GGUF token table stays in the file mapping and only looked-up rows become resident
    # (engine/formats/mapped_rows.py): the budget counts embed_resident_bytes of it, not all of it.
    embed_mapped: bool = False
    # One neuron's bundle record as planner/bundles.py writes it (down re-stored transposed, so it is
    # not ffn_bytes / ffn: SmolLM2's Q4_1 neurons are 1080 bytes in the GGUF, 1332 as bundles); 0:
    # unknown, use the source's bytes per neuron.
    record_bytes: int = 0

    @property
    def bundle_bytes(self) -> float:
        """One neuron's gate row + up row + down column, as stored in the bundle file."""
        return float(self.record_bytes) if self.record_bytes else self.ffn_bytes / self.ffn

    def hot_ffn_bytes(self, hot: int, mode: str) -> int:
        """Memory of a layer's `hot` resident neurons: a fully resident dense layer keeps the source's
        own matrices (its bytes), any other keeps bundles (down re-stored transposed)."""
        return self.ffn_bytes if mode == "dense" and hot == self.ffn else round(hot * self.bundle_bytes)

    @property
    def weight_bytes(self) -> int:
        return (self.n_layers * (self.attn_bytes + self.ffn_bytes) + self.embed_bytes + self.lm_head_bytes
                + self.norm_bytes)

    @property
    def embed_resident_bytes(self) -> int:
        """Memory the token table takes: all of it, or for a table left in the file mapping the pages of
        the rows KV_TOKENS tokens look up, at most two 4 KiB pages each."""
        return min(self.embed_bytes, KV_TOKENS * 2 * 4096) if self.embed_mapped else self.embed_bytes

    @property
    def fixed_bytes(self) -> int:
        """Always resident: embeddings (a mapped table's looked-up rows), lm_head, attention and norms
        (PowerInfer-2 keeps these in memory and offloads only FFN neurons)."""
        return self.weight_bytes - self.n_layers * self.ffn_bytes - self.embed_bytes + self.embed_resident_bytes

    @property
    def head_bytes(self) -> int:
        """The embeddings and (untied) LM head."""
        return self.embed_bytes + self.lm_head_bytes

    @property
    def fixed_bytes_head_on_flash(self) -> int:
        """Always resident when the embeddings / LM head stream from flash: attention, norms and the
        streaming buffers (engine/flash/matrix.py: two chunk buffers and a row buffer per matrix, each
        widened to 4096-byte bounds)."""
        mats = [self.embed_bytes] + ([self.lm_head_bytes] if self.lm_head_bytes else [])
        buffers = sum(2 * (min(FLASH_CHUNK_BYTES, b) + 2 * 4096) + b // self.vocab + 2 * 4096 for b in mats)
        return self.fixed_bytes - self.embed_resident_bytes - self.lm_head_bytes + buffers


def weight_format(wt) -> str:
    """A weight's storage as loaded (engine/model/weights.py): "q4_0", "q4_1", "q5_0", "q5_1", "q6", "int8/32"
    (int8 in blocks of 32), "int8/16+min", "f16", "bf16" or "f32"."""
    from engine.model.weights import BF16Weight, F16Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight
    if isinstance(wt, Q4Weight):
        return "q4_1" if wt.m.shape[1] else "q4_0"
    if isinstance(wt, Q5Weight):
        return "q5_1" if wt.m.shape[1] else "q5_0"
    if isinstance(wt, Q6Weight):
        return "q6"
    if isinstance(wt, I8Weight):
        return f"int8/{wt.q.shape[1] // wt.d.shape[1]}" + ("+min" if wt.m.shape[1] else "")
    if isinstance(wt, BF16Weight):
        return "bf16"
    if isinstance(wt, F16Weight):
        return "f16"
    return "f32"


def shape_of(llm) -> ModelShape:
    from engine.formats.mapped_rows import MappedRows
    from engine.model.weights import F32Weight, I8Weight, Q4Weight, Q5Weight, Q6Weight
    from planner.bundles import layer_arrays

    c = llm.config
    w = llm.model.weights
    lw = w.layers[0]
    # Q5 and Q6 rows take the Q4 row dots (kernels/rowdot.py), with a fifth or half of the bytes more.
    fmt = {Q4Weight: "q4_1", Q5Weight: "q4_1", Q6Weight: "q4_1", I8Weight: "q8_0",
           F32Weight: "f32"}.get(type(lw.w_gate), "f32")
    attn = [lw.wq, lw.wk, lw.wv, lw.wo]
    norms = sum(x.attn_norm.nbytes + x.ffn_norm.nbytes for x in w.layers) + w.norm.nbytes
    return ModelShape(n_layers=c.num_hidden_layers, hidden=c.hidden_size, ffn=c.intermediate_size,
                      vocab=c.vocab_size, fmt=fmt, weight_format=weight_format(lw.w_gate),
                      attn_bytes=sum(m.nbytes for m in attn),
                      ffn_bytes=lw.w_gate.nbytes + lw.w_up.nbytes + lw.w_down.nbytes,
                      embed_bytes=w.embed.nbytes, lm_head_bytes=0 if w.lm_head is w.embed else w.lm_head.nbytes,
                      norm_bytes=norms,
                      kv_bytes_per_token=(2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim
                                          * np.dtype(llm.model.kv_dtype).itemsize),
                      attn_matrix_bytes=max(m.nbytes for m in attn),
                      head_streamable=str(llm.source).lower().endswith(".gguf"),
                      embed_mapped=isinstance(w.embed, MappedRows),
                      record_bytes=sum(a.itemsize * a.shape[1] for a in layer_arrays(lw)[0]))


class CostModel:
    def __init__(self, device: DeviceProfile, shape: ModelShape):
        self.dev = device
        self.shape = shape
        k = device.kernels
        self.stream = k.stream_gbps() * 1e9
        prefix = f"matvec_{shape.fmt}" if shape.fmt != "f32" else "gemv_f32"
        self._speed = lambda nbytes: min(k.matvec_gbps(nbytes, prefix) * 1e9, self.stream)
        self.gemv_f32 = min(k.matvec_gbps(1, "gemv_f32") * 1e9, device.memory.read_gbps * 1e9)
        # Bytes per second of the int8 predictor kernel; profiles from before it was measured (and the
        # example phone profiles) take the f32 GEMV's figure.
        self.predict_bps = (min(k.matvec_gbps(1, PREDICT) * 1e9, device.memory.read_gbps * 1e9) if k.has(PREDICT)
                            else self.gemv_f32)
        self.call_s = max(device.overhead.numba_parallel_call_us, device.overhead.python_call_us) * 1e-6
        # Multiplies every compute term; 1 until calibrate() is given a measured decode step.
        self.compute_scale = 1.0
        # Seconds per layer of the flash FFN streaming every neuron, when measured on this machine
        # (calibrate_flash); else flash layers are modelled from the kernel, scatter and storage figures.
        self.flash_layer_s: float | None = None
        self.measured_step_s: float | None = None
        self.kernel_step_s: float | None = None

    def calibrate(self, decode_step_s: float) -> None:
        """Scale the compute terms so that the all-resident dense decode step equals one measured on this
        model and device. The kernel figures come from single matrices (one shape, cache-warm or one long
        stream) and miss what a whole model's step pays: dozens of small matrices each starting a new
        stream, fork/join per matvec, attention and the Python between layers. On SmolLM2 they predicted
        314 tok/s where the engine decodes ~200."""
        self.compute_scale = 1.0
        self.kernel_step_s = self.fixed_decode_s() + self.shape.n_layers * self.dense_ffn_s()
        self.compute_scale = decode_step_s / self.kernel_step_s
        self.measured_step_s = decode_step_s

    # ------------------------------------------------------------ per-token pieces (seconds)

    def head_read_s(self) -> float:
        """Per token with the embeddings / LM head on flash: one sequential pass over the LM head in
        chunk-sized requests plus one random read for the token's embedding row."""
        s = self.shape
        head, _ = self.read_s(s.lm_head_bytes or s.embed_bytes, FLASH_CHUNK_BYTES, "sequential")
        row, _ = self.read_s(4096, 4096)
        return head + row

    def fixed_decode_s(self, head_on_flash: bool = False) -> float:
        """Attention, lm_head and per-call overheads of one token, all layers. With the LM head on flash
        its reads overlap its compute chunk by chunk (engine/flash/matrix.py), so it costs the longer
        of the two."""
        s = self.shape
        attn = s.n_layers * s.attn_bytes / self._speed(s.attn_matrix_bytes)
        head = (s.lm_head_bytes or s.embed_bytes) / self._speed(s.lm_head_bytes or s.embed_bytes)
        if head_on_flash:
            return (attn + kv_calls(self)) * self.compute_scale + max(head * self.compute_scale, self.head_read_s())
        return (attn + head + kv_calls(self)) * self.compute_scale

    def dense_ffn_s(self) -> float:
        return self.shape.ffn_bytes / self._speed(self.shape.ffn_bytes // 3) * self.compute_scale

    def sparse_gbps(self, n_neurons: float) -> float:
        """GB/s of the sparse FFN kernel on the rows it reads, for n_neurons of this model's layer: the
        device profile's "sparse_q4_1" figure at the nearest bytes read, else SPARSE_EFFICIENCY of the
        dense kernel's (profiles written before it was measured, and the example phone profiles)."""
        nbytes = max(1.0, n_neurons * self.shape.bundle_bytes)
        if self.sparse_measured:
            return self.dev.kernels.matvec_gbps(int(nbytes), "sparse_q4_1") * 1e9
        return self._speed(self.shape.ffn_bytes // 3) * SPARSE_EFFICIENCY

    @property
    def sparse_measured(self) -> bool:
        """Whether the device profile has measured the sparse FFN kernel ("sparse_q4_1" points)."""
        return self.dev.kernels.has("sparse_q4_1")

    def sparse_ffn_s(self, active_share: float, predictor_bytes: int) -> float:
        """The predictor kernel plus the predicted-active rows at the sparse kernel's speed."""
        n = active_share * self.shape.ffn
        rows = n * self.shape.bundle_bytes / self.sparse_gbps(n)
        return (predictor_bytes / self.predict_bps + rows + 2 * self.call_s) * self.compute_scale

    def calibrate_flash(self, layer_s: float) -> None:
        """A measured flash layer streaming every neuron (planner/decode_probe.measure_flash_layer)."""
        self.flash_layer_s = layer_s

    def dense_flash_layer_s(self, hot: int) -> tuple[float, float]:
        """(seconds, of which reading) of a dense layer with `hot` of its neurons resident, the rest
        streamed from flash every token. With a measured flash layer: its time per streamed neuron for
        the cold ones plus the sparse kernels' for the hot; else the longer of compute and reads."""
        s = self.shape
        cold_bytes = (s.ffn - hot) * s.bundle_bytes
        io, _ = self.read_s(cold_bytes, self.stream_request(), "sequential")
        if self.flash_layer_s is not None:
            hot_s = hot * s.bundle_bytes / self.sparse_gbps(s.ffn) * self.compute_scale
            return self.flash_layer_s * (s.ffn - hot) / s.ffn + hot_s, io
        return max(self.flash_ffn_s(s.ffn, s.ffn - hot), io), io

    def flash_ffn_s(self, n_needed: float, n_landed: float) -> float:
        """Compute of a layer run by the flash FFN (engine/executors/flash_ffn.py): every needed neuron through the
        sparse kernels (resident and landed alike), each landed bundle first copied from its read buffer
        into a slot (kernels/records.py, at the profile's "scatter" speed)."""
        rows = n_needed * self.shape.bundle_bytes / self.sparse_gbps(n_needed)
        pts = [p for p in self.dev.kernels.matvec if p.name == "scatter"]
        copy = n_landed * self.shape.bundle_bytes / (pts[0].gbps * 1e9) if pts else 0.0
        return (rows + copy + 2 * self.call_s) * self.compute_scale

    def io_threads(self) -> int:
        """Reader threads a plan gives the runtime: the best count for large requests on this device
        (each thread holds two request buffers, so more threads cost staging memory; small-request plans
        are clamped to it, engine/flash_ffn.io_layout)."""
        return self.dev.storage.best_threads(1 << 20, "random")

    def merge_gap(self) -> int:
        """Bundles of a gap between two misses worth reading through instead of splitting the request
        (engine/flash/reader.merge_runs): the largest gap, at most 8, for which one request over both
        bundles and the gap is predicted to take no longer than two one-bundle requests, from the device
        profile's random-read speed at those request sizes."""
        R = max(1, round(self.shape.bundle_bytes))

        def cost(n: int) -> float:
            span = -(-n * R // 4096) * 4096
            return self.read_s(span, span)[0]

        two = 2 * cost(1)
        return max((g for g in range(9) if cost(2 + g) <= two), default=0)

    def stream_request(self) -> int:
        """Request size for streaming a layer's cold neurons: large requests read fastest (1 MiB), but
        the runtime keeps a few request buffers and a request-sized staging ring, so a request is at
        most a quarter of a layer's bundles (at least 64 KiB), 4096-aligned."""
        layer = self.shape.ffn * self.shape.bundle_bytes
        req = min(1 << 20, max(64 << 10, int(layer) // 4))
        return req // 4096 * 4096

    def staging_bytes(self) -> int:
        """The flash FFN's read buffers and staging ring (engine/flash_ffn.io_bytes) at the largest
        request the plans use (stream_request) and io_threads(): held whenever anything lives on flash."""
        from engine.executors.flash_ffn import io_bytes

        s = self.shape
        return io_bytes(max(1, round(s.bundle_bytes)), s.ffn, self.io_threads(), self.stream_request())

    def read_s(self, nbytes: float, request_bytes: int, pattern: str = "random") -> tuple[float, int]:
        """Seconds to read nbytes from flash in requests of request_bytes, and the reader threads used."""
        if nbytes <= 0:
            return 0.0, 0
        st = self.dev.storage
        threads = st.best_threads(request_bytes, "random")
        mbps = st.mbps(request_bytes, threads, "random")
        if pattern == "sequential":
            mbps = max(mbps, st.mbps(request_bytes, None, "sequential"))
        return nbytes / (mbps * 1e6), threads

    def prefill_s(self, n_tokens: int, gflops: float) -> float:
        """Dense prefill: 2 flops per weight per token through BLAS, plus the tile dequantization, which
        reads every weight once per chunk (as a matvec would)."""
        s = self.shape
        weights = s.weight_bytes - s.embed_bytes + (s.lm_head_bytes or s.embed_bytes)
        params = weights / _bytes_per_weight(s.fmt)
        return 2.0 * params * n_tokens / (gflops * 1e9) + weights / self.stream


def kv_calls(cost: CostModel) -> float:
    """Reading the KV cache at the mean context, and the per-call overheads (qkv, attention, o, FFN per
    layer), of one token."""
    s = cost.shape
    kv = s.kv_bytes_per_token * (KV_TOKENS // 2) / (cost.dev.memory.read_gbps * 1e9)
    return kv + s.n_layers * 4 * cost.call_s


def _bytes_per_weight(fmt: str) -> float:
    return {"q4_1": 0.625, "q8_0": 1.0625, "f32": 4.0}[fmt]
