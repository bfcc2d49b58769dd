"""The planner's predictions against measurements: for each deploy directory, decode tok/s, TTFT and peak
RSS measured by `pocketinfer bench` in a child process, next to what its plan.json predicted.

    python tools/check_plan.py DEPLOY [DEPLOY ...] [--rounds 3] [--gen-tokens 256] [--threads 2] [--cold]

Rounds alternate the directories (A B A B ...) so that a slow spell on a shared machine hits them alike;
each figure is the median over rounds. Checks printed per directory:
- decode tok/s within +-30% of the plan's prediction;
- peak RSS (the child's high-water mark, loading included, while generating --gen-tokens tokens with
  EOS ignored) at most the budget plus the runtime overhead plan.json states
  (memory.runtime_overhead_bytes: interpreter, libraries, scratch and the KV cache).
Flash plans also get their reads per token (the deploy's FFN bundle reads) next to the prediction.
With --cold every file of a deploy is dropped from the page cache (posix_fadvise DONTNEED) before each
run, and the table adds each deploy's decode speed as a share of the first deploy's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from bench_memcap import drop_cache

TOLERANCE = 0.30


def bench_once(deploy: Path, args) -> dict:
    if args.cold:
        for f in deploy.iterdir():
            if f.is_file():
                drop_cache(f)
    cmd = [sys.executable, "-m", "engine", "bench", "-m", str(deploy), "--prompt-tokens", str(args.prompt_tokens),
           "--gen-tokens", str(args.gen_tokens), "--repeats", "1", "--json"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"check_plan: `{' '.join(cmd)}` failed: {p.stderr.strip().splitlines()[-1:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deploys", nargs="+", type=Path)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--cold", action="store_true", help="drop each deploy's files from the page cache before each run")
    args = ap.parse_args()

    plans = {}
    for d in args.deploys:
        try:
            plans[d] = json.loads((d / "plan.json").read_text())
        except (OSError, ValueError) as e:
            raise SystemExit(f"check_plan: {d / 'plan.json'}: {e}; give deploy directories written by `pocketinfer plan`")
    runs: dict[Path, list[dict]] = {d: [] for d in args.deploys}
    for r in range(args.rounds):
        for d in args.deploys:
            res = bench_once(d, args)
            runs[d].append(res)
            print(f"round {r + 1}/{args.rounds} {d.name}: decode {res['decode_tps']:.1f} tok/s, "
                  f"peak rss {res['peak_rss_mb']:.0f} MiB", file=sys.stderr, flush=True)

    print(f"{args.prompt_tokens} prompt + {args.gen_tokens} generated tokens, median of {args.rounds} alternating rounds")
    print("| deploy | budget | predicted decode tok/s | measured | measured/predicted | within ±30% "
          "| predicted peak RSS MiB | budget + overhead MiB | measured peak RSS MiB | within |")
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    ok = True
    for d in args.deploys:
        p = plans[d]
        pred = p["predicted"]
        dec = statistics.median(x["decode_tps"] for x in runs[d])
        rss = statistics.median(x["peak_rss_mb"] for x in runs[d])
        limit = (p["budget_bytes"] + p["memory"]["runtime_overhead_bytes"]) / 2**20
        ratio = dec / pred["decode_tps"]
        speed_ok = abs(ratio - 1) <= TOLERANCE
        rss_ok = rss <= limit
        ok &= speed_ok and rss_ok
        print(f"| {d.name} | {p.get('budget_request', p['budget_bytes'])} | {pred['decode_tps']:.1f} | {dec:.1f} "
              f"| {ratio:.2f} | {'yes' if speed_ok else 'NO'} | {pred['peak_rss_mb']:.0f} | {limit:.0f} | {rss:.0f} "
              f"| {'yes' if rss_ok else 'NO'} |")
    if args.cold:
        first = args.deploys[0]
        print(f"\ndecode against {first.name}, median of the per-round ratios (cold page cache before every run):")
        for d in args.deploys[1:]:
            r = statistics.median(a["decode_tps"] / b["decode_tps"] for a, b in zip(runs[d], runs[first]))
            flash = plans[d]["predicted"].get("flash_bytes_per_token", 0) / 2**20
            print(f"  {d.name}: {r:.3f}x, {flash:.1f} MiB read from flash per token (plan.json)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
