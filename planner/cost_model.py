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

from planner.device import DeviceProfile

# Until kernels/sparse_ffn.py exists and is measured, a sparse FFN is assumed to run at this share of
# the dense kernel's GB/s on the rows it reads (gathered rows defeat part of the prefetching).
SPARSE_EFFICIENCY = 0.6
# Process memory beyond the weights and KV cache: the interpreter with numpy, numba and tokenizers
# (~97 MiB after imports) plus tokenizer tables, rope tables and scratch. Measured here as peak RSS minus
# weight bytes for SmolLM2-135M Q4_1 generating 64 tokens: 178 MiB.
RUNTIME_BASE_BYTES = 178 << 20
KV_TOKENS = 512            # tokens of KV cache the memory prediction counts (prompt + 256 generated, rounded up)
TTFT_PROMPT_TOKENS = 128   # the prompt length TTFT is predicted for
IO_STAGING_BYTES = 4 << 20  # aligned read buffers for in-flight requests when anything lives on flash (at most one layer's FFN)


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
    kv_bytes_per_token: int    # all layers, K and V, f32
    attn_matrix_bytes: int     # the largest attention matrix (for the kernel-speed lookup)

    @property
    def bundle_bytes(self) -> float:
        """One neuron's gate row + up row + down column."""
        return self.ffn_bytes / self.ffn

    @property
    def weight_bytes(self) -> int:
        return (self.n_layers * (self.attn_bytes + self.ffn_bytes) + self.embed_bytes + self.lm_head_bytes
                + self.norm_bytes)

    @property
    def fixed_bytes(self) -> int:
        """Always resident: embeddings, lm_head, attention and norms (PowerInfer-2 keeps these in memory
        and offloads only FFN neurons)."""
        return self.weight_bytes - self.n_layers * self.ffn_bytes


def shape_of(llm) -> ModelShape:
    from engine.weights import F32Weight, I8Weight, Q4Weight

    c = llm.config
    w = llm.model.weights
    lw = w.layers[0]
    fmt = {Q4Weight: "q4_1", I8Weight: "q8_0", F32Weight: "f32"}.get(type(lw.w_gate), "f32")
    attn = [lw.wq, lw.wk, lw.wv, lw.wo]
    norms = sum(x.attn_norm.nbytes + x.ffn_norm.nbytes for x in w.layers) + w.norm.nbytes
    return ModelShape(n_layers=c.num_hidden_layers, hidden=c.hidden_size, ffn=c.intermediate_size,
                      vocab=c.vocab_size, fmt=fmt, attn_bytes=sum(m.nbytes for m in attn),
                      ffn_bytes=lw.w_gate.nbytes + lw.w_up.nbytes + lw.w_down.nbytes,
                      embed_bytes=w.embed.nbytes, lm_head_bytes=0 if w.lm_head is w.embed else w.lm_head.nbytes,
                      norm_bytes=norms, kv_bytes_per_token=2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 4,
                      attn_matrix_bytes=max(m.nbytes for m in attn))


class CostModel:
    def __init__(self, device: DeviceProfile, shape: ModelShape):
        self.dev = device
        self.shape = shape
        k = device.kernels
        self.stream = k.stream_gbps() * 1e9
        prefix = f"matvec_{shape.fmt}" if shape.fmt != "f32" else "gemv_f32"
        self._speed = lambda nbytes: min(k.matvec_gbps(nbytes, prefix) * 1e9, self.stream)
        self.gemv_f32 = min(k.matvec_gbps(1, "gemv_f32") * 1e9, device.memory.read_gbps * 1e9)
        self.call_s = max(device.overhead.numba_parallel_call_us, device.overhead.python_call_us) * 1e-6
        # Multiplies every compute term; 1 until calibrate() is given a measured decode step.
        self.compute_scale = 1.0
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

    def fixed_decode_s(self) -> float:
        """Attention, lm_head and per-call overheads of one token, all layers."""
        s = self.shape
        attn = s.n_layers * s.attn_bytes / self._speed(s.attn_matrix_bytes)
        head = (s.lm_head_bytes or s.embed_bytes) / self._speed(s.lm_head_bytes or s.embed_bytes)
        kv = s.kv_bytes_per_token * (KV_TOKENS // 2) / (self.dev.memory.read_gbps * 1e9)   # mean context
        calls = s.n_layers * 4 * self.call_s   # qkv, attention, o, FFN per layer
        return (attn + head + kv + calls) * self.compute_scale

    def dense_ffn_s(self) -> float:
        return self.shape.ffn_bytes / self._speed(self.shape.ffn_bytes // 3) * self.compute_scale

    def sparse_ffn_s(self, active_share: float, predictor_bytes: int) -> float:
        """Predictor GEMVs plus the predicted-active rows at SPARSE_EFFICIENCY of the dense speed."""
        rows = active_share * self.shape.ffn_bytes / (self._speed(self.shape.ffn_bytes // 3) * SPARSE_EFFICIENCY)
        return (predictor_bytes / self.gemv_f32 + rows + 2 * self.call_s) * self.compute_scale

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


def _bytes_per_weight(fmt: str) -> float:
    return {"q4_1": 0.625, "q8_0": 1.0625, "f32": 4.0}[fmt]
