"""`pocketinfer generate -m MODEL -p PROMPT`: plain text completion (no chat template), streamed to stdout."""

from __future__ import annotations

import json
import sys

from engine.cli.common import add_model_args, add_sampling_args, load_model, print_stats, sampling_kwargs


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="complete a prompt (raw text, no chat template)")
    add_model_args(p)
    p.add_argument("-p", "--prompt", required=True, help="prompt text; '-' reads it from stdin")
    add_sampling_args(p, max_tokens=256)
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, stats) instead of streaming")
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = load_model(args)
    if args.json:
        r = llm.generate(prompt, **sampling_kwargs(args))
        print(json.dumps({
            "text": r.text, "tokens": r.tokens, "finish_reason": r.finish_reason,
            "prompt_tokens": r.prompt_tokens, "generated_tokens": len(r.tokens), "prompt_tps": r.prompt_tps,
            "generation_tps": r.generation_tps, "ttft_s": r.ttft_s, "peak_rss_mb": r.peak_rss_mb,
            "rss_mb": r.stats.rss_mb, "flash": r.stats.flash,
        }, ensure_ascii=False))
        if args.verbose:
            print_stats(r.stats, r.finish_reason)
        return 0
    last = None
    for chunk in llm.stream(prompt, **sampling_kwargs(args)):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    sys.stdout.write("\n")
    if args.verbose:
        print_stats(last.stats, last.finish_reason)
    return 0
