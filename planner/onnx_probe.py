"""The ONNX prefill engine's matmul timed on this device, per ONNX Runtime execution provider: the graph
the engine runs for one weight (engine/executors/onnx_graph.matmul: MatMulNBits on the stored blocks),
in a session made as the engine makes it (engine/executors/onnx_session.py)."""

from __future__ import annotations

import time

import numpy as np


def onnx_gflops(w, x: np.ndarray, threads: int, seconds: float = 0.3) -> tuple[dict[str, float], list[str]]:
    """({"onnx:<provider>": GFLOP/s}, notes on providers that failed) for x (n, cols) f32 @ w.T.
    Raises ImportError when onnx or onnxruntime is absent."""
    import onnx  # noqa: F401  (the graph builder's)
    import onnxruntime as ort

    from engine.executors import onnx_graph
    from engine.executors.onnx_session import CPU, first_line, open_session, ort_errors

    graph = onnx_graph.matmul(w)
    flops = 2.0 * x.shape[0] * w.shape[0] * w.shape[1]
    out, notes = {}, []
    # Azure's provider runs models remotely; it is not a local accelerator.
    for ep in [p for p in ort.get_available_providers() if p != "AzureExecutionProvider"]:
        try:
            session = open_session(ort, graph, (ep,), threads)
            if ep not in session.providers[:1] and ep != CPU:
                notes.append(f"{ep}: took none of the graph")
                continue
            session.run(None, {"x": x})
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                session.run(None, {"x": x})
                calls += 1
            out[f"onnx:{ep}"] = round(flops * calls / (time.perf_counter() - t0) / 1e9, 1)
        except ort_errors(ort) as e:
            notes.append(f"{ep}: {first_line(e)}")
    return out, notes
