"""Input-sparse decode end to end: a deploy made with `pocketinfer plan --quality-budget` against the same
model's dense decode, side by side in one process.

    python tools/bench_input_sparse_decode.py DEPLOY [--model smollm2] [--threads 2] [--rounds 5]
    python tools/bench_input_sparse_decode.py DEPLOY --ppl tests/data/ppl_text.txt --ctx 256 --windows 2

Variants, run in turn (A B C A B C ...) for --rounds rounds, each decoding --tokens tokens after a
--prompt-tokens prompt (teacher-forced on fixed ids, so every variant does the same work):
  dense             the model as loaded without a plan (the one-region decode where it can run);
  dense per layer   the same weights through the layer-by-layer stack, dense FFNs: the path input-sparse
                    decode is built on, so the difference to it is the kernels' alone;
  input-sparse      the deploy's plan.
Reported: median tok/s of each and the ratios. With --ppl, also the perplexity of single-token decode
(engine/measure/sparsity.decode_nll: the path that runs) over --windows windows of --ctx tokens, for
the dense model and the deploy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import engine  # noqa: E402
from engine.executors.choose import layer_by_layer  # noqa: E402
from engine.executors.dense import DenseFFN  # noqa: E402


def decode_seconds(model, prompt: np.ndarray, tokens: np.ndarray) -> float:
    cache = model.new_cache(len(prompt) + len(tokens))
    model.forward(prompt, cache, all_logits=False)
    t0 = time.perf_counter()
    for tok in tokens:
        model.forward(np.array([tok]), cache, all_logits=False)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("deploy", help="deploy directory with decode.input_sparsity in its plan.json")
    ap.add_argument("--model", default="smollm2", help="the dense model: registry alias, .gguf or HF directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--ppl", default=None, metavar="TEXT", help="also decode perplexity on this text")
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--windows", type=int, default=2)
    args = ap.parse_args(argv)

    dense = engine.load(args.model, threads=args.threads)
    sparse = engine.load(args.deploy, threads=args.threads)
    print(dense.describe().splitlines()[-1])
    print(sparse.describe().splitlines()[-1])
    m = dense.model
    per_layer = layer_by_layer(m, [DenseFFN(lw, m.config.act_kind) for lw in m.weights.layers])
    rng = np.random.default_rng(0)
    vocab = m.config.vocab_size
    prompt = rng.integers(3, vocab, args.prompt_tokens)
    tokens = rng.integers(3, vocab, args.tokens)

    def run_dense():
        return decode_seconds(m, prompt, tokens)

    def run_per_layer():
        with m.running(per_layer):
            return decode_seconds(m, prompt, tokens)

    def run_sparse():
        return decode_seconds(sparse.model, prompt, tokens)

    variants = {"dense": run_dense, "dense per layer": run_per_layer, "input-sparse": run_sparse}
    for fn in variants.values():                       # warm-up
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.rounds):
        for k, fn in variants.items():
            times[k].append(fn())
    tps = {k: args.tokens / statistics.median(v) for k, v in times.items()}
    print(f"\n{args.rounds} rounds, {args.tokens} tokens after a {args.prompt_tokens}-token prompt, "
          f"{args.threads} threads\n")
    print("| variant | decode tok/s (median) | vs dense | vs dense per layer |")
    print("|---|---|---|---|")
    for k, v in tps.items():
        print(f"| {k} | {v:.1f} | {v / tps['dense']:.3f} | {v / tps['dense per layer']:.3f} |")
    if args.ppl:
        from engine.measure.sparsity import decode_nll, text_windows
        ids = dense.tokenizer.encode(Path(args.ppl).read_text(encoding="utf-8"))
        wins = text_windows(dense, ids, args.ctx, args.windows)
        nll_d = np.concatenate([decode_nll(m, w) for w in wins])
        nll_s = np.concatenate([decode_nll(sparse.model, w) for w in wins])
        pd, ps = float(np.exp(nll_d.mean())), float(np.exp(nll_s.mean()))
        print(f"\ndecode perplexity on {args.ppl} ({len(wins)} windows of {args.ctx}, {len(nll_d)} scored tokens): "
              f"dense {pd:.4f}, input-sparse {ps:.4f} ({ps / pd - 1:+.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
