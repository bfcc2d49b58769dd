"""Reading a deploy directory written by `pocketinfer plan` (the runtime side; it never imports planner/).

DEPLOY/plan.json names the weights it was made for by a fingerprint; `model_path` refuses a directory whose
weights are not those (copied over by hand, or a plan from another model), so that a plan's per-layer
decisions are never applied to a model they were not solved for.

The fingerprint is a sha256 over each weight file's size and sampled contents (the first and last
MiB and 16 evenly spaced 64 KiB pieces): it tells models apart without reading gigabytes at every load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from engine.errors import ModelFormatError

PLAN_SCHEMA = "pocketinfer.plan"
PLAN_SCHEMA_VERSION = 1
_EDGE = 1 << 20
_SAMPLES, _SAMPLE = 16, 64 << 10


def fingerprint(files: list[Path]) -> str:
    """sha256 hex over (size, sampled bytes) of each file, in sorted name order."""
    h = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        size = path.stat().st_size
        h.update(f"{size}\0".encode())   # not the name: the deploy copy of a .gguf is renamed model.gguf
        with open(path, "rb") as f:
            offsets = [0, max(0, size - _EDGE)] + [size * k // (_SAMPLES + 1) for k in range(1, _SAMPLES + 1)]
            for off, n in zip(offsets, [_EDGE, _EDGE] + [_SAMPLE] * _SAMPLES):
                f.seek(off)
                h.update(f.read(n))
    return h.hexdigest()


def weight_files(path: Path) -> list[Path]:
    """The files a model's weights live in: the .gguf itself, or an HF directory's *.safetensors."""
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{path}: no *.safetensors files to fingerprint")
        return files
    return [path]


def read_plan(directory: Path) -> dict:
    path = directory / "plan.json"
    try:
        plan = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: cannot read the plan ({e}); re-run `pocketinfer plan`") from None
    if not isinstance(plan, dict) or plan.get("schema") != PLAN_SCHEMA:
        raise ModelFormatError(f"{path}: not a pocketinfer plan; re-run `pocketinfer plan`")
    if plan.get("schema_version") != PLAN_SCHEMA_VERSION:
        raise ModelFormatError(f"{path}: plan schema_version {plan.get('schema_version')!r}, this engine reads "
                               f"{PLAN_SCHEMA_VERSION}; re-run `pocketinfer plan` with this version")
    return plan


def model_path(directory: Path, plan: dict) -> Path:
    """The weights inside the deploy directory, after checking them against the plan's fingerprint."""
    try:
        rel = plan["files"]["weights"]
        want = plan["model"]["fingerprint"]
    except (KeyError, TypeError):
        raise ModelFormatError(f"{directory / 'plan.json'}: lacks files.weights or model.fingerprint; re-run "
                               "`pocketinfer plan`") from None
    path = directory / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.exists():
        raise ModelFormatError(f"{directory}: the plan's weights {rel!r} are not in the deploy directory; re-run "
                               "`pocketinfer plan`")
    got = fingerprint(weight_files(path))
    if got != want:
        raise ModelFormatError(f"{directory}: the weights' fingerprint {got[:16]} does not match the plan's "
                               f"{want[:16]}: this plan was made for another model; re-run `pocketinfer plan` "
                               "for these weights")
    return path


def deploy_threads(plan: dict) -> int | None:
    t = plan.get("threads", {}).get("compute")
    return int(t) if isinstance(t, int) and t > 0 and t <= (os.cpu_count() or t) else None
