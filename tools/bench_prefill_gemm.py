"""Prefill matmul speed per engine: the int8 GEMM (kernels/gemm.py), ONNX Runtime's MatMulNBits as the
ONNX engine runs it (engine/executors/onnx_graph.matmul in a session of engine/executors/onnx_session.py,
our arrays in place) and the f32 path (dequantized tiles through BLAS), at a 1.1B Llama's kernel shapes,
in GFLOP/s (2 * tokens * rows * cols / time).

    python tools/bench_prefill_gemm.py                             # Q4_0 and Q8_0, 128 and 512 tokens, 1 and 2 threads
    python tools/bench_prefill_gemm.py --formats Q4_1 --tokens 128 --threads 2 --reps 7

Weights are random valid GGUF blocks (tools/bench_kernels.gguf_bytes) converted by the engine's own
loader, so the kernels read the arrays the engine reads, and each call is the engine's call
(Weight.matmul_int8, Weight.matmul). The engines alternate A B A B in each repetition, one thread count
at a time, with a pause after each call: numba's and OpenBLAS's thread pools both spin after a call,
and one waking into the other's spin costs milliseconds. The figure is the median of the repetitions.
Read the ratio column; absolute figures move with the machine's load.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_kernels import TYPE_IDS, gguf_bytes  # noqa: E402

from engine.formats import gguf_quants as gq  # noqa: E402
from engine.threads import set_threads  # noqa: E402

# TinyLlama-1.1B: q|k|v fused (2048 + 2*256 rows), o, gate|up fused (2*5632), down.
SHAPES = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
SETTLE_S = 0.05


def bench(fmt: str, tokens: int, threads: int, reps: int, rng) -> list[dict]:
    rows_out = []
    for name, (rows, cols) in SHAPES.items():
        w = gq.weight_from_gguf(TYPE_IDS[fmt], gguf_bytes(fmt, rows, cols, rng), (rows, cols), fmt, "bench")
        x = rng.standard_normal((tokens, cols), dtype=np.float32)
        set_threads(threads)
        engines = {"int8": w.matmul_int8, "onnx": onnx_matmul(w), "f32": w.matmul}
        for fn in engines.values():                     # compile, fault pages in
            fn(x)
        times = {e: [] for e in engines}
        for _ in range(reps):
            for e, fn in engines.items():
                t0 = time.perf_counter()
                fn(x)
                times[e].append(time.perf_counter() - t0)
                time.sleep(SETTLE_S)
        flop = 2.0 * tokens * rows * cols
        g = {e: flop / statistics.median(t) / 1e9 for e, t in times.items()}
        rows_out.append(dict(format=fmt, shape=name, rows=rows, cols=cols, tokens=tokens, threads=threads, **g))
    return rows_out


def onnx_matmul(w):
    """x -> x @ w.T through the ONNX engine's graph for one weight, in a session on w's arrays."""
    import onnxruntime as ort

    from engine.executors import onnx_graph
    from engine.executors.onnx_session import open_session

    session = open_session(ort, onnx_graph.matmul(w))
    return lambda x: session.run(None, {"x": x})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="Q4_0,Q8_0")
    ap.add_argument("--tokens", default="128,512")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", file=sys.stderr)
    print("| format | shape (rows x cols) | tokens | threads | int8 GEMM GFLOP/s | ONNX Runtime GFLOP/s | "
          "f32 BLAS GFLOP/s | int8 / f32 | ONNX / f32 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for fmt in args.formats.split(","):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                for r in bench(fmt, tokens, threads, args.reps, rng):
                    print(f"| {fmt} | {r['shape']} {r['rows']}x{r['cols']} | {tokens} | {threads} | {r['int8']:.1f} | "
                          f"{r['onnx']:.1f} | {r['f32']:.1f} | {r['int8'] / r['f32']:.2f} | {r['onnx'] / r['f32']:.2f} |",
                          flush=True)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}", file=sys.stderr)


if __name__ == "__main__":
    main()
