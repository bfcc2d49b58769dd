"""Same tokens at any budget: greedy decode of deploy directories below 100% against the fully resident run.

    nice -n 19 /work/venv/bin/python tools/check_flash_tokens.py DEPLOY [DEPLOY ...] [--tokens 128]
        [--prompt TEXT] [--cache N] [--predicted] [--dense SOURCE]

For each deploy directory (`pocketinfer plan SOURCE --memory-budget 60% -o DEPLOY`) it runs the prompt
and then `--tokens` greedy steps (argmax, EOS ignored, so every run has the same length):
- "flash":    as planned: hot neurons resident, the rest read from the bundle file through the cache;
- with --cache N, "flash + N-neuron cache": the planned hot counts plus N cached cold neurons per layer;
- "resident": the same bundle file and layer modes with every neuron hot (the same FFN arithmetic,
              nothing read from flash): the fully resident run of that deploy.
With --predicted, also every layer in predicted mode (the deploy's predictors), flash (planned hot
counts and the --cache) against predicted fully resident: each token then needs its own neurons, so
hits, misses and merged reads vary from token to token.
All must give the same tokens and bitwise the same logits at every step: the cache changes where the
weights come from, never the arithmetic (engine/executors/flash_ffn.py). The first deploy's resident run is the
reference for all of them (deploys of one model share the bundle layout when their modes agree).

--dense SOURCE also runs the source model loaded directly (the default in-RAM plan: fused dense Q4
matvecs over the GGUF's own down projection). That is other arithmetic (the bundles hold down
transposed and re-quantized to int8), so it is reported, not required: the first step where its
tokens part from the reference.

Exit status 0 when every flash run equals the reference, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.executors.choose import layer_by_layer  # noqa: E402
from engine.executors.flash_ffn import FlashFFN, LayerPlan, store_of  # noqa: E402
from engine.executors.predictor import load_predictors  # noqa: E402
from engine.loader import load  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def greedy(model, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """Prompt, then `steps` argmax tokens fed back -> (tokens, (steps, vocab) f32 logits of each step)."""
    cache = model.new_cache(len(ids) + steps + 1)
    logits = model.forward(np.asarray(ids), cache, all_logits=False)[0]
    tokens, rows = [], []
    for _ in range(steps):
        rows.append(logits.copy())
        t = int(np.argmax(logits))
        tokens.append(t)
        logits = model.forward(np.array([t]), cache, all_logits=False)[0]
    return tokens, np.stack(rows)


def variant(flash: FlashFFN, hot: int | None, cache: int, policy: str = "lru",
            predictors: dict | None = None) -> FlashFFN:
    """The same bundle file with `hot` neurons per layer resident (None: as planned) and a dynamic segment
    of `cache` neurons per layer; the planned layer modes, or every layer "predicted" by `predictors`."""
    F = flash.bundles.ffn
    plans = []
    for L in flash.layers:
        h = L.H if hot is None else hot
        plans.append(LayerPlan("predicted" if predictors else L.mode, hot=h, cache=min(cache, F - h)))
    if not predictors:
        predictors = {i: L.predictor for i, L in enumerate(flash.layers) if L.predictor is not None}
    return FlashFFN(flash.bundles, plans, flash.act, predictors=predictors, io_threads=flash.reader.threads,
                    direct=flash.reader.direct, policy=policy)


def run_all(model, ids, steps: int, runs: list) -> list:
    """Greedy decode with each (name, FlashFFN) in turn -> [(name, tokens, logits)]."""
    results = []
    for name, ff in runs:
        t0 = time.perf_counter()
        with model.running(layer_by_layer(model, ff.layer_ffns(False), ff.layer_ffns(True))):
            tok, lg = greedy(model, ids, steps)
        s = ff.stats.summary()
        print(f"  {name}: {time.perf_counter() - t0:.1f} s; hot {s['hot_hit_rate']:.3f} of the active neurons, "
              f"cache hit {s['cache_hit_rate']:.3f} of the cold ones, "
              f"{s['flash_bytes_per_token'] / 2**20:.2f} MiB read/token")
        ff.close()
        results.append((name, tok, lg))
    return results


def compare(results: list, ref_tokens: list[int], ref_logits: np.ndarray) -> bool:
    ok = True
    for name, tok, lg in results:
        same_tok = tok == ref_tokens
        same_log = lg.shape == ref_logits.shape and np.array_equal(lg, ref_logits)
        ok &= same_tok and same_log
        k = first_diff(tok, ref_tokens)
        print(f"  {name} vs reference: tokens {'EQUAL' if same_tok else f'DIFFER from step {k}'}, logits "
              f"{'bitwise equal' if same_log else f'max |diff| {np.abs(lg - ref_logits).max():.3g}'}")
    return ok


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("deploys", nargs="+", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--dense", help="also run this source model loaded directly (reported, not required)")
    ap.add_argument("--predicted", action="store_true",
                    help="also run every layer in predicted mode (the deploy's predictors.npz), flash against "
                         "resident: the same check where each token needs its own set of neurons")
    ap.add_argument("--cache", type=int, default=0,
                    help="also run each deploy with this many cold neurons per layer cached (the planner may "
                         "give none), so hits, misses and staging mix in every token")
    a = ap.parse_args()
    ref_tokens = ref_logits = None
    ok = True
    for d in a.deploys:
        llm = load(d)
        model = llm.model
        flash = store_of(model.executors)
        if flash is None:
            print(f"{d}: not a flash deploy (plan at 100%?): nothing to compare")
            continue
        ids = llm.tokenizer.encode(llm.tokenizer.apply_chat_template([{"role": "user", "content": a.prompt}],
                                                                      add_generation_prompt=True))
        budget = llm.plan.get("budget_bytes")
        hot = sum(L.H for L in flash.layers)
        cache = sum(L.C for L in flash.layers)
        modes = sorted({L.mode for L in flash.layers})
        print(f"{d}: plan budget {budget} B, {hot} hot + {cache} cached of {len(flash.layers) * flash.bundles.ffn} "
              f"neurons, modes {modes}, prompt {len(ids)} tokens, {a.tokens} greedy steps; {flash.reader.mode_note}")
        policy = llm.plan.get("flash", {}).get("cache_policy", "lru")
        runs = [("flash", flash)]
        if a.cache:
            runs.append((f"flash + {a.cache}-neuron {policy} cache", variant(flash, None, a.cache, policy)))
        runs.append(("resident", variant(flash, flash.bundles.ffn, 0)))
        results = run_all(model, ids, a.tokens, runs)
        if ref_tokens is None:
            ref_tokens, ref_logits = results[-1][1], results[-1][2]
            print(f"  reference tokens (this deploy fully resident): {ref_tokens}")
        ok &= compare(results, ref_tokens, ref_logits)
        if a.predicted:
            c = model.config
            preds = load_predictors(d / llm.plan["files"].get("predictors", "predictors.npz"), c.hidden_size,
                                    c.intermediate_size)
            print("  every layer predicted (the predictor picks each token's neurons), against its own resident run:")
            runs = [(f"predicted, planned hot + {a.cache}-neuron {policy} cache",
                     variant(flash, None, a.cache, policy, preds)),
                    ("predicted, resident", variant(flash, flash.bundles.ffn, 0, predictors=preds))]
            results = run_all(model, ids, a.tokens, runs)
            ok &= compare(results[:1], results[1][1], results[1][2])
    if a.dense and ref_tokens is not None:
        llm = load(a.dense)
        tok_d, log_d = greedy(llm.model, ids, a.tokens)
        k = first_diff(tok_d, ref_tokens)
        print(f"{a.dense} loaded directly (dense fused Q4 FFN, other arithmetic): tokens "
              f"{'EQUAL' if k is None else f'differ from step {k}'}; max |logit diff| at step 0 "
              f"{np.abs(log_d[0] - ref_logits[0]).max():.3g}")
    print("SAME TOKENS: PASS" if ok else "SAME TOKENS: FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
