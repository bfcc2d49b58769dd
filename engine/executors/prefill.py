"""The prefill engines: which kernels multiply a prompt's tokens by the weights in the layer-by-layer
prefill (engine/executors/stack.py and the dense FFN).

- "int8": each token's x rounded to int8 per block of 32 and integer dot products on the weights as they
  are stored (kernels/gemm.py), for the Q4, Q5 and 32-block I8 layouts (Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q8_0);
  weights in other layouts take the f32 path. It rounds x as decode and llama.cpp do.
- "f32": tiles of the weight dequantized to f32, then BLAS (engine/model/weights.Weight.matmul).
- "onnx": not a matmul but a phase executor: every layer in one ONNX Runtime session
  (engine/executors/onnx_prefill.py), with int8 or f32 as its fallback (the plan's prefill.fallback).
The default (`default_engine`) is int8 where the int8 GEMM's rows-in-lanes form runs (numba on a CPU
with AVX-512 VNNI, kernels/lanetile.py), which measured faster than f32 BLAS on every shape and model
tried (BENCHMARKS.md "Prefill engines"); elsewhere f32, since the rows-in-turn form of other CPUs beat
BLAS only on wide matrices. The planner (`pocketinfer plan`) measures the engines on the device and
writes the fastest into plan.json's prefill.engine; `load(prefill=)` and `--prefill` override either.
"""

from __future__ import annotations

ENGINES = ("int8", "onnx", "f32")
MATMUL_ENGINES = ("int8", "f32")        # the engines the layer-by-layer stack multiplies with
LABELS = {"int8": "int8 GEMM", "onnx": "ONNX Runtime", "f32": "f32 BLAS"}


def default_engine() -> str:
    from kernels.gemm import LANES_FORM

    return "int8" if LANES_FORM else "f32"


def f32(w, x):
    """x (n, cols) f32 -> (n, rows) f32 = x @ w.T through BLAS on f32 tiles."""
    return w.matmul(x)


def int8(w, x):
    """x (n, cols) f32 -> (n, rows) f32 = x @ w.T with x rounded to int8 per block (f32 where w's layout
    has no integer kernel)."""
    return w.matmul_int8(x)


def matmul_of(engine: str):
    """The matmul function of a matmul engine's name."""
    if engine not in MATMUL_ENGINES:
        raise ValueError(f"prefill engine {engine!r} is not one of {', '.join(MATMUL_ENGINES)}")
    return {"int8": int8, "f32": f32}[engine]
