"""The ONNX Runtime prefill executor: every layer of a prompt in one ONNX Runtime session (the graph of
engine/executors/onnx_graph.py), the door to the execution providers of phone NPUs (QNN, NNAPI,
XNNPACK) where the onnxruntime build has them.

- The session runs on our weight arrays, used in place (engine/executors/onnx_session.py), so ORT holds
  no copy of the quantized bytes it reads as stored (Q4_0, Q4_1; onnx_graph says what it gets copies
  of), but its own prepacked one. `describe` reports the bytes made for ORT and the RSS the session added.
- The session is made lazily, on the first prompt (the load's warm-up), once per KV cache element type;
  its model file is cached on disk (onnx_session).
- The prompt's keys and values come back per layer and are written into our KV cache in its layout and
  element type; earlier positions (a chat's previous turns) go in as the graph's past, so the numba
  decode and prefix reuse continue as with any prefill.
- Providers come from the plan (plan.json prefill.providers, which the planner takes from
  onnxruntime.get_available_providers()); those this build lacks are skipped, and CPU is always last.

Failure is a fallback, never a crash: when onnx or onnxruntime is missing (Termux), the graph cannot
express the model (UnsupportedGraph) or ORT fails to make the session or to run it, the `fallback`
executor (the layer-by-layer stack on the next engine) runs the prompt instead, from then on, and
`describe` says why in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine.executors.base import Executor
from engine.executors.onnx_session import CPU, first_line, open_session, ort_errors
from kernels.attention import allowed_positions


class OnnxPrefill(Executor):
    kind = "ONNX Runtime"

    def __init__(self, config, layers, fallback, providers: tuple[str, ...] = (CPU,), cache_dir: Path | None = None,
                 threads: int | None = None):
        """layers: the model's LayerWeights (fused by engine/model/layout.py); fallback: the phase
        executor that runs the prompt when ORT cannot; providers: ORT execution providers, in order of
        preference; cache_dir: where model files are kept (None: $POCKETINFER_HOME/onnx); threads: ORT's intra-op
        threads (None: engine.threads' setting)."""
        self.config = config
        self.layers = layers
        self.fallback = fallback
        self.providers = tuple(providers)
        self.cache_dir = cache_dir
        self.threads = threads
        self.sessions: dict[bool, object] = {}       # half KV cache? -> onnx_session.Session
        self.extra_bytes = 0
        self.session_bytes = 0                        # RSS that making the session added (ORT's prepacking)
        self.used_providers: list[str] = []
        self.reason: str | None = None                # why the fallback runs, once it does
        if not config.llama_layers:
            self.reason = (f"the graph builds Llama layers, not {config.model_type}'s (q/k norms, output norms, "
                           "per-layer windows or RoPE bases)")
            return
        try:
            import onnx  # noqa: F401  (the graph builder's)
            import onnxruntime as ort
        except ImportError as e:
            self.reason = f"{e.name} is not installed"
            return
        self.ort = ort
        self.errors = ort_errors(ort)

    def layer_descriptions(self):
        if self.reason is not None:
            return [(i, f"{text} (ONNX Runtime not used: {self.reason})")
                    for i, text in self.fallback.layer_descriptions()]
        extra = (f", {self.extra_bytes / 2**20:.1f} MiB made for ORT, session +{self.session_bytes / 2**20:.0f} MiB"
                 if self.sessions else "")
        providers = ",".join(p.removesuffix("ExecutionProvider") for p in (self.used_providers or self.providers))
        text = f"all layers in one ONNX Runtime session ({providers}; MatMulNBits on the stored blocks{extra})"
        return [(i, text) for i in range(self.config.num_hidden_layers)]

    def reports(self):
        return self.fallback.reports()

    def run(self, x: np.ndarray, cache, start: int, cos: np.ndarray, sin: np.ndarray) -> None:
        """x (n, hidden) f32 in place; cos, sin (1, n, head_dim/2) f32 for positions start..start+n-1 (one
        RoPE: choose() gives ONNX Runtime only models of Llama layers)."""
        if self.reason is None:
            try:
                self._run(x, cache, start, cos, sin)
                return
            except self.errors as e:
                if self.reason is None:           # else _session gave up already, and said why
                    self._give_up(f"ONNX Runtime failed to run the prompt: {first_line(e)}")
        self.fallback.run(x, cache, start, cos, sin)

    def _give_up(self, reason: str) -> None:
        self.reason = reason
        self.sessions.clear()

    def _run(self, x, cache, start, cos, sin) -> None:
        c = self.config
        half = cache.dtype == np.uint16
        session = self._session(half)
        n, end = x.shape[0], start + x.shape[0]
        group = c.num_attention_heads // c.num_key_value_heads
        allowed = allowed_positions(start, n, c.window)                                  # (n, end) bool
        mask = np.tile(np.where(allowed, np.float32(0), np.float32(-np.inf)), (group, 1))   # (group*n, end) f32
        feeds = {"x": x, "cos": np.ascontiguousarray(cos[0]), "sin": np.ascontiguousarray(sin[0]),
                 "position_ids": np.arange(n, dtype=np.int64)[None], "mask": mask}
        for i in range(c.num_hidden_layers):
            for name, store in (("past_k", cache.k[i]), ("past_v", cache.v[i])):
                past = np.ascontiguousarray(store[:, :start])                         # (kv_heads, start, hd)
                feeds[f"{name}.{i}"] = past.view(np.float16) if half else past
        out = session.run(None, feeds)
        x[:] = out[0]
        for i in range(c.num_hidden_layers):
            k, v = out[1 + 2 * i], out[2 + 2 * i]                                     # (kv_heads, n, hd)
            cache.k[i][:, start:end] = k.view(np.uint16) if half else k
            cache.v[i][:, start:end] = v.view(np.uint16) if half else v

    def _session(self, half: bool):
        if half not in self.sessions:
            try:
                self.sessions[half] = self._make_session(half)
            except self.errors as e:
                self._give_up(f"ONNX Runtime could not make the session: {first_line(e)}")
                raise
        return self.sessions[half]

    def _make_session(self, half: bool):
        from engine.executors import onnx_graph

        try:
            graph = onnx_graph.build(self.config, self.layers, half)
        except onnx_graph.UnsupportedGraph as e:
            raise ValueError(f"the graph cannot express the model: {e}") from None
        self.extra_bytes = graph.extra_bytes
        session = open_session(self.ort, graph, self.providers, self.threads, self.cache_dir)
        self.session_bytes = session.rss_added
        self.used_providers = session.providers
        return session

