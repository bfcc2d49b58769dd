"""One measured decode step of the model being planned, for CostModel.calibrate.

The device profile times single matrices; a whole model's step also pays per-matrix stream start-up,
fork/join per matvec, attention and the Python between layers. Timing the real thing on the resident
dense path is the most direct evidence the planner can have, and it takes about a second.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

PROMPT_TOKENS = 192   # decode then runs at positions ~192-256: the mean context the cost model assumes
STEPS = 48


def measure_decode_step(llm, prompt_tokens: int = PROMPT_TOKENS, steps: int = STEPS) -> float:
    """Median seconds of one greedy single-token forward after a prompt_tokens prefill (not timed)."""
    model = llm.model
    prompt_tokens = max(1, min(prompt_tokens, llm.n_ctx - steps - 1))
    ids = (np.arange(prompt_tokens, dtype=np.int64) * 7 + 1) % model.config.vocab_size   # any valid ids
    cache = model.new_cache(prompt_tokens + steps + 1)
    tok = int(np.argmax(model.forward(ids, cache, all_logits=False)[-1]))
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        tok = int(np.argmax(model.forward(np.array([tok], dtype=np.int64), cache, all_logits=False)[-1]))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


FLASH_LAYERS = 4          # layers of the model streamed by measure_flash_layer
FLASH_TOKENS = (3, 12)    # untimed, then timed tokens


def measure_flash_layer(llm, directory, request_bytes: int, io_threads: int) -> float:
    """Seconds per layer of the flash FFN (engine/executors/flash_ffn.py) streaming every neuron of a layer from
    flash: a bundle file of a few of this model's layers, written in `directory` (the deploy's storage),
    read with O_DIRECT in dense mode with nothing hot, timed over a few tokens with read-ahead, as a
    deploy runs them. The kernel and storage figures miss what this adds up: the copies from the read
    buffers, the kernels called in pieces as reads land, and the Python per request and per layer."""
    from pathlib import Path

    from engine.executors.flash_ffn import FlashFFN, LayerPlan
    from engine.flash.bundles import open_bundles
    from planner.bundles import write_bundles

    model = llm.model
    c = model.config
    n = min(FLASH_LAYERS, c.num_hidden_layers)
    path = Path(directory) / ".flash-probe.bundles"
    layers = model.weights.layers[:n]
    orders = [np.arange(c.intermediate_size, dtype=np.int32)] * n
    try:
        write_bundles(path, layers, orders, fingerprint="probe", act=c.hidden_act)
        ff = FlashFFN(open_bundles(path), [LayerPlan("dense", 0, 0)] * n, c.act_kind, io_threads=io_threads,
                      request_bytes=request_bytes)
        try:
            ff.reader.drop_cache()
            rng = np.random.default_rng(0)
            hs = rng.standard_normal((sum(FLASH_TOKENS), c.hidden_size)).astype(np.float32)
            warm, timed = FLASH_TOKENS
            for t in range(warm):
                for i in range(n):
                    ff.ffn(i, hs[t])
            t0 = time.perf_counter()
            for t in range(warm, warm + timed):
                for i in range(n):
                    ff.ffn(i, hs[t])
            return (time.perf_counter() - t0) / (timed * n)
        finally:
            ff.close()
    finally:
        path.unlink(missing_ok=True)
