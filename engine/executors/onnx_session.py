"""An ONNX Runtime session over our own arrays (engine/executors/onnx_graph.Graph), for the ONNX prefill
executor and the planner's measurement of it.

- Every weight is handed over with SessionOptions.add_initializer, an OrtValue over our memory that ORT
  uses in place. (add_external_initializers copies, in ORT 1.32: measured.) add_initializer replaces an
  initializer of a model *file*, whose external data ORT checks for but does not read: the model file
  names a placeholder, a sparse file of zeros the size of the largest weight, beside it.
- ORT prepacks MatMulNBits weights into its own blocked layout when the session is made: that copy,
  about the weights' size, is ORT's; without it its kernel measured 3x slower. `rss_added` is what making
  the session added to this process's RSS.
- The model file (the graph without weights, ~100-300 KiB) is kept in `cache_dir` ($POCKETINFER_HOME/onnx
  by default) under the graph's hash and reused by later starts; what a start still pays is building
  the graph and ORT's prepacking (BENCHMARKS.md). The KEEP_GRAPHS most recently used stay.
- Providers: those asked for that this build has, then CPU; ORT's intra-op pool does not spin between
  runs, where it would starve numba's decode threads (DESIGN.md).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

CPU = "CPUExecutionProvider"


def ort_errors(ort) -> tuple[type, ...]:
    """The exception types ONNX Runtime's Python binding raises (all derive from Exception directly)."""
    state = ort.capi.onnxruntime_pybind11_state
    names = ("Fail", "InvalidArgument", "NoSuchFile", "NoModel", "EngineError", "RuntimeException",
             "InvalidProtobuf", "ModelLoaded", "NotImplemented", "InvalidGraph", "EPFail")
    return tuple(getattr(state, n) for n in names if hasattr(state, n)) + (RuntimeError, ValueError)


def first_line(e: BaseException) -> str:
    """ORT's message, first line only (its messages carry a source path and a stack)."""
    text = str(e).strip().splitlines()
    return text[0][:200] if text else type(e).__name__


class Session:
    """An InferenceSession with the arrays it reads in place kept alive beside it."""

    def __init__(self, session, keep, rss_added: int):
        self.session = session
        self.keep = keep                  # our arrays and their OrtValues: they must outlive the session
        self.rss_added = rss_added
        self.providers = session.get_providers()

    def run(self, outputs, feeds):
        return self.session.run(outputs, feeds)


def open_session(ort, graph, providers=(CPU,), threads: int | None = None, cache_dir: Path | None = None) -> Session:
    """A session of `graph` on our arrays. Raises ORT's errors (ort_errors)."""
    path = model_file(graph, cache_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or _threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in graph.initializers.items()}
    for name, value in values.items():
        opts.add_initializer(name, value)
    available = set(ort.get_available_providers())
    chosen = [p for p in providers if p in available and p != CPU] + [CPU]
    before = _rss()
    session = ort.InferenceSession(str(path), sess_options=opts, providers=chosen)
    return Session(session, (graph.initializers, values), _rss() - before)


KEEP_GRAPHS = 32          # model folders kept in the cache, least recently used dropped first


def model_file(graph, cache_dir: Path | None = None) -> Path:
    """The graph's model file and its placeholder, under the hash of the graph in cache_dir, written
    once (into a temporary folder, then renamed) and reused; a private temporary folder when the cache
    cannot be written."""
    from engine.executors.onnx_graph import PLACEHOLDER

    model = graph.model.SerializeToString()
    root = Path(cache_dir) if cache_dir is not None else _default_cache()
    folder = root / hashlib.sha256(model).hexdigest()[:20]
    if (folder / "prefill.onnx").exists():
        _touch(folder)
        return folder / "prefill.onnx"
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".building-"))
    except OSError:
        folder = tmp = Path(tempfile.mkdtemp(prefix="pocketinfer-onnx-"))
    (tmp / "prefill.onnx").write_bytes(model)
    with open(tmp / PLACEHOLDER, "wb") as f:          # sparse: sized, no blocks on disk
        f.truncate(max((a.nbytes for a in graph.initializers.values()), default=0))
    if tmp != folder:
        try:
            os.rename(tmp, folder)
        except OSError:                                 # another process put it there first
            shutil.rmtree(tmp, ignore_errors=True)
        prune(root, keep=KEEP_GRAPHS)
    return folder / "prefill.onnx"


def _touch(folder: Path) -> None:
    try:
        os.utime(folder)
    except OSError:
        pass                                            # a read-only cache: its order just goes stale


def prune(root: Path, keep: int) -> None:
    """Remove all but the `keep` most recently used model folders under root (each model and KV cache
    type makes its own graph). A session already made does not read its folder again."""
    try:
        folders = sorted((f for f in root.iterdir() if f.is_dir() and not f.name.startswith(".")),
                         key=lambda f: f.stat().st_mtime, reverse=True)
    except OSError:
        return                                          # another process pruned beside us: it keeps the cache
    for f in folders[keep:]:
        shutil.rmtree(f, ignore_errors=True)


def _default_cache() -> Path:
    from engine.formats.registry import cache_dir

    return cache_dir() / "onnx"


def _threads() -> int:
    from engine.threads import current_threads

    return current_threads()


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss
