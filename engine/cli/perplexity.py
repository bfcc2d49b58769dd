"""`pocketinfer perplexity -m MODEL -f FILE --ctx 512 [--json]`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from engine.cli.common import add_model_args, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("perplexity", help="perplexity of a text file (non-overlapping windows)")
    add_model_args(p)
    p.add_argument("-f", "--file", required=True, help="UTF-8 text file")
    p.add_argument("--windows", type=int, default=None, help="score at most this many windows")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, ctx=512)


def run(args) -> int:
    from engine.measure.perplexity import perplexity

    path = Path(args.file)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    ctx = args.ctx  # the window size is also the context the model is loaded with
    llm = load_model(args)
    ids = llm.tokenizer.encode(text)
    t0 = time.perf_counter()
    show = sys.stderr.isatty() and not args.json

    def progress(done, total):
        if show:
            print(f"\rwindow {done}/{total}", end="", file=sys.stderr, flush=True)

    r = perplexity(llm, ids, ctx, args.windows, progress)
    if show:
        print(file=sys.stderr)
    secs = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"file": str(path), "ppl": r.ppl, "nll": r.nll, "windows": r.windows,
                          "scored_tokens": r.scored_tokens, "ctx": r.ctx, "seconds": secs}))
    else:
        print(f"perplexity {r.ppl:.4f} (mean NLL {r.nll:.4f}) over {r.windows} windows of {r.ctx} "
              f"({r.scored_tokens} scored tokens) in {secs:.1f} s")
    return 0
