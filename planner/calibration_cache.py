"""Measured calibration of the cost model for one model on this machine, cached so that planning twice
gives the same plan.json.

When planning for this machine, the planner times the model itself (planner/decode_probe.py: a dense
decode step, and a layer streamed from flash). On a shared machine those timings move by 10-30% from
run to run, and every predicted figure in plan.json with them, so two runs of `pocketinfer plan` on the
same inputs would disagree. The first measurement is kept under
$POCKETINFER_HOME/device/calibration/, keyed by what it depends on: the device profile's contents (a
new `pocketinfer profile-device` starts over), the model's fingerprint, the kernels' sources (the
compiled-kernel cache key, kernels/backend.py) and the measurement's own parameters. Delete the folder
to measure again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable


def _root() -> Path:
    from engine.formats.registry import cache_dir

    return cache_dir() / "device" / "calibration"


def key(device_dict: dict, fingerprint: str, what: str) -> str:
    """A file-name-safe key for one measurement of one model on one device profile."""
    from kernels.backend import kernel_cache_dir

    h = hashlib.sha256()
    h.update(json.dumps(device_dict, sort_keys=True).encode())
    h.update(fingerprint.encode())
    h.update(os.path.basename(kernel_cache_dir()).encode())
    h.update(what.encode())
    return h.hexdigest()[:32]


def measured(device_dict: dict, fingerprint: str, what: str, measure: Callable[[], float]) -> float:
    """The cached value of measurement `what`, or measure() once and cache it (atomically)."""
    path = _root() / f"{key(device_dict, fingerprint, what)}.json"
    try:
        return float(json.loads(path.read_text(encoding="utf-8"))["seconds"])
    except (OSError, ValueError, KeyError, TypeError):
        pass                                  # not measured yet, or unreadable: measure again
    value = float(measure())
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"what": what, "seconds": value}, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return value
