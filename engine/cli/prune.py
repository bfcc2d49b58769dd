"""`pocketinfer prune SOURCE --pattern 2:4 [--method wanda|magnitude] [--quality-budget P%] -o DEPLOY`: prune
the model's matrices 2:4 (planner/prune.py) and write a deploy directory that loads like any other, its
pruned matrices in the 2:4 layouts (kernels/sparse24.py).

Progress bars go to stderr; stdout gets the plan summary and the pruning's rationale, or with --json one
JSON object. The work is done by planner/ (imported here, never by the runtime).
"""

from __future__ import annotations

import json

from engine.cli.plan import _Bars, deploy_arguments


def register(subparsers) -> None:
    p = subparsers.add_parser("prune", help="2:4-prune a model's matrices under a quality budget into a deploy directory")
    p.add_argument("source", metavar="SOURCE", help="HF directory, .gguf file or registry alias")
    p.add_argument("--pattern", default="2:4", help="sparsity pattern: 2:4 (keep 2 of every 4 weights of a row)")
    p.add_argument("--method", default="wanda", help="weight score: wanda (|W| times input norm, default) or magnitude")
    p.add_argument("--quality-budget", default=None, metavar="P%",
                   help="prune only the matrix groups that fit within this perplexity rise (2%%); without it, all")
    p.add_argument("--values", default="auto", help="kept values: auto (4-bit for 4-bit models, else int8; float32 "
                                                    "models stay float32), int8 or 4bit")
    deploy_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from planner import pipeline, summary
    from planner.budget import parse_quality_budget
    from planner.prune import PruneSpec

    budget = None if args.quality_budget is None else parse_quality_budget(args.quality_budget)
    spec = PruneSpec(pattern=args.pattern, method=args.method, quality_budget=budget, values=args.values)
    spec.check()
    bars = _Bars()
    result = pipeline.make_deploy(args.source, "100%", args.output, device_profile=args.device_profile,
                                  calibration=args.calibration, threads=args.threads, overwrite=args.force,
                                  progress=bars, prune=spec)
    bars.close()
    if args.json:
        print(json.dumps(result.plan, sort_keys=True))
    else:
        print(summary.format_plan(result.plan))
        for line in result.plan["sparsity"]["rationale"]:
            print(f"  {line}")
        print(f"deploy directory: {result.path}")
    return 0
