"""`pocketinfer eval-sparsity -m MODEL [--plan PLAN] [--mode MODE] [-f TEXT] [--json]`: sparse decode
against dense decode (engine/measure/sparsity.py): realized sparsity, predictor recall/precision, perplexity,
greedy agreement, FFN time and decode tok/s, per layer and overall."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import add_model_args, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-sparsity", help="measure sparse decode against dense decode")
    add_model_args(p)
    p.add_argument("--plan", default=None, help="plan.json or predictors.npz choosing the per-layer modes "
                   "(default: the model's default modes, relu-exact for ReLU-family models)")
    p.add_argument("--mode", default=None, choices=("dense", "relu-exact", "predicted", "oracle"),
                   help="run every layer in this mode (overrides the plan's modes)")
    p.add_argument("--oracle-sparsity", type=float, default=0.5,
                   help="oracle mode: the per-layer sparsity its |act(gate)*up| thresholds aim at (default 0.5)")
    p.add_argument("--calib", default=None, help="oracle mode: UTF-8 text the thresholds are calibrated on "
                   "(default: a built-in paragraph; never the evaluation text)")
    p.add_argument("--down-format", default="auto", choices=("auto", "i8", "q4", "f32"),
                   help="storage of the transposed down projection (default auto: i8 for quantized models)")
    p.add_argument("--cluster", type=int, default=None, help="neurons per cluster (default: the plan's, else 1)")
    p.add_argument("-f", "--file", default=None, help="held-out UTF-8 text for perplexity (default: a built-in paragraph)")
    p.add_argument("--windows", type=int, default=2, help="perplexity windows of --ctx tokens (default 2)")
    p.add_argument("-n", "--gen-tokens", type=int, default=32, help="greedy tokens compared and timed (default 32)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, ctx=256)


def _read_text(path: str | None) -> str:
    if path is None:
        from engine.measure.bench import PARAGRAPH
        return PARAGRAPH * 8
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def run(args) -> int:
    from engine.executors.plan import default_plan, read_plan
    from engine.executors.sparse import decode_ffns
    from engine.measure.sparsity import evaluate, oracle_thresholds

    if args.windows < 1:
        raise ValueError(f"--windows must be at least 1, got {args.windows}")
    if args.cluster is not None and args.cluster < 1:
        raise ValueError(f"--cluster must be at least 1, got {args.cluster}")
    text = _read_text(args.file)
    calib = _read_text(args.calib) if args.mode == "oracle" else None
    llm = load_model(args, sparse=False)   # the dense path as shipped; the sparse executors below copy
    model = llm.model
    plan = read_plan(args.plan, model.config) if args.plan else default_plan(model.config)
    modes = [args.mode] * model.config.num_hidden_layers if args.mode else plan.decode
    cluster = plan.cluster if args.cluster is None else args.cluster
    thresholds = None
    if args.mode == "oracle":
        ids = llm.tokenizer.encode(calib)[: args.ctx]
        thresholds = oracle_thresholds(model, ids, args.oracle_sparsity)
    ffns = decode_ffns(model.config, model.weights.layers, modes, predictors=plan.predictors,
                       oracle_thresholds=thresholds, down_format=args.down_format, cluster=cluster, records="copy")
    from engine.measure.bench import PARAGRAPH

    prompt = llm.tokenizer.encode(PARAGRAPH)[:16]
    r = evaluate(llm, ffns, llm.tokenizer.encode(text), prompt, ctx=args.ctx, windows=args.windows,
                 gen_tokens=args.gen_tokens)
    if args.json:
        print(json.dumps(r.as_dict()))
        return 0
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    print(f"{'layer':>5} {'mode':>10} {'sparsity':>8} {'recall':>7} {'precis.':>7} {'ffn ms':>7} {'dense ms':>8}")
    for lr in r.layers:
        print(f"{lr.layer:5d} {lr.mode:>10} {pct(lr.sparsity):>8} {pct(lr.recall):>7} {pct(lr.precision):>7} "
              f"{lr.ffn_ms:7.3f} {lr.dense_ffn_ms:8.3f}")
    d = r.as_dict()
    print(f"overall: sparsity {pct(r.sparsity)}, recall {pct(r.recall)}, precision {pct(r.precision)}")
    print(f"perplexity {r.ppl_sparse:.4f} vs dense {r.ppl_dense:.4f} ({100 * d['ppl_change']:+.2f}%; dense on the "
          f"unfused path {r.ppl_dense_unfused:.4f}, {100 * d['ppl_change_vs_unfused']:+.2f}%) over "
          f"{r.scored_tokens} tokens decoded one at a time")
    print(f"greedy: {pct(r.greedy_agreement)} of {r.greedy_tokens} steps agree with dense (teacher-forced), "
          f"first {r.greedy_prefix} free-running tokens identical")
    print(f"FFN {r.ffn_ms:.3f} ms/token vs dense {r.dense_ffn_ms:.3f} ({r.ffn_ms / max(r.dense_ffn_ms, 1e-9):.2f}x); "
          f"decode {r.decode_tps:.1f} tok/s vs dense {r.dense_decode_tps:.1f} tok/s; "
          f"extra memory {r.extra_bytes / 2**20:.1f} MiB")
    for note in r.notes:
        print(f"note: {note}", file=sys.stderr)
    return 0
