"""Measure this machine into a DeviceProfile: CPU topology, memory bandwidth, flash reads, kernel
speeds at model shapes and call overheads. The whole run takes well under 60 s (each figure is the
best of a few short timed loops: on a shared machine the best run is the least disturbed one).

Linux sysfs/procfs give the topology; elsewhere the fields fall back to psutil/os and say "unknown".
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np

from planner.device import (
    PREDICT,
    CoreCluster,
    CpuInfo,
    DeviceProfile,
    KernelInfo,
    KernelPoint,
    MemoryInfo,
    Overhead,
    StorageInfo,
)

Progress = Callable[[str], None]

# Weight shapes (rows, cols) timed by default: SmolLM2-135M's gate|up and down, and one Llama-7B FFN
# matrix (11008 x 4096 would take ~25 MB at Q4; a quarter of its rows keeps the same row length, is
# still far larger than any L2/L3 slice, and times faster).
DEFAULT_SHAPES = ((3072, 576), (576, 1536), (2752, 4096))
# SIMD features that decide kernel speed; anything else in /proc/cpuinfo is left out.
_SIMD = {"sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
         "amx_int8", "neon", "asimd", "asimdhp", "asimddp", "sve", "sve2", "i8mm", "bf16", "fphp"}
SECONDS_PER_KERNEL = 0.2
# Raised whenever a kernel or engine the probe times changes, so that a profile cached by older code is
# measured again (planner/pipeline.load_device).
PROBE_VERSION = 1

STREAM = "matvec_q4_1_stream"
STREAM_MATRICES = 14   # x 6.7 MiB = 94 MiB, beyond the largest last-level caches of laptops and phones


def profile_device(path: Path, threads: int | None = None, shapes=DEFAULT_SHAPES,
                   progress: Progress | None = None) -> DeviceProfile:
    """Measure everything; `path` is the directory whose filesystem is measured (where models live)."""
    from engine.threads import set_threads
    from planner import flash_probe

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    threads = set_threads(threads)
    say("cpu topology")
    cpu = cpu_info()
    say("memory bandwidth")
    memory = memory_info(threads)
    say("storage reads")
    direct, method, reads = flash_probe.measure(Path(path), max(2, min(4, cpu.logical_cores)))
    storage = StorageInfo(path=str(Path(path).resolve()), fs_type=flash_probe.fs_type(Path(path)), direct_io=direct,
                          method=method, reads=reads)
    say("kernels")
    kernels = kernel_info(threads, shapes)
    say("call overhead")
    overhead = overhead_info()
    return DeviceProfile(name=platform.node() or "this machine", kind="measured", cpu=cpu, memory=memory,
                         storage=storage, kernels=kernels, overhead=overhead,
                         duration_s=round(time.perf_counter() - t0, 1), probe_version=PROBE_VERSION)


# ---------------------------------------------------------------- cpu

def cpu_info() -> CpuInfo:
    import psutil

    logical = os.cpu_count() or 1
    physical = psutil.cpu_count(logical=False) or logical
    text = _read("/proc/cpuinfo")
    model, flags = platform.processor() or platform.machine() or "unknown", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and value.strip():
            model = value.strip()
        elif key in ("flags", "features"):
            flags |= set(value.split())
    return CpuInfo(model=model, physical_cores=physical, logical_cores=logical, clusters=_clusters(logical),
                   simd=tuple(sorted(flags & _SIMD)))


def _clusters(logical: int) -> tuple[CoreCluster, ...]:
    """Cores grouped by cpuinfo_max_freq (big.LITTLE), fastest first; one cluster at 0 MHz without sysfs."""
    by_freq: dict[float, list[int]] = {}
    for cpu in range(logical):
        khz = _read(f"/sys/devices/system/cpu/cpu{cpu}/cpufreq/cpuinfo_max_freq").strip()
        mhz = round(int(khz) / 1000.0, 1) if khz.isdigit() else 0.0
        by_freq.setdefault(mhz, []).append(cpu)
    return tuple(CoreCluster(tuple(c), f) for f, c in sorted(by_freq.items(), key=lambda kv: -kv[0]))


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


# ---------------------------------------------------------------- memory

def memory_info(threads: int) -> MemoryInfo:
    import psutil

    vm = psutil.virtual_memory()
    a = np.ones(32 << 20, dtype=np.float32)                    # (32M,) f32 = 128 MiB, far beyond any cache
    best = _best_seconds(lambda: _sum(a), 5)
    return MemoryInfo(total_bytes=int(vm.total), available_bytes=int(vm.available),
                      read_gbps=round(a.nbytes / best / 1e9, 2))


def _sum(a: np.ndarray) -> float:
    from kernels.backend import NUMBA

    if NUMBA:
        return _parallel_sum()(a)
    return float(a.sum())


_psum = None


def _parallel_sum():
    """A numba prange sum: numpy's sum runs on one core, and decode streams weights with all of them."""
    global _psum
    if _psum is None:
        import numba

        @numba.njit(parallel=True, fastmath=True, cache=True)
        def psum(a):
            s = 0.0
            for i in numba.prange(a.shape[0]):
                s += a[i]
            return s

        _psum = psum
    return _psum


def _best_seconds(fn, repeats: int) -> float:
    fn()   # warm-up (page faults, JIT)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return max(best, 1e-9)


# ---------------------------------------------------------------- kernels

def kernel_info(threads: int, shapes=DEFAULT_SHAPES) -> KernelInfo:
    from kernels.backend import NUMBA
    from planner.onnx_probe import onnx_gflops

    points, notes = [], []
    rng = np.random.default_rng(0)
    for rows, cols in shapes:
        for fmt in ("q4_1", "q8_0"):
            w = random_gguf_weight(fmt, rows, cols, rng)
            x = rng.standard_normal(cols, dtype=np.float32)
            out = np.empty(rows, dtype=np.float32)
            points.append(KernelPoint(f"matvec_{fmt}", rows, cols, w.nbytes, threads,
                                      round(w.nbytes / _timed(lambda: w.matvec(x, out)) / 1e9, 2)))
    # Decode reads every matrix of the model once per token: walking matrices that together exceed the
    # last-level cache measures the DRAM-bound speed that a whole model sees.
    mats = [random_gguf_weight("q4_1", 2752, 4096, rng) for _ in range(STREAM_MATRICES)]
    x = rng.standard_normal(4096, dtype=np.float32)
    out = np.empty(2752, dtype=np.float32)
    total = sum(w.nbytes for w in mats)
    points.append(KernelPoint(STREAM, 2752, 4096, total, threads,
                              round(total / _timed(lambda: [w.matvec(x, out) for w in mats]) / 1e9, 2)))
    del mats
    # An f32 GEMV (the f32 models' matvec) and the int8 predictor kernel (engine/executors/predictor.py) at
    # SmolLM2's shape, rank 64: what a predictor costs per token.
    a = rng.standard_normal((576, 1536), dtype=np.float32)
    v = rng.standard_normal(576, dtype=np.float32)
    points.append(KernelPoint("gemv_f32", 1536, 576, a.nbytes, threads, round(a.nbytes / _timed(lambda: v @ a) / 1e9, 2)))
    points.append(predictor_point(threads, rng))
    # Prefill: a 128-token chunk through SmolLM2's gate|up shape, and through a 2048-wide square matrix
    # (1B models: "@2048"): f32 through BLAS ("numpy"), and on a Q4_1 weight the int8 GEMM ("int8"; numba
    # only: its numpy twin is f32 BLAS plus the rounding) and ONNX Runtime's MatMulNBits as the ONNX
    # engine runs it ("onnx", the fastest provider, and "onnx:<provider>" each; engine/executors/prefill.py).
    # The engines' fixed costs per row and token weigh more on narrow rows, so the winner can differ by width.
    gflops = {}
    for n, k, m, suffix in ((128, 576, 3072, ""), (128, 2048, 2048, "@2048")):
        xa, wb = rng.standard_normal((n, k), dtype=np.float32), rng.standard_normal((k, m), dtype=np.float32)
        gflops["numpy" + suffix] = round(2.0 * n * k * m / _timed(lambda: xa @ wb) / 1e9, 1)
        wq = random_gguf_weight("q4_1", m, k, rng)
        if NUMBA:
            gflops["int8" + suffix] = round(2.0 * n * k * m / _timed(lambda: wq.matmul_int8(xa)) / 1e9, 1)
        try:
            ort, ort_notes = onnx_gflops(wq, xa, threads)
        except ImportError as e:
            notes.append(f"{e.name} is not installed: prefill cannot use ONNX Runtime")
            continue
        notes += [f"onnxruntime {note}" for note in ort_notes]
        gflops.update({key + suffix: value for key, value in ort.items()})
        if ort:
            gflops["onnx" + suffix] = max(ort.values())
    points += sparse_points(threads, rng)
    return KernelInfo(backend="numba" if NUMBA else "numpy", threads=threads, matvec=tuple(points),
                      matmul_gflops=gflops, notes=tuple(notes))


def predictor_point(threads: int, rng: np.random.Generator, hidden: int = 576, rank: int = 64,
                    ffn: int = 1536) -> KernelPoint:
    """The predictor kernel (kernels/sparse_ffn.predict) on a random int8 predictor: bytes per second."""
    from engine.executors.predictor import LayerPredictor
    from kernels.sparse_ffn import predict
    p = LayerPredictor.from_float(rng.standard_normal((hidden, rank), dtype=np.float32),
                                  rng.standard_normal(rank, dtype=np.float32),
                                  rng.standard_normal((rank, ffn), dtype=np.float32),
                                  np.zeros(ffn, np.float32), 0.0, 0.0)
    h = rng.standard_normal(hidden, dtype=np.float32)
    scores, idx = np.empty(ffn, np.float32), np.empty(ffn, np.int32)
    s = _timed(lambda: predict(*p.arrays, h, np.float32(0.0), threads, scores, idx))
    return KernelPoint(PREDICT, ffn, hidden, p.nbytes, threads, round(p.nbytes / s / 1e9, 2))


# (hidden, ffn, copies): a SmolLM2-sized layer cycled through enough copies to stream from DRAM, and a
# Llama-2-7B-sized one, which does on its own.
SPARSE_SHAPES = ((576, 1536, 24), (4096, 11008, 1))
SPARSE_ACTIVE = (0.1, 1.0)          # shares of the neurons computed


def sparse_points(threads: int, rng: np.random.Generator) -> list[KernelPoint]:
    """The sparse FFN kernel (kernels/sparse_ffn.py: gate and up rows in the engine's Q4_1 layout, int8
    down rows, the layout of engine/executors/sparse.py and of the flash bundles) on scattered neurons, as
    "sparse_q4_1" points: rows = neurons computed, nbytes = the bytes of the rows they read, gbps over
    those bytes. And "scatter": landed bundle records copied into the flash FFN's slot arrays
    (kernels/records.py) from buffers that, like reads from flash, are not in the caches."""
    from kernels.activation import SILU
    from kernels.backend import NUMBA
    from kernels.records import byte_views, scatter
    from kernels.sparse_ffn import sparse_ffn

    points = []
    # The numpy twins (no numba) take seconds at the 7B shape: the small one tells their speed.
    for hidden, ffn, copies in SPARSE_SHAPES if NUMBA else ((576, 1536, 2),):
        layers = []
        for _ in range(copies):
            g, u = (random_gguf_weight("q4_1", ffn, hidden, rng) for _ in range(2))
            dq = rng.integers(-127, 128, (ffn, hidden), dtype=np.int8)            # down rows as int8
            dd = np.full((ffn, hidden // 32), 0x2000, np.uint16)                  # f16 scales 2**-7
            layers.append((g, u, dq, dd))
        e16, e32 = np.zeros((ffn, 0), np.uint16), np.zeros(0, np.float32)
        ones = np.ones(hidden, np.float32)
        x = rng.standard_normal(hidden, dtype=np.float32)
        out, acts = np.empty(hidden, np.float32), np.empty(ffn, np.float32)
        row = (layers[0][0].nbytes + layers[0][1].nbytes + layers[0][2].nbytes + layers[0][3].nbytes) / ffn
        for share in SPARSE_ACTIVE:
            k = max(1, round(share * ffn))
            # A new scattered set each call, so the rows come from DRAM as in decode, not from the cache.
            sets = [np.sort(rng.choice(ffn, k, replace=False)).astype(np.int32) for _ in range(8)]

            def run():
                for i, (g, u, dq, dd) in enumerate(layers):
                    idx = sets[(run.calls + i) % len(sets)]
                    sparse_ffn(g.qs, g.d, g.m, u.qs, u.d, u.m, dq, dd, e16, ones, -1, x, idx, e32, SILU, threads,
                               acts[:k], out)
                run.calls += 1

            run.calls = 0
            nbytes = round(k * row * len(layers))
            points.append(KernelPoint("sparse_q4_1", k, hidden, nbytes, threads, round(nbytes / _timed(run) / 1e9, 2)))
        del layers
    # scatter: SmolLM2-sized records (gate and up Q4_1 rows, int8 down row) in 1 MiB runs
    fields = [288, 36, 36, 288, 36, 36, 576, 36, 0]
    rec = sum(fields)
    n = (1 << 20) // rec
    bufs = [rng.integers(0, 256, n * rec, dtype=np.uint8) for _ in range(48)]        # 48 MiB: not cached
    slots = [np.zeros((n, f), np.uint8) for f in fields]
    off = np.cumsum([0] + fields[:-1]).astype(np.int64)
    ln = np.asarray(fields, np.int64)
    starts, rows = np.arange(n, dtype=np.int64) * rec, np.arange(n, dtype=np.int64)
    dsts = byte_views(slots)
    t = _timed(lambda: [scatter(b, starts, rows, off, ln, dsts) for b in bufs]) / len(bufs)
    points.append(KernelPoint("scatter", n, rec, n * rec, 1, round(n * rec / t / 1e9, 2)))
    return points


def random_gguf_weight(fmt: str, rows: int, cols: int, rng: np.random.Generator):
    """A Weight in the engine's layout for a GGUF Q4_1 or Q8_0 tensor of random blocks, built through
    the engine's own GGUF converter so that the timing follows whatever layout it uses."""
    from engine.formats.gguf_quants import Q4_1, Q8_0, weight_from_gguf

    nb = rows * cols // 32
    if fmt == "q4_1":
        blocks = np.zeros(nb, dtype=[("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
        blocks["m"] = -0.01
        blocks["qs"] = rng.integers(0, 256, (nb, 16), dtype=np.uint8)
        kind = Q4_1
    else:
        blocks = np.zeros(nb, dtype=[("d", "<f2"), ("qs", "i1", 32)])
        blocks["qs"] = rng.integers(-127, 128, (nb, 32), dtype=np.int8)
        kind = Q8_0
    blocks["d"] = 0.01   # finite, normal scales: denormals or NaNs could change the timing
    return weight_from_gguf(kind, blocks.view(np.uint8), (rows, cols), f"probe.{fmt}", "device probe")


def _timed(fn) -> float:
    """Best seconds per call over about SECONDS_PER_KERNEL of repeated calls."""
    fn()
    best, t_end = float("inf"), time.perf_counter() + SECONDS_PER_KERNEL
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        for _ in range(4):
            fn()
        best = min(best, (time.perf_counter() - t0) / 4)
    return max(best, 1e-9)


# ---------------------------------------------------------------- call overhead

def overhead_info() -> Overhead:
    from kernels.backend import NUMBA

    def noop(a):
        return a

    a = np.zeros(64, dtype=np.float32)
    py = _per_call(noop, a)
    nb = par = 0.0
    if NUMBA:
        f, p = _numba_noops()
        nb, par = _per_call(f, a), _per_call(p, a)
    return Overhead(python_call_us=round(py, 3), numba_call_us=round(nb, 3), numba_parallel_call_us=round(par, 2))


_noops = None


def _numba_noops():
    global _noops
    if _noops is None:
        import numba

        @numba.njit(cache=True)
        def one(a):
            return a[0]

        @numba.njit(parallel=True, cache=True)
        def par(a):
            for i in numba.prange(a.shape[0]):
                a[i] = a[i] * 1.0
            return a[0]

        _noops = (one, par)
    return _noops


def _per_call(fn, a, n: int = 2000) -> float:
    """Microseconds per call, best of 5 batches."""
    fn(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(a)
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6
