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
