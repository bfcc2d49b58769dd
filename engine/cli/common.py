"""Arguments and helpers shared by the model-running subcommands."""

from __future__ import annotations

import argparse
import sys

from engine.executors.prefill import ENGINES

DEFAULT_MODEL = "smollm2-135m-instruct"


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"HF directory, .gguf file or registry alias (default: {DEFAULT_MODEL})")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("-c", "--ctx", type=int, default=None, help="context length (default: min(model's, 4096))")
    p.add_argument("--kv-cache", choices=("f16", "f32"), default=None,
                   help="KV cache element type (default: f16 for GGUF files, as llama.cpp; f32 for HF checkpoints)")
    p.add_argument("--prefill", choices=ENGINES, default=None,
                   help="prefill engine: int8 (x rounded to int8, integer kernels on Q4/Q8 weights), onnx (ONNX "
                        "Runtime, MatMulNBits on the stored blocks; falls back to f32 when it cannot run) or f32 "
                        "(BLAS on f32 tiles) (default: the deploy's plan, else int8 where the CPU has AVX-512 VNNI, f32 "
                        "elsewhere)")
    p.add_argument("--verbose", action="store_true", help="print load and speed statistics on stderr")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int | None) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=max_tokens,
                   help=f"tokens to generate at most (default: {max_tokens or 'until end of turn or context'})")
    p.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely tokens; 0 = off (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, help="drop tokens below min_p x the top probability (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, help="penalty for the last 64 tokens; 1 = off (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")


def sampling_kwargs(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop or None)


def load_model(args, sparse: bool = True):
    """Load args.model, pulling a registry model first with visible progress if it is not cached;
    sparse as engine.loader.load's."""
    import time

    from engine.errors import RegistryError
    from engine.formats import registry
    from engine.loader import load

    try:
        alias_cached = registry.is_cached(args.model)
    except RegistryError:
        alias_cached = None  # not an alias: a path or hf: source, resolved by load()
    if alias_cached is False:
        from engine.cli import pull

        pull.run(argparse.Namespace(alias=args.model, force=False, list=False, quiet_path=True))
    t0 = time.perf_counter()
    llm = load(args.model, threads=args.threads, n_ctx=args.ctx, kv_cache=getattr(args, "kv_cache", None),
               sparse=sparse, prefill=getattr(args, "prefill", None))
    if args.verbose:
        c = llm.config
        print(f"loaded {llm.source} in {time.perf_counter() - t0:.2f} s: {c.num_hidden_layers} layers, "
              f"hidden {c.hidden_size}, vocab {c.vocab_size}, weights {llm.weight_bytes / 2**20:.1f} MiB "
              f"(file {llm.file_bytes / 2**20:.1f} MiB), ctx {llm.n_ctx}, threads {llm.threads}", file=sys.stderr)
        print(llm.describe(), file=sys.stderr)
        p = (llm.plan or {}).get("predicted")
        if p:   # a deploy directory: what the planner predicted, to read against the measured line at the end
            print(f"plan predicts: decode {p['decode_tps']:.1f} tok/s, ttft {p['ttft_s'] * 1000:.0f} ms, "
                  f"peak rss {p['peak_rss_mb']:.0f} MB, flash {p['flash_bytes_per_token'] / 2**20:.2f} MiB/token",
                  file=sys.stderr)
    return llm


def print_stats(stats, finish_reason: str | None = None) -> None:
    s = stats
    tail = f", finish {finish_reason}" if finish_reason else ""
    print(f"prompt {s.prompt_tokens} tok ({s.cached_tokens} cached) at {s.prompt_tps:.1f} tok/s, "
          f"generated {s.generated_tokens} tok at {s.generation_tps:.1f} tok/s, "
          f"ttft {s.ttft_s * 1000:.0f} ms, peak rss {s.peak_rss_mb:.0f} MB, rss {s.rss_mb:.0f} MB{tail}",
          file=sys.stderr)
    f = s.flash
    if f and "lm_head_bytes" in f:
        print(f"flash: embeddings / LM head streamed from the weights file: {f['lm_head_bytes'] / 2**20:.1f} MiB read "
              f"this request", file=sys.stderr)
    if f and "tokens" in f:
        print(f"flash: {f['tokens']} decode tokens, hot segment served {f['hot_hit_rate']:.1%} of needed neurons, "
              f"cold cache hit rate {f['cache_hit_rate']:.1%}, read {f['flash_bytes_per_token'] / 2**20:.2f} MiB/token "
              f"in {f['requests_per_token']:.1f} requests, I/O wait {f['io_wait_ms_per_token']:.2f} ms/token, "
              f"overlap {f['overlap_ratio']:.0%}, FFN {f['ffn_ms_per_token']:.2f} ms/token, "
              f"prefill read {f['prefill_bytes'] / 2**20:.1f} MiB", file=sys.stderr)
