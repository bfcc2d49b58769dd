"""llama.cpp's side of tools/bench_peers.py: the `pocketinfer bench` protocol run through llama-cpp-python.

This script runs under the python of a separate venv that has llama-cpp-python installed. It never
imports pocketinfer (it needs only the standard library and numpy). tools/peer_transformers.py
imports the protocol helpers below, so both peers measure exactly the same way:

- the prompt is the text of --text-file tokenized without BOS, repeated and cut to --prompt-tokens
  ids (the same rule as engine/measure/bench.py; "prompt_digest" shows whether the ids came out equal);
- untimed warm-up: a prefill of 8 tokens and 2 decode steps;
- each of --repeats runs starts from an empty KV cache. prefill = one evaluation of all prompt ids
  (logits of the last position only); ttft = prefill + argmax; decode = --gen-tokens - 1
  single-token evaluations, each followed by argmax of the raw logits (no sampler, EOS ignored);
- peak_rss_mb is this process's ru_maxrss (load included); rss_loaded_mb and rss_end_mb are the
  resident set after loading and at the end.

    python tools/peer_llamacpp.py --model M.gguf --text-file paragraph.txt [--threads 2]
        [--prompt-tokens 128] [--gen-tokens 128] [--repeats 1]

The last line of stdout is one JSON object with the same keys as `pocketinfer bench --json`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import statistics
import sys
import time
from typing import Callable, Sequence

import numpy as np

WARMUP_PROMPT = 8
WARMUP_DECODE = 2


# ---------------------------------------------------------------------------------------------
# the protocol (shared with tools/peer_transformers.py)


def parse_args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--text-file", required=True, help="UTF-8 paragraph the prompt is made of")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    if args.prompt_tokens < 1 or args.gen_tokens < 2 or args.repeats < 1 or args.threads < 1:
        ap.error("need --prompt-tokens >= 1, --gen-tokens >= 2, --repeats >= 1 and --threads >= 1")
    return args


def repeat_to(base: Sequence[int], n: int) -> list[int]:
    base = list(base)
    if not base:
        raise SystemExit("the benchmark paragraph tokenizes to nothing")
    return (base * (n // len(base) + 1))[:n]


def ids_digest(ids: Sequence[int]) -> str:
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:12]


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def measure(prefill: Callable[[list[int]], np.ndarray], step: Callable[[int], np.ndarray],
            reset: Callable[[], None], ids: list[int], gen_tokens: int, repeats: int) -> tuple[list[dict], list[int]]:
    """prefill(ids) and step(token) return the last position's logits; reset() empties the KV cache.
    Returns the per-run figures and the greedy tokens of the first run."""
    reset()
    tok = int(np.argmax(prefill(ids[:WARMUP_PROMPT])))
    for _ in range(WARMUP_DECODE):
        tok = int(np.argmax(step(tok)))
    runs, first_tokens = [], None
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        logits = prefill(ids)
        t1 = time.perf_counter()
        tok = int(np.argmax(logits))
        t2 = time.perf_counter()
        out = [tok]
        for _ in range(gen_tokens - 1):
            tok = int(np.argmax(step(tok)))
            out.append(tok)
        t3 = time.perf_counter()
        runs.append({"prefill_tps": len(ids) / max(t1 - t0, 1e-9),
                     "decode_tps": (gen_tokens - 1) / max(t3 - t2, 1e-9), "ttft_s": t2 - t0})
        if first_tokens is None:
            first_tokens = out
    return runs, first_tokens


def report(args, *, engine: str, weight_bytes: int, threads: int, ids: list[int], runs: list[dict],
           tokens: list[int], rss_loaded: float, load_s: float, **extra) -> dict:
    """Print the result as `pocketinfer bench --json` does (the JSON object last) and return it."""
    out = {
        "engine": engine,
        "model": os.path.basename(args.model),
        "model_path": os.path.abspath(args.model),
        "weight_bytes": int(weight_bytes),
        "file_bytes": os.path.getsize(args.model),
        "threads": threads,
        "prompt_tokens": len(ids),
        "generated_tokens": args.gen_tokens,
        "repeats": len(runs),
        "prefill_tps": statistics.median(r["prefill_tps"] for r in runs),
        "decode_tps": statistics.median(r["decode_tps"] for r in runs),
        "ttft_s": statistics.median(r["ttft_s"] for r in runs),
        "peak_rss_mb": peak_rss_mb(),
        "rss_loaded_mb": rss_loaded,
        "rss_end_mb": rss_mb(),
        "load_s": load_s,
        "prompt_digest": ids_digest(ids),
        "output_digest": ids_digest(tokens),
        "runs": runs,
        **extra,
    }
    print(f"{engine}: prefill {out['prefill_tps']:.1f} tok/s, decode {out['decode_tps']:.1f} tok/s, "
          f"ttft {out['ttft_s'] * 1000:.1f} ms, peak rss {out['peak_rss_mb']:.1f} MiB")
    print(json.dumps(out))
    return out


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------
# llama.cpp


def main() -> int:
    args = parse_args("llama.cpp (llama-cpp-python) side of tools/bench_peers.py")
    import llama_cpp

    t0 = time.perf_counter()
    n_ctx = args.prompt_tokens + args.gen_tokens
    llm = llama_cpp.Llama(
        model_path=args.model,
        n_ctx=n_ctx,
        n_batch=args.prompt_tokens,     # the whole prompt in one evaluation, as pocketinfer does
        n_ubatch=args.prompt_tokens,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=False,
        seed=0,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    n_vocab = llm.n_vocab()
    ids = repeat_to(llm.tokenize(read_text(args.text_file).encode("utf-8"), add_bos=False, special=False),
                    args.prompt_tokens)

    def last_logits() -> np.ndarray:
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))

    def prefill(toks: list[int]) -> np.ndarray:
        llm.eval(toks)
        return last_logits()

    def step(tok: int) -> np.ndarray:
        llm.eval([tok])
        return last_logits()

    runs, tokens = measure(prefill, step, llm.reset, ids, args.gen_tokens, args.repeats)
    report(args, engine=f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", weight_bytes=llm._model.size(),
           threads=args.threads, ids=ids, runs=runs, tokens=tokens, rss_loaded=rss_loaded, load_s=load_s,
           n_ctx=llm.n_ctx())
    return 0


if __name__ == "__main__":
    sys.exit(main())
