"""The device profile: what the planner knows about a machine, as a versioned JSON file.

A profile is measured once per machine (planner/device_probe.py) and cached under
$POCKETINFER_HOME/device/<host>.json; example phone profiles ship in planner/profiles/ so that phone
plans can be made on a laptop. This file owns the schema: dataclasses, JSON round trip, validation
(a foreign or broken file raises PlanError naming the field) and the readable summary.

Units are in the field names: *_bytes, *_mhz, *_gbps (1e9 bytes/s), *_mbps (1e6 bytes/s), *_us.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.errors import PlanError

SCHEMA = "pocketinfer.device-profile"
SCHEMA_VERSION = 1
EXAMPLES = Path(__file__).resolve().parent / "profiles"
PREDICT = "predict_i8"          # the KernelPoint of the int8 predictor kernel (kernels/sparse_ffn.predict)


@dataclass(frozen=True)
class CoreCluster:
    cores: tuple[int, ...]       # logical CPU ids sharing one maximum frequency
    max_mhz: float               # 0 when sysfs does not say


@dataclass(frozen=True)
class CpuInfo:
    model: str
    physical_cores: int
    logical_cores: int
    clusters: tuple[CoreCluster, ...]   # fastest first
    simd: tuple[str, ...]               # sorted feature names (avx2, fma, asimd, asimddp, i8mm, ...)


@dataclass(frozen=True)
class MemoryInfo:
    total_bytes: int
    available_bytes: int
    read_gbps: float             # streaming read bandwidth with all compute threads


@dataclass(frozen=True)
class ReadPoint:
    pattern: str                 # "random" (aligned offsets anywhere in the file) or "sequential"
    request_bytes: int
    threads: int
    mbps: float


@dataclass(frozen=True)
class StorageInfo:
    path: str                    # the directory measured (where models live)
    fs_type: str
    direct_io: bool              # O_DIRECT accepted by the filesystem
    method: str                  # how page-cache effects were kept out of the figures
    reads: tuple[ReadPoint, ...]

    def mbps(self, request_bytes: int, threads: int | None = None, pattern: str = "random") -> float:
        """Throughput at this request size: the best thread count (or the given one), interpolated
        linearly in log2(request size) between measured sizes, clamped at the ends."""
        pts: dict[int, float] = {}
        for p in self.reads:
            if p.pattern == pattern and (threads is None or p.threads == threads):
                pts[p.request_bytes] = max(pts.get(p.request_bytes, 0.0), p.mbps)
        if not pts:
            raise PlanError(f"the device profile has no {pattern} read figures"
                            + (f" for {threads} threads" if threads else ""))
        sizes = sorted(pts)
        if request_bytes <= sizes[0]:
            return pts[sizes[0]]
        if request_bytes >= sizes[-1]:
            return pts[sizes[-1]]
        from math import log2
        for a, b in zip(sizes, sizes[1:]):
            if a <= request_bytes <= b:
                t = (log2(request_bytes) - log2(a)) / (log2(b) - log2(a))
                return pts[a] + t * (pts[b] - pts[a])
        raise AssertionError("sizes are sorted and cover request_bytes")

    def best_threads(self, request_bytes: int, pattern: str = "random") -> int:
        cands = sorted({p.threads for p in self.reads if p.pattern == pattern})
        return max(cands, key=lambda t: (round(self.mbps(request_bytes, t, pattern), 1), -t)) if cands else 1


@dataclass(frozen=True)
class KernelPoint:
    name: str                    # "matvec_q4_1", "matvec_q8_0", "gemv_f32", "predict_i8", ...
    rows: int
    cols: int
    nbytes: int                  # bytes of the weight read per call
    threads: int
    gbps: float


@dataclass(frozen=True)
class KernelInfo:
    backend: str                         # "numba" or "numpy" (the kernels the engine picked)
    threads: int
    matvec: tuple[KernelPoint, ...]
    matmul_gflops: dict                  # {"numpy": f, "int8": f, "onnx": f, "onnx:<provider>": f, same "@2048"}
    sparse_ffn: tuple[KernelPoint, ...] = ()   # cluster kernel vs cluster size, once kernels/sparse_ffn.py exists
    notes: tuple[str, ...] = ()

    def has(self, name: str) -> bool:
        """Whether the profile has a kernel point named `name` (profiles written before a kernel was
        measured, and the example phone profiles, lack the newer ones)."""
        return any(p.name == name for p in self.matvec)

    def matvec_gbps(self, nbytes: int, name_prefix: str = "matvec") -> float:
        """The dense matvec speed measured at the weight size nearest to nbytes (cache effects make
        small matrices faster than DRAM-sized ones)."""
        pts = [p for p in self.matvec if p.name.startswith(name_prefix) and not p.name.endswith("_stream")]
        if not pts:
            raise PlanError(f"the device profile has no {name_prefix} kernel figures")
        from math import log
        return min(pts, key=lambda p: (abs(log(p.nbytes) - log(max(nbytes, 1))), p.name)).gbps

    def stream_gbps(self) -> float:
        """Dense matvec over a working set larger than the caches: the bound for a whole model's
        decode; falls back to the slowest per-shape figure in profiles without it."""
        pts = [p.gbps for p in self.matvec if p.name.endswith("_stream")]
        return pts[0] if pts else min(p.gbps for p in self.matvec)


@dataclass(frozen=True)
class Overhead:
    python_call_us: float
    numba_call_us: float         # 0 when numba is absent
    numba_parallel_call_us: float


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    kind: str                    # "measured" on this machine, or "example" (shipped, from published figures)
    cpu: CpuInfo
    memory: MemoryInfo
    storage: StorageInfo
    kernels: KernelInfo
    overhead: Overhead
    duration_s: float = 0.0
    sources: tuple[str, ...] = ()    # citations for example profiles
    notes: tuple[str, ...] = ()
    probe_version: int = 0           # planner/device_probe.PROBE_VERSION of the code that measured it
    schema: str = field(default=SCHEMA)
    schema_version: int = field(default=SCHEMA_VERSION)

    def to_dict(self) -> dict:
        return _lists(asdict(self))

    def summary_dict(self) -> dict:
        """The few figures a plan records about the device it was made for."""
        return {"name": self.name, "kind": self.kind, "cpu": self.cpu.model,
                "cores": [len(c.cores) for c in self.cpu.clusters], "memory_read_gbps": self.memory.read_gbps,
                "direct_io": self.storage.direct_io, "kernel_backend": self.kernels.backend}


def _lists(x):
    """asdict leaves tuples; JSON wants lists (and a round trip must compare equal)."""
    if isinstance(x, dict):
        return {k: _lists(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_lists(v) for v in x]
    return x


# ---------------------------------------------------------------- JSON -> dataclasses, checked

def from_dict(d: dict, source: str = "device profile") -> DeviceProfile:
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise PlanError(f"{source}: not a pocketinfer device profile (schema {_get(d, 'schema')!r}, expected "
                        f"{SCHEMA!r}); run `pocketinfer profile-device` or pass one from planner/profiles/")
    if d.get("schema_version") != SCHEMA_VERSION:
        raise PlanError(f"{source}: device profile schema_version {d.get('schema_version')!r}, this planner "
                        f"reads {SCHEMA_VERSION}; run `pocketinfer profile-device` again")
    try:
        cpu = d["cpu"]
        st = d["storage"]
        k = d["kernels"]
        return DeviceProfile(
            name=str(d["name"]), kind=str(d["kind"]),
            cpu=CpuInfo(model=str(cpu["model"]), physical_cores=_pos_int(cpu, "physical_cores"),
                        logical_cores=_pos_int(cpu, "logical_cores"),
                        clusters=tuple(CoreCluster(tuple(int(i) for i in c["cores"]), float(c["max_mhz"]))
                                       for c in cpu["clusters"]),
                        simd=tuple(str(s) for s in cpu["simd"])),
            memory=MemoryInfo(total_bytes=_pos_int(d["memory"], "total_bytes"),
                              available_bytes=int(d["memory"]["available_bytes"]),
                              read_gbps=_pos_float(d["memory"], "read_gbps")),
            storage=StorageInfo(path=str(st["path"]), fs_type=str(st["fs_type"]), direct_io=bool(st["direct_io"]),
                                method=str(st["method"]),
                                reads=tuple(ReadPoint(str(p["pattern"]), _pos_int(p, "request_bytes"),
                                                      _pos_int(p, "threads"), _pos_float(p, "mbps"))
                                            for p in st["reads"])),
            kernels=KernelInfo(backend=str(k["backend"]), threads=_pos_int(k, "threads"),
                               matvec=tuple(_kernel_point(p) for p in k["matvec"]),
                               matmul_gflops={str(n): float(v) for n, v in k["matmul_gflops"].items()},
                               sparse_ffn=tuple(_kernel_point(p) for p in k.get("sparse_ffn", ())),
                               notes=tuple(str(s) for s in k.get("notes", ()))),
            overhead=Overhead(**{f: float(d["overhead"][f]) for f in
                                 ("python_call_us", "numba_call_us", "numba_parallel_call_us")}),
            duration_s=float(d.get("duration_s", 0.0)),
            sources=tuple(str(s) for s in d.get("sources", ())),
            notes=tuple(str(s) for s in d.get("notes", ())),
            probe_version=int(d.get("probe_version", 0)),
        )
    except KeyError as e:
        raise PlanError(f"{source}: device profile lacks the field {e.args[0]!r}; run `pocketinfer profile-device` "
                        "again") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise PlanError(f"{source}: device profile has a malformed field ({e}); run `pocketinfer profile-device` "
                        "again") from None


def _get(d, key):
    return d.get(key) if isinstance(d, dict) else type(d).__name__


def _pos_int(d: dict, key: str) -> int:
    v = int(d[key])
    if v <= 0:
        raise ValueError(f"{key}={v} must be positive")
    return v


def _pos_float(d: dict, key: str) -> float:
    v = float(d[key])
    if not v > 0:
        raise ValueError(f"{key}={v} must be positive")
    return v


def _kernel_point(p: dict) -> KernelPoint:
    return KernelPoint(str(p["name"]), int(p["rows"]), int(p["cols"]), _pos_int(p, "nbytes"),
                       _pos_int(p, "threads"), _pos_float(p, "gbps"))


# ---------------------------------------------------------------- files

def load_profile(path: str | os.PathLike) -> DeviceProfile:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PlanError(f"{path}: cannot read the device profile ({e.__class__.__name__}: "
                        f"{getattr(e, 'strerror', None) or e})") from None
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise PlanError(f"{path}: device profile is not JSON ({e})") from None
    return from_dict(d, str(path))


def save_profile(profile: DeviceProfile, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(profile.to_dict(), f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def default_path() -> Path:
    """This machine's cached profile: $POCKETINFER_HOME/device/<hostname>.json."""
    from engine.formats.registry import cache_dir

    host = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in socket.gethostname()) or "localhost"
    return cache_dir() / "device" / f"{host}.json"


def example_profiles() -> dict[str, Path]:
    return {p.stem: p for p in sorted(EXAMPLES.glob("*.json"))}


def resolve_profile(spec: str | os.PathLike | None) -> Path | None:
    """A path, or the name of a shipped example ("snapdragon-8gen3-ufs4"); None means this machine's."""
    if spec is None:
        return None
    p = Path(spec).expanduser()
    if p.exists():
        return p
    examples = example_profiles()
    if str(spec) in examples:
        return examples[str(spec)]
    raise PlanError(f"device profile {str(spec)!r}: no such file, nor a shipped example "
                    f"({', '.join(examples) or 'none'})")


# ---------------------------------------------------------------- readable summary

def format_summary(p: DeviceProfile) -> str:
    from planner.budget import format_bytes

    c = p.cpu
    clusters = " + ".join(f"{len(cl.cores)}x{cl.max_mhz / 1000:.2f}GHz" if cl.max_mhz else f"{len(cl.cores)}x?GHz"
                          for cl in c.clusters)
    lines = [f"device profile: {p.name} ({p.kind}" + (f", measured in {p.duration_s:.1f} s)" if p.duration_s else ")"),
             f"  cpu       {c.model}: {c.physical_cores} physical / {c.logical_cores} logical cores; "
             f"clusters {clusters}",
             f"  simd      {' '.join(c.simd) or 'none detected'}",
             f"  memory    {format_bytes(p.memory.total_bytes)} total, {format_bytes(p.memory.available_bytes)} "
             f"available, read {p.memory.read_gbps:.1f} GB/s",
             f"  storage   {p.storage.path} ({p.storage.fs_type}): O_DIRECT "
             f"{'yes' if p.storage.direct_io else 'refused'}; {p.storage.method}"]
    threads = sorted({r.threads for r in p.storage.reads})
    for pattern in ("random", "sequential"):
        sizes = sorted({r.request_bytes for r in p.storage.reads if r.pattern == pattern})
        if not sizes:
            continue
        lines.append(f"  {pattern:<9} MB/s by request size (rows) and reader threads (columns "
                     f"{', '.join(map(str, threads))})")
        for s in sizes:
            cells = []
            for t in threads:
                v = [r.mbps for r in p.storage.reads if (r.pattern, r.request_bytes, r.threads) == (pattern, s, t)]
                cells.append(f"{v[0]:9.0f}" if v else f"{'-':>9}")
            lines.append(f"    {_size(s):>8}" + "".join(cells))
    k = p.kernels
    lines.append(f"  kernels   backend {k.backend}, {k.threads} threads")
    for m in k.matvec:
        lines.append(f"    {m.name:<14} {m.rows}x{m.cols} ({format_bytes(m.nbytes)}): {m.gbps:.1f} GB/s")
    for name, v in sorted(k.matmul_gflops.items()):
        lines.append(f"    matmul {name}: {v:.1f} GFLOP/s")
    for note in k.notes:
        lines.append(f"    note: {note}")
    o = p.overhead
    lines.append(f"  overhead  python call {o.python_call_us:.2f} us, numba call {o.numba_call_us:.2f} us, "
                 f"numba parallel call {o.numba_parallel_call_us:.1f} us")
    for s in p.sources:
        lines.append(f"  source    {s}")
    for n in p.notes:
        lines.append(f"  note      {n}")
    return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and n % (1 << 20) == 0 else f"{n >> 10} KiB"
