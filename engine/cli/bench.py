"""`pocketinfer bench -m MODEL`: prefill and decode speed, time to first token and peak memory.

A fixed prompt of exactly --prompt-tokens ids, then exactly --gen-tokens greedy tokens with EOS
ignored, after an untimed warm-up; medians over --repeats (see engine/measure/bench.py for the protocol).
With --json the last line of stdout is one JSON object (tools/bench_peers.py reads it).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

from engine.cli.common import add_model_args, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="measure prefill/decode speed, time to first token and peak memory")
    add_model_args(p)
    p.add_argument("--prompt-tokens", type=int, default=128, help="prompt length in tokens (default 128)")
    p.add_argument("--gen-tokens", type=int, default=128,
                   help="tokens to generate, EOS ignored; the first comes from prefill (default 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; medians are reported (default 3)")
    p.add_argument("--json", action="store_true", help="end stdout with one JSON object of the results")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.generate import peak_rss_mb, rss_mb
    from engine.measure import bench

    bench.check_args(args.prompt_tokens, args.gen_tokens, args.repeats)   # fail before loading
    t0 = time.perf_counter()
    llm = load_model(args)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()

    def progress(done, total):
        if args.verbose:
            print(f"run {done}/{total} done", file=sys.stderr, flush=True)

    r = bench.bench(llm, args.prompt_tokens, args.gen_tokens, args.repeats, progress)
    out = {
        "engine": "pocketinfer",
        "model": os.path.basename(llm.source.rstrip("/")),
        "model_path": llm.source,
        "weight_bytes": llm.weight_bytes,
        "file_bytes": llm.file_bytes,
        "threads": llm.threads,
        "prompt_tokens": r.prompt_tokens,
        "generated_tokens": r.generated_tokens,
        "repeats": len(r.runs),
        "prefill_tps": r.prefill_tps,
        "decode_tps": r.decode_tps,
        "ttft_s": r.ttft_s,
        "peak_rss_mb": peak_rss_mb(),
        "rss_loaded_mb": rss_loaded,
        "rss_end_mb": rss_mb(),
        "load_s": load_s,
        "prompt_digest": bench.ids_digest(bench.prompt_ids(llm.tokenizer, r.prompt_tokens)),
        "output_digest": bench.ids_digest(r.runs[0].tokens),
        "runs": r.per_run(),
    }
    print(format_table(out))
    if args.json:
        print(json.dumps(out))
    return 0


def format_table(res: dict) -> str:
    runs = res["runs"]

    def row(name, key, scale=1.0, fmt="{:9.1f}"):
        vals = [x[key] * scale for x in runs]
        cells = [statistics.median(vals), min(vals), max(vals)]
        return f"{name:<15}" + "".join(fmt.format(v) for v in cells)

    lines = [
        f"pocketinfer bench: {res['model']}, {res['threads']} threads, prompt {res['prompt_tokens']} tokens, "
        f"generate {res['generated_tokens']} tokens, {res['repeats']} repeats",
        f"{'':<15}{'median':>9}{'min':>9}{'max':>9}",
        row("prefill tok/s", "prefill_tps"),
        row("decode tok/s", "decode_tps"),
        row("TTFT ms", "ttft_s", 1000.0),
        f"{'peak RSS MiB':<15}{res['peak_rss_mb']:9.1f}   (whole process, load included; "
        f"{res['rss_loaded_mb']:.1f} after load, {res['rss_end_mb']:.1f} at the end)",
        f"weights {res['weight_bytes'] / 2**20:.1f} MiB in memory, file {res['file_bytes'] / 2**20:.1f} MiB, "
        f"loaded in {res['load_s']:.2f} s",
    ]
    return "\n".join(lines)
