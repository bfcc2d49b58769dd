"""`pocketinfer eval-prune -m DEPLOY -f TEXT [--rounds N] [--json]`: a 2:4-pruned deploy against its own
weights file run dense (engine/measure/pruned.py): perplexity, bytes read per token, matrix groups
pruned, and decode tok/s side by side."""

from __future__ import annotations

import json
from pathlib import Path

from engine.cli.eval_sparsity import _read_text


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-prune", help="measure a 2:4-pruned deploy against its dense source")
    p.add_argument("-m", "--model", required=True, metavar="DEPLOY", help="a deploy directory from `pocketinfer prune`")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: the plan's)")
    p.add_argument("-f", "--file", default=None, help="held-out UTF-8 text for perplexity (default: a built-in paragraph)")
    p.add_argument("-c", "--ctx", type=int, default=512, help="perplexity window (default 512)")
    p.add_argument("--windows", type=int, default=8, help="perplexity windows at most (default 8)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt of the timed runs (default 16)")
    p.add_argument("-n", "--gen-tokens", type=int, default=128, help="tokens generated per timed run (default 128)")
    p.add_argument("--rounds", type=int, default=5, help="timed runs of each model, alternating (default 5)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    import engine
    from engine.formats import deploy as deploy_dir
    from engine.measure.bench import check_args
    from engine.measure.pruned import compare

    check_args(args.prompt_tokens, args.gen_tokens, args.rounds)
    directory = Path(args.model)
    plan = deploy_dir.read_plan(directory)
    if not (plan.get("sparsity") or {}).get("matrices"):
        raise ValueError(f"{directory}: the plan has no 2:4-pruned matrices; make one with `pocketinfer prune`")
    text = _read_text(args.file)
    pruned = engine.load(directory, threads=args.threads)
    dense = engine.load(deploy_dir.model_path(directory, plan), threads=pruned.threads)
    r = compare(pruned, dense, len(plan["sparsity"]["matrices"]), pruned.tokenizer.encode(text), args.ctx,
                args.windows, args.prompt_tokens, args.gen_tokens, args.rounds)
    if args.json:
        print(json.dumps(r.as_dict()))
        return 0
    d = r.as_dict()
    print(f"matrix groups pruned 2:4: {r.pruned_groups} of {r.total_groups}")
    print(f"perplexity {r.ppl:.4f} vs dense {r.dense_ppl:.4f} ({100 * d['ppl_change']:+.2f}%) over {r.scored_tokens} tokens")
    print(f"bytes per token {r.bytes_per_token / 2**20:.1f} MiB vs dense {r.dense_bytes_per_token / 2**20:.1f} MiB "
          f"({d['bytes_ratio']:.3f}x)")
    print(f"decode {r.decode_tps:.1f} tok/s vs dense {r.dense_decode_tps:.1f} tok/s: {r.speedup:.3f}x (median of "
          f"{r.rounds} alternating rounds, {pruned.threads} threads)")
    return 0
