"""Time from `pocketinfer generate` command start to its first generated token, run twice.

The first run after an install compiles the numba kernels (cached on disk with cache=True); the
second loads them from the cache. `--clear-numba-cache` deletes the kernels' cache files first, to
reproduce "first run after install" on a machine that has run pocketinfer before.

    python tools/cold_start.py [-m MODEL] [--clear-numba-cache] [--runs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def clear_numba_cache() -> int:
    import kernels

    removed = 0
    for f in Path(kernels.__file__).parent.glob("__pycache__/*.nb[ic]"):
        f.unlink()
        removed += 1
    return removed


def time_to_first_token(cmd: list[str]) -> tuple[float, float]:
    """(seconds to the first byte of generated text on stdout, seconds to exit)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = p.stdout.read(1)
    t_first = time.perf_counter() - t0
    p.stdout.read()
    if p.wait() != 0 or not first:
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return t_first, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--clear-numba-cache", action="store_true")
    args = ap.parse_args()
    if args.clear_numba_cache:
        print(f"removed {clear_numba_cache()} numba cache files", file=sys.stderr)
    exe = [sys.executable, "-m", "engine"]
    cmd = exe + ["generate", "-m", args.model, "-p", "The capital of France is", "-n", "8", "--temp", "0"]
    results = []
    for i in range(args.runs):
        first, total = time_to_first_token(cmd)
        results.append({"run": i + 1, "first_token_s": round(first, 3), "exit_s": round(total, 3)})
        print(f"run {i + 1}: first token after {first:.2f} s, exit after {total:.2f} s", file=sys.stderr)
    print(json.dumps({"model": args.model, "command": " ".join(cmd[2:]), "runs": results,
                      "cpu_count": os.cpu_count()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
