"""Generation in three layers (as mlx-lm): `generate_step` yields token ids, `stream_generate` yields
text chunks with statistics, and the LLM class's `generate` collects them into one Response."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np

from engine.model.kv_cache import KVCache
from engine.model.transformer import Transformer
from engine.text.detokenizer import StreamingDetokenizer
from engine.text.stopping import StopChecker


@dataclass
class Stats:
    prompt_tokens: int = 0
    cached_tokens: int = 0          # prompt tokens reused from the previous call's KV cache
    generated_tokens: int = 0
    prompt_tps: float = 0.0         # prompt tokens evaluated per second (prefill)
    generation_tps: float = 0.0     # tokens per second after the first one (decode)
    ttft_s: float = 0.0             # time to first token, from the call
    peak_rss_mb: float = 0.0
    rss_mb: float = 0.0             # resident set at the end of the call
    # What the model's executors counted during this call (engine/executors/base.Executors.report): for FFNs
    # run from flash (engine/executors/flash_ffn.py) hit rates per segment, flash bytes and I/O wait per
    # token, overlap ratio and "prefill_bytes"; "lm_head_bytes" when the embeddings / LM head stream from
    # flash (engine/flash/matrix.py); None for resident models.
    flash: dict | None = None


@dataclass
class Chunk:
    text: str                       # new text, UTF-8 complete, stop strings removed
    token: int | None               # the token that produced it (None for the final flush)
    finish_reason: str | None       # None while streaming, then "stop" or "length"
    stats: Stats = field(default_factory=Stats)


@dataclass
class Response:
    text: str
    tokens: list[int]               # generated ids (EOS excluded)
    finish_reason: str              # "stop" (EOS or stop string) or "length"
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    ttft_s: float
    peak_rss_mb: float
    stats: Stats = field(default_factory=Stats)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux/macOS ru_maxrss; psutil's current RSS elsewhere)."""
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
    except ImportError:
        import psutil
        return psutil.Process().memory_info().rss / 2**20


def rss_mb() -> float:
    """Current resident set size of this process in MiB."""
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def generate_step(model: Transformer, cache: KVCache, new_ids: Sequence[int], sample: Callable,
                  history: list[int], max_tokens: int, stop_ids: set[int]) -> Iterator[int]:
    """Evaluate new_ids on top of the cache, then yield sampled tokens until a stop id, max_tokens or a
    full cache. `history` (all ids so far, for the repetition penalty) is extended in place."""
    logits = model.forward(np.asarray(new_ids), cache, all_logits=False)[0]
    for i in range(max_tokens):
        tok = sample(logits, history)
        history.append(tok)
        yield tok
        if tok in stop_ids or i == max_tokens - 1 or cache.length >= cache.max_seq:
            return
        logits = model.forward(np.asarray([tok]), cache, all_logits=False)[0]


def stream_generate(model: Transformer, cache: KVCache, prompt_ids: list[int], reuse: int, sample: Callable,
                    max_tokens: int, stop_ids: set[int], stop: Sequence[str], decode: Callable) -> Iterator[Chunk]:
    """Yield Chunks; the cache already holds prompt_ids[:reuse] from an earlier call."""
    t0 = time.perf_counter()
    stats = Stats(prompt_tokens=len(prompt_ids), cached_tokens=reuse)
    detok = StreamingDetokenizer(decode)
    stopper = StopChecker(stop) if stop else None
    history = list(prompt_ids)
    t_first = None
    finish = "length"
    counted = model.executors.snapshot()
    for tok in generate_step(model, cache, prompt_ids[reuse:], sample, history, max_tokens, stop_ids):
        now = time.perf_counter()
        if t_first is None:
            t_first = now
            stats.ttft_s = now - t0
            stats.prompt_tps = (len(prompt_ids) - reuse) / max(stats.ttft_s, 1e-9)
        stats.generated_tokens += 1
        if stats.generated_tokens > 1:
            stats.generation_tps = (stats.generated_tokens - 1) / max(now - t_first, 1e-9)
        if tok in stop_ids:
            stats.generated_tokens -= 1
            finish = "stop"
            break
        text = detok.add(tok)
        hit = False
        if stopper is not None:
            text, hit = stopper.feed(text)
        if hit:
            yield Chunk(text, tok, None, stats)
            finish = "stop"
            break
        yield Chunk(text, tok, None, stats)
    else:
        finish = "length"
    tail = ""
    if finish == "length" or (finish == "stop" and (stopper is None or not stopper.stopped)):
        tail = detok.flush()
        if stopper is not None:
            tail, hit = stopper.feed(tail)
            if not hit:
                tail += stopper.flush()
    stats.peak_rss_mb = peak_rss_mb()
    stats.rss_mb = rss_mb()
    stats.flash = model.executors.report(counted)
    yield Chunk(tail, None, finish, stats)
