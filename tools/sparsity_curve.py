"""Quality against sparsity of the sparse decode path (engine/executors/sparse.py), per mode and predictor size.
QUALITY ONLY: nothing here is timed, so it says nothing about speed.

What it measures, on held-out text (default tests/data/ppl_text.txt; never trained or calibrated on):
- oracle mode: for each target sparsity S (--oracle-sparsities), per-layer thresholds on |act(gate)*up|
  calibrated exactly as `pocketinfer eval-sparsity --mode oracle --oracle-sparsity S --calib FILE` does
  (engine.measure.sparsity.oracle_thresholds on the first --ctx tokens of the calibration text);
- predicted mode: for each rank (--ranks), per-layer low-rank predictors trained with the planner's numpy
  trainer (planner.predictors.train_all on planner.model_profile.profile_model of the calibration text,
  labels at the profile's per-layer label threshold), then re-thresholded per layer on the trainer's
  threshold split (planner.predictors.split_chunks) by two rules:
    recall R   the highest score threshold keeping recall >= R on that split (planner's with_threshold);
    sparsity S the score quantile that marks a share 1-S of the neurons active on that split.
  Each (rank, rule) is written as a predictors.npz (engine/executors/predictor.py's format, save_predictors) under
  --out and read back through engine.executors.plan.read_plan, the path `eval-sparsity --plan FILE` takes.
Each point is decoded one token at a time with engine/measure/sparsity.py's own functions (text_windows,
dense_nll, sparse_quality, greedy) and reports what `eval-sparsity --json` reports for quality: realized
FFN sparsity, recall and precision against the true active set (track_truth), perplexity and its change
against dense decode, greedy agreement (teacher-forced share, and the identical free-running prefix).
It does not call engine.measure.sparsity.evaluate() because that also times dense and sparse decode (A B A B) and
recomputes the dense baselines for every point; here the dense baselines are computed once and reused
(decode is deterministic), and the aggregation is evaluate()'s, restricted to all-sparse plans.

At the end it prints markdown tables, the largest sparsity per mode with perplexity within +2% of dense,
and the predictor bytes per layer for each rank; --out gets points.jsonl (one JSON object per point, as
they finish), results.json, tables.md and the predictors_*.npz files.

Run (niced on a shared machine; the defaults are 6 oracle and 24 predicted points of 510 decoded tokens
each, from a few minutes on an idle 2-core machine to ~40 minutes when it is busy):

    nice -n 19 python tools/sparsity_curve.py -t 2 --out /tmp/sparsity_curve
    nice -n 19 python tools/sparsity_curve.py --ranks 16,32 --recalls 0.95 --sparsities "" \\
        --oracle-sparsities 0.5 --windows 1          # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.executors.plan import read_plan  # noqa: E402
from engine.executors.predictor import LayerPredictor, save_predictors  # noqa: E402
from engine.executors.sparse import SparseFFN, decode_ffns  # noqa: E402
from engine.measure.bench import PARAGRAPH  # noqa: E402
from engine.measure.sparsity import dense_nll, greedy, oracle_thresholds, sparse_quality, text_windows  # noqa: E402
from planner.model_profile import profile_model  # noqa: E402
from planner.predictors import split_chunks, train_all, with_threshold  # noqa: E402

MAX_PPL_RISE = 0.02


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v.strip()]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- quality of one executor

def baselines(llm, wins, prompt, gen_tokens):
    """Dense decode (the engine's default path) and dense FFNs on the unfused path sparse layers ride on,
    as engine.measure.sparsity.evaluate computes them."""
    model = llm.model
    nll_dense, nll_unfused, _ = dense_nll(model, wins)
    dense_tokens = greedy(model, prompt, gen_tokens)
    return {"ppl_dense": math.exp(float(nll_dense.mean())), "ppl_dense_unfused": math.exp(float(nll_unfused.mean())),
            "scored_tokens": int(len(nll_dense)), "dense_tokens": dense_tokens}


def quality(llm, ffns: list, wins, prompt, base) -> dict:
    """engine.measure.sparsity.evaluate's quality half for all-sparse FFN executors, against precomputed
    baselines."""
    model = llm.model
    f = model.config.intermediate_size
    n = len(base["dense_tokens"])
    assert all(isinstance(ex, SparseFFN) for ex in ffns), "all-sparse executors only"
    nll, stats, prefix, agree = sparse_quality(model, ffns, wins, prompt, base["dense_tokens"])
    tokens = stats[0].tokens
    assert all(st.tokens == tokens for st in stats) and tokens == base["scored_tokens"] + len(wins)
    hits = sum(st.hits for st in stats)
    true = sum(st.true_active for st in stats)
    chosen = sum(st.chosen for st in stats)
    ppl = math.exp(float(nll.mean()))
    return {
        "sparsity": 1.0 - chosen / (tokens * f * len(stats)),
        "recall": hits / true if true else None,
        "precision": hits / chosen if chosen and true else None,
        "ppl": ppl, "ppl_change": ppl / base["ppl_dense"] - 1.0,
        "ppl_change_vs_unfused": ppl / base["ppl_dense_unfused"] - 1.0,
        "greedy_agreement": agree, "greedy_prefix": prefix, "greedy_tokens": n,
        "layer_sparsity": [round(st.sparsity(f), 4) for st in stats],
        "layer_recall": [round(st.hits / st.true_active, 4) if st.true_active else None for st in stats],
    }


# ---------------------------------------------------------------- predictors

def sparsity_threshold(p: LayerPredictor, h: np.ndarray, sparsity: float) -> LayerPredictor:
    """The score threshold that marks a share 1-sparsity of (token, neuron) pairs of h active."""
    thr = float(np.quantile(p.scores(h), sparsity))
    return dataclasses.replace(p, threshold=round(thr, 6))


def rules(recalls: list[float], sparsities: list[float]) -> list[tuple[str, float]]:
    return [("recall", r) for r in recalls] + [("sparsity", s) for s in sparsities]


def rethreshold(preds: dict[int, LayerPredictor], profile, rule: str, value: float) -> dict[int, LayerPredictor]:
    _, thr_mask, _ = split_chunks(profile.chunk_ids)
    out = {}
    for i, p in preds.items():
        h = profile.h[i][thr_mask].astype(np.float32)            # (n_thr, hidden) f32
        if rule == "recall":
            out[i] = with_threshold(p, h, profile.active[i][thr_mask], value)
        else:
            out[i] = sparsity_threshold(p, h, value)
    return out


def offline(preds: dict[int, LayerPredictor], profile) -> dict:
    """Recall, precision and predicted-active share on the calibration test split (labels of the profile)."""
    _, _, test = split_chunks(profile.chunk_ids)
    tp = pos = npred = size = 0
    for i, p in preds.items():
        pred = p.active(profile.h[i][test].astype(np.float32))
        y = profile.active[i][test]
        tp += int(np.count_nonzero(pred & y))
        pos += int(np.count_nonzero(y))
        npred += int(np.count_nonzero(pred))
        size += pred.size
    return {"calib_test_recall": tp / max(1, pos), "calib_test_precision": tp / max(1, npred),
            "calib_test_sparsity": 1.0 - npred / max(1, size)}


# ---------------------------------------------------------------- tables

def _pct(v, signed=False) -> str:
    if v is None:
        return "-"
    return f"{100 * v:+.2f}%" if signed else f"{100 * v:.1f}%"


def best_within(points: list[dict], limit: float = MAX_PPL_RISE) -> dict | None:
    ok = [p for p in points if p["ppl_change"] <= limit]
    return max(ok, key=lambda p: p["sparsity"]) if ok else None


def _label(p: dict) -> str:
    if p["mode"] == "oracle":
        return f"oracle target {100 * p['target']:.0f}%"
    rule = f"recall >= {p['target']:g}" if p["rule"] == "recall" else f"sparsity {100 * p['target']:.0f}%"
    return f"rank {p['rank']}, {rule}"


def tables(res: dict) -> str:
    b = res["baseline"]
    lines = [f"Dense decode perplexity {b['ppl_dense']:.3f} (dense FFNs on the unfused path that sparse layers "
             f"ride on: {b['ppl_dense_unfused']:.3f}), {b['scored_tokens']} tokens decoded one at a time; "
             f"greedy agreement over {res['args']['gen_tokens']} teacher-forced steps.", ""]
    oracle = [p for p in res["points"] if p["mode"] == "oracle"]
    if oracle:
        lines += ["| oracle target | realized FFN sparsity | perplexity | change vs dense | greedy agreement | "
                  "identical greedy prefix |", "|---:|---:|---:|---:|---:|---:|"]
        for p in oracle:
            lines.append(f"| {100 * p['target']:.0f}% | {_pct(p['sparsity'])} | {p['ppl']:.3f} | "
                         f"{_pct(p['ppl_change'], True)} | {p['greedy_agreement']:.2f} | "
                         f"{p['greedy_prefix']}/{p['greedy_tokens']} |")
        lines.append("")
    pred = [p for p in res["points"] if p["mode"] == "predicted"]
    if pred:
        lines += ["| rank | threshold rule (per layer, on calibration text) | realized FFN sparsity | recall | "
                  "precision | perplexity | change vs dense | greedy agreement | identical greedy prefix |",
                  "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
        for p in pred:
            rule = (f"recall >= {p['target']:g}" if p["rule"] == "recall"
                    else f"predicted sparsity {100 * p['target']:.0f}%")
            lines.append(f"| {p['rank']} | {rule} | {_pct(p['sparsity'])} | {_pct(p['recall'])} | "
                         f"{_pct(p['precision'])} | {p['ppl']:.3f} | {_pct(p['ppl_change'], True)} | "
                         f"{p['greedy_agreement']:.2f} | {p['greedy_prefix']}/{p['greedy_tokens']} |")
        lines.append("")
    if res.get("ranks"):
        lines += ["| rank | predictor bytes per layer (int8, f32 scales and biases) | share of the layer's FFN weight bytes | "
                  "label sparsity (mean over layers) |", "|---:|---:|---:|---:|"]
        for r in res["ranks"]:
            lines.append(f"| {r['rank']} | {r['bytes_per_layer']:,} | {100 * r['bytes_per_layer'] / res['ffn_bytes_per_layer']:.0f}% "
                         f"| {_pct(r['label_sparsity'])} |")
        lines.append(f"\n(FFN gate+up+down weight bytes per layer as loaded: {res['ffn_bytes_per_layer']:,}.)")
        lines.append("")
    lines.append(f"Largest realized sparsity with perplexity at most +{100 * MAX_PPL_RISE:.0f}% vs dense:")
    for mode, pts in (("oracle", oracle), ("predicted", pred)):
        if not pts:
            continue
        best = best_within(pts)
        lines.append(f"- {mode}: " + ("no point within the limit" if best is None else
                     f"{_pct(best['sparsity'])} ({_label(best)}, {_pct(best['ppl_change'], True)})"))
    for r in sorted({p["rank"] for p in pred}):
        best = best_within([p for p in pred if p["rank"] == r])
        lines.append(f"  - rank {r}: " + ("no point within the limit" if best is None else
                     f"{_pct(best['sparsity'])} ({_label(best)}, {_pct(best['ppl_change'], True)})"))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-f", "--file", default=str(ROOT / "tests" / "data" / "ppl_text.txt"),
                    help="held-out evaluation text (default tests/data/ppl_text.txt)")
    ap.add_argument("--calib", default=str(ROOT / "planner" / "data" / "calibration.txt"),
                    help="calibration text for oracle thresholds and predictor training")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("-n", "--gen-tokens", type=int, default=16)
    ap.add_argument("--oracle-sparsities", type=_floats, default=_floats("0,0.3,0.4,0.5,0.6,0.7"))
    ap.add_argument("--ranks", type=_ints, default=_ints("16,32,64,128"))
    ap.add_argument("--recalls", type=_floats, default=_floats("0.9,0.95,0.99,0.995"))
    ap.add_argument("--sparsities", type=_floats, default=_floats("0.2,0.3"),
                    help="predicted-sparsity threshold rule targets (empty string: none)")
    ap.add_argument("--seed", type=int, default=0, help="predictor training seed (planner default 0)")
    ap.add_argument("--out", default="/tmp/sparsity_curve", help="directory for npz files and results")
    args = ap.parse_args(argv)
    if not args.file or Path(args.file).resolve() == Path(args.calib).resolve():
        ap.error("the evaluation text must differ from the calibration text")

    import engine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jsonl = out / "points.jsonl"
    jsonl.write_text("")
    t_start = time.time()
    llm = engine.load(args.model, threads=args.threads, sparse=False)   # dense as shipped; executors are copies
    model = llm.model
    c = model.config
    text = Path(args.file).read_text(encoding="utf-8")
    calib = Path(args.calib).read_text(encoding="utf-8")
    wins = text_windows(llm, llm.tokenizer.encode(text), args.ctx, args.windows)
    prompt = llm.tokenizer.encode(PARAGRAPH)[:16]                  # eval-sparsity's greedy prompt
    lw0 = model.weights.layers[0]
    res = {"args": {k: v for k, v in vars(args).items()}, "model": args.model,
           "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t_start)),
           "ffn_bytes_per_layer": int(lw0.w_gate.nbytes + lw0.w_up.nbytes + lw0.w_down.nbytes),
           "points": [], "ranks": []}

    def record(point: dict) -> None:
        res["points"].append(point)
        with jsonl.open("a") as fh:
            fh.write(json.dumps(point) + "\n")
        _log(f"{_label(point)}: sparsity {_pct(point['sparsity'])}, recall {_pct(point['recall'])}, "
             f"ppl {point['ppl']:.3f} ({_pct(point['ppl_change'], True)}), agreement {point['greedy_agreement']:.2f}")

    _log("dense baselines")
    base = baselines(llm, wins, prompt, args.gen_tokens)
    res["baseline"] = {k: v for k, v in base.items()}
    _log(f"dense ppl {base['ppl_dense']:.4f}, unfused {base['ppl_dense_unfused']:.4f}")

    # oracle: thresholds as eval-sparsity computes them (first ctx tokens of the calibration text)
    calib_ids = llm.tokenizer.encode(calib)[: args.ctx]
    for s in args.oracle_sparsities:
        thr = oracle_thresholds(model, calib_ids, s)
        sp = decode_ffns(c, model.weights.layers, ["oracle"] * c.num_hidden_layers, oracle_thresholds=thr,
                         records="copy")
        record({"mode": "oracle", "target": s, **quality(llm, sp, wins, prompt, base)})
        del sp

    # predicted: one profile, one training per rank, several threshold rules per rank
    if args.ranks:
        _log("profiling the calibration text")
        profile = profile_model(llm, args.calib)
        label_sp = float(np.mean([st.label_sparsity for st in profile.layers]))
        res["profile"] = {"n_tokens": int(profile.n_tokens), "label_sparsity_mean": label_sp,
                          "label_sparsity_per_layer": [st.label_sparsity for st in profile.layers]}
        _log(f"{profile.n_tokens} calibration tokens, mean label sparsity {label_sp:.3f}")
    for rank in args.ranks:
        t0 = time.time()
        preds, _ = train_all(profile, rank=rank, seed=args.seed)
        nbytes = preds[0].nbytes
        res["ranks"].append({"rank": rank, "bytes_per_layer": int(nbytes), "label_sparsity": label_sp,
                             "train_seconds": round(time.time() - t0, 1)})
        _log(f"rank {rank}: trained in {time.time() - t0:.0f} s, {nbytes} bytes per layer")
        for rule, value in rules(args.recalls, args.sparsities):
            layered = rethreshold(preds, profile, rule, value)
            path = out / f"predictors_r{rank}_{rule}{value:g}.npz"
            save_predictors(path, layered, c.hidden_size, c.intermediate_size)
            plan = read_plan(path, model.config)                            # what `eval-sparsity --plan` reads
            loaded = plan.predictors
            assert all(m == "predicted" for m in plan.decode) and plan.cluster == 1
            sp = decode_ffns(c, model.weights.layers, plan.decode, predictors=loaded, records="copy")
            record({"mode": "predicted", "rank": rank, "rule": rule, "target": value, "npz": str(path),
                    "thresholds": [loaded[i].threshold for i in range(c.num_hidden_layers)],
                    **offline(loaded, profile), **quality(llm, sp, wins, prompt, base)})
            del sp

    res["seconds"] = round(time.time() - t_start, 1)
    res["finished_utc"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    (out / "results.json").write_text(json.dumps(res, indent=1))
    md = tables(res)
    (out / "tables.md").write_text(md)
    print(md)
    _log(f"done in {res['seconds']:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
