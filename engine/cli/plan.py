"""`pocketinfer plan SOURCE --memory-budget B [--quality-budget P%] -o DEPLOY`: profile the model, solve for
an execution plan under a memory budget (and, with a quality budget, thresholds for input-sparse decode)
and write a self-contained deploy directory.

Progress bars go to stderr; stdout gets the readable plan summary, or with --json one JSON object.
The work is done by planner/ (imported here, never by the runtime).
"""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="make an execution plan under a memory budget and write a deploy directory")
    p.add_argument("source", metavar="SOURCE", help="HF directory, .gguf file or registry alias")
    p.add_argument("--memory-budget", required=True, metavar="B",
                   help="memory for the model: bytes (1.5GB, 800MB, 512MiB) or a percentage of its weight bytes (60%%)")
    p.add_argument("--quality-budget", default=None, metavar="P%",
                   help="also sparsify each linear layer's decode input, within this perplexity rise (2%%): "
                        "needs a memory budget of 100%%; calibration takes minutes")
    p.add_argument("--recall", type=float, default=None,
                   help="predictor recall floor for sparse layers (default 0.99)")
    deploy_arguments(p)
    p.set_defaults(func=run)


def deploy_arguments(p) -> None:
    """The options of every command that writes a deploy directory (plan, prune)."""
    p.add_argument("-o", "--output", required=True, metavar="DEPLOY", help="deploy directory to create")
    p.add_argument("--device-profile", default=None, metavar="FILE",
                   help="device profile JSON or a shipped example name (default: this machine's, measured if absent)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration text (default: the English, code and chat text shipped with the planner)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads while planning")
    p.add_argument("--force", action="store_true", help="replace DEPLOY if it exists")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")


def run(args) -> int:
    from planner import pipeline, summary

    bars = _Bars()
    result = pipeline.make_deploy(args.source, args.memory_budget, args.output, device_profile=args.device_profile,
                                  calibration=args.calibration, recall_floor=args.recall,
                                  quality_budget=args.quality_budget,
                                  threads=args.threads, overwrite=args.force, progress=bars)
    bars.close()
    if args.json:
        print(json.dumps(result.plan, sort_keys=True))
    else:
        print(summary.format_plan(result.plan))
        print(f"deploy directory: {result.path}")
    return 0


class _Bars:
    """progress(stage, done, total) -> one tqdm bar per stage on stderr (plain lines without tqdm)."""

    def __init__(self):
        self.stage, self.bar = None, None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage:
            self.close()
            self.stage = stage
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=stage, file=sys.stderr, leave=False, dynamic_ncols=True)
            except ImportError:
                print(f"{stage}...", file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
