"""Where one decode step's time goes: layer kernels, LM head, embedding, sampling, and the rest (Python).

    python tools/profile_decode.py                       # default model, 2 threads
    python tools/profile_decode.py -m FILE.gguf --threads 1 --pos 200 --reps 300

Each part is timed on its own, many times, in the order whole step, parts, whole step..., and the
minimum and median are printed (minimum: the cost without interference from other processes on a
shared machine; median: what a run sees). "Python and glue" is the whole step minus the timed parts:
dispatch, argument unpacking and the small numpy operations between kernels. Where the model runs its
layers in one call (kernels/decode_token.py) that call is one part, reading the weights from DRAM as a
real step does. Otherwise one layer is timed and multiplied: such timings are cache-warm for small
models (a layer's weights fit the last-level cache on their own), so the parts can then sum to less
than the whole step, which streams every weight from DRAM.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np


def _timed(fn, reps: int) -> list[float]:
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pos", type=int, default=200, help="decode position (cache length) to time at")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()

    import engine
    from engine.executors.one_region import OneRegionDecode
    from kernels.norm import rmsnorm

    llm = engine.load(args.model, threads=args.threads)
    m, w, c = llm.model, llm.model.weights, llm.config
    cache = m.new_cache(args.pos + 2)
    m.forward(np.arange(args.pos) % c.vocab_size, cache, all_logits=False)
    tok = np.array([5])

    def step():
        cache.length = args.pos
        return m.forward(tok, cache, all_logits=False)

    logits = step()
    x = np.random.default_rng(0).standard_normal((1, c.hidden_size)).astype(np.float32)
    parts = {
        "embedding row": lambda: w.embed.rows_f32(tok),
        "final norm": lambda: rmsnorm(x, w.norm, c.rms_norm_eps, x.copy()),
        "LM head": lambda: w.lm_head.matmul(x),
        "greedy pick (argmax)": lambda: int(np.argmax(logits[-1])),
    }
    decode = m.executors.decode
    if isinstance(decode, OneRegionDecode):
        cos, sin = m.rope.table(args.pos, 1)

        def all_layers():
            decode.run(x.copy(), cache, args.pos, cos, sin)
        # Every layer in one call: timed in place, so its weights stream from DRAM as in a real step.
        parts["all layers (one parallel region, kernels/decode_token.py)"] = all_layers
        scale = {}
    else:
        lw = w.layers[0]
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            mat = getattr(lw, name)
            if mat is not None:
                v = np.random.default_rng(1).standard_normal(mat.shape[1]).astype(np.float32)
                parts[f"{name} matvec x {c.num_hidden_layers}"] = (lambda mat=mat, v=v: mat.matvec(v))
        scale = {k: c.num_hidden_layers for k in parts if " matvec x " in k}

    whole, times = [], {k: [] for k in parts}
    rounds = 5
    for _ in range(rounds):
        whole += _timed(step, args.reps // rounds)
        for k, fn in parts.items():
            times[k] += [t * scale.get(k, 1) for t in _timed(fn, args.reps // rounds)]

    def row(name, ts):
        return f"| {name} | {min(ts) * 1e3:.3f} | {statistics.median(ts) * 1e3:.3f} |"

    print(f"model {llm.source}, {args.threads} threads, position {args.pos}, {args.reps} reps")
    print("| part | min ms | median ms |\n|---|---:|---:|")
    print(row("whole decode step", whole))
    for k, ts in times.items():
        print(row(k, ts))
    rest_min = min(whole) - sum(min(ts) for ts in times.values())
    rest_med = statistics.median(whole) - sum(statistics.median(ts) for ts in times.values())
    print(f"| Python and glue (whole minus parts) | {rest_min * 1e3:.3f} | {rest_med * 1e3:.3f} |")


if __name__ == "__main__":
    main()
