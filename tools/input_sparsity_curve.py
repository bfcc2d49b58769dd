"""Quality against bytes of input sparsity (engine/executors/input_sparse.py, planner/input_sparsity.py).
QUALITY ONLY: nothing here is timed but the calibration, so it says nothing about decode speed.

On held-out text (default tests/data/ppl_text.txt, never calibrated on), perplexity over non-overlapping
windows of --ctx tokens with BOS first (engine/measure/perplexity.py's method), every window one
teacher-forced prefill through f32 BLAS with per-token masks (equal to masked token-by-token decode):
- dense;
- uniform: each group alone (qkv, o, gate_up, down, head) and all four layer groups together, every
  unit at the same target sparsity, its threshold the quantile of |input| on the calibration text's
  threshold split;
- the planner's allocation at each --budgets perplexity rise.
Each row: ppl, its change, the sparsity achieved on the held-out text (share of the units' inputs zeroed),
and the weight bytes read per token relative to dense (the LM head counted; only value bytes are skipped,
block scales are always read).

    nice -n 19 python tools/input_sparsity_curve.py --out /tmp/input_sparsity     # ~20 minutes on 2 cores
    nice -n 19 python tools/input_sparsity_curve.py --sparsities "" --out /tmp/is  # the planner only, ~11
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402
from engine.executors.input_sparse import GROUPS, InputMask  # noqa: E402
from engine.measure.input_sparsity import window_nll  # noqa: E402
from engine.measure.sparsity import text_windows  # noqa: E402
from planner.input_sparsity import LEVELS, allocate, calibrate  # noqa: E402

MODEL = "/root/.cache/pocketinfer/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def measure(model, wins, mask: InputMask, cal, dense_nll: float | None) -> dict:
    """ppl of the masked model on wins; achieved sparsity per unit and bytes per token relative to dense."""
    nll = float(window_nll(model, wins, mask).mean())
    achieved = mask.sparsity()                                           # (units,)
    read = float((cal.unit_bytes * (1 - achieved * cal.value_share)).sum())
    return {"nll": nll, "ppl": math.exp(nll), "ppl_change": math.expm1(nll - dense_nll) if dense_nll else 0.0,
            "achieved": achieved, "bytes_rel": read / float(cal.unit_bytes.sum())}


def group_sparsity(mask: InputMask, units: list[int]) -> float:
    return float(mask.zeroed[units].sum() / max(1, mask.seen[units].sum()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-m", "--model", default=MODEL)
    ap.add_argument("--calib", default=str(ROOT / "planner" / "data" / "calibration.txt"))
    ap.add_argument("--text", default=str(ROOT / "tests" / "data" / "ppl_text.txt"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--budgets", default="0.01,0.02,0.05,0.10")
    ap.add_argument("--levels", default=",".join(str(v) for v in LEVELS),
                    help="sparsities at which the planner measures each unit's sensitivity")
    ap.add_argument("-t", "--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="directory for results.json and tables.md")
    args = ap.parse_args()

    llm = engine.load(args.model, n_ctx=args.ctx, threads=args.threads)
    model = llm.model
    n = model.config.num_hidden_layers
    units = n * len(GROUPS) + 1
    wins = text_windows(llm, llm.tokenizer.encode(Path(args.text).read_text(encoding="utf-8")), args.ctx, 10 ** 6)
    _log(f"{len(wins)} held-out windows of {args.ctx}; calibrating on {args.calib}")
    t0 = time.perf_counter()
    levels = tuple(float(v) for v in args.levels.split(","))
    cal = calibrate(llm, Path(args.calib).read_text(encoding="utf-8"), levels=levels,
                    progress=lambda stage, done, total: done % 100 == 0 and _log(f"{stage} {done}/{total}"))
    cal_seconds = time.perf_counter() - t0
    _log(f"calibration {cal_seconds:.0f} s")
    zero = np.zeros((n, len(GROUPS)))
    dense = measure(model, wins, InputMask(model.weights.layers, zero), cal, None)
    lines = [f"model {args.model}, held-out {args.text}: {len(wins)} windows of {args.ctx} "
             f"({sum(len(w) - 1 for w in wins)} scored tokens), f32 BLAS prefill with per-token masks", "",
             f"dense ppl {dense['ppl']:.4f}; dense weight bytes per token {cal.unit_bytes.sum() / 2**20:.2f} MiB "
             f"(LM head {cal.unit_bytes[-1] / 2**20:.2f} MiB); calibration {cal_seconds:.0f} s", ""]
    sets = {g: [i * len(GROUPS) + k for i in range(n)] for k, g in enumerate(GROUPS)}
    sets["head"] = [units - 1]
    sets["all layer groups"] = list(range(units - 1))
    results = {"dense": {"ppl": dense["ppl"]}, "calibration_seconds": cal_seconds, "uniform": [], "planner": []}
    lines += ["### Uniform", "", "| units | target | ppl | change | achieved sparsity | bytes/token vs dense |",
              "|---|---|---|---|---|---|"]
    for name, us in sets.items():
        for p in [float(v) for v in args.sparsities.split(",") if v.strip()]:
            target = np.zeros(units)
            target[us] = p
            thr = cal.thresholds(target)
            mask = InputMask(model.weights.layers, thr[:-1].reshape(n, len(GROUPS)), thr[-1])
            r = measure(model, wins, mask, cal, dense["nll"])
            ach = group_sparsity(mask, us)
            lines.append(f"| {name} | {p:.0%} | {r['ppl']:.4f} | {r['ppl_change']:+.2%} | {ach:.1%} "
                         f"| {r['bytes_rel']:.3f} |")
            results["uniform"].append({"units": name, "target": p, "ppl": r["ppl"], "ppl_change": r["ppl_change"],
                                       "achieved": ach, "bytes_rel": r["bytes_rel"]})
            _log(lines[-1])
    lines += ["", "### Planner", "", "| budget | calib. KL (as ppl) | held-out ppl | change | "
              + " | ".join(f"{g} sparsity" for g in (*GROUPS, "head")) + " | bytes/token vs dense |",
              "|---|---|---|---|" + "---|" * (len(GROUPS) + 2)]
    for b in [float(v) for v in args.budgets.split(",") if v.strip()]:
        alloc = allocate(llm, cal, b)
        mask = alloc.mask(model.weights.layers)
        r = measure(model, wins, mask, cal, dense["nll"])
        per_group = [group_sparsity(mask, sets[g]) for g in (*GROUPS, "head")]
        lines.append(f"| {b:.0%} | {alloc.measured_ppl_change:+.2%} | {r['ppl']:.4f} | {r['ppl_change']:+.2%} | "
                     + " | ".join(f"{s:.1%}" for s in per_group) + f" | {r['bytes_rel']:.3f} |")
        results["planner"].append({"budget": b, "ppl": r["ppl"], "ppl_change": r["ppl_change"],
                                   "group_sparsity": dict(zip((*GROUPS, "head"), per_group)),
                                   "bytes_rel": r["bytes_rel"], "allocation": alloc.as_dict()})
        _log(lines[-1])
    text = "\n".join(lines)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tables.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
