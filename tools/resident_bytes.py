"""Resident bytes against file bytes for every GGUF type the engine reads: each converted into its
kernel layout (engine/formats/gguf_quants.py, kernels/layouts.md) at one matrix shape.

    python tools/resident_bytes.py [--shape 2048x5632]

Sizes do not depend on the values, so the blocks are zeros.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.formats.gguf_quants import tensor_nbytes, type_name, weight_from_gguf  # noqa: E402

TYPES = (0, 1, 30, 2, 3, 6, 7, 8, 12, 13, 14)   # F32 F16 BF16 Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048x5632", help="ROWSxCOLS (COLS a multiple of 256)")
    rows, cols = map(int, ap.parse_args().shape.lower().split("x"))
    print("| GGUF type | layout | file MiB | resident MiB | resident / file |\n|---|---|---:|---:|---:|")
    for t in TYPES:
        raw = np.zeros(tensor_nbytes(t, rows * cols), np.uint8)
        w = weight_from_gguf(t, raw, (rows, cols), "w", "zeros")
        print(f"| {type_name(t)} | {type(w).__name__.removesuffix('Weight')} | {raw.nbytes / 2**20:.2f} | "
              f"{w.nbytes / 2**20:.2f} | {w.nbytes / raw.nbytes:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
