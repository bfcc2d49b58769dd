"""Speed measurement behind `pocketinfer bench`: a fixed prompt of exactly N token ids, one prefill,
then exactly M greedy tokens with end-of-sequence ignored, timed after an untimed warm-up.

It drives the model directly (`model.new_cache` and `model.forward`), not `LLM.generate`, because
generate stops at EOS and a benchmark must decode a fixed number of tokens. The peer runners in
tools/ follow the same protocol, so their figures compare one to one:

- prompt: `prompt_ids(tokenizer, n)`, the ids of PARAGRAPH (no BOS) repeated and cut to n;
- prefill_s: one forward over the prompt, computing only the last position's logits;
- ttft_s: prefill_s plus picking the first token (argmax of those logits);
- decode_s: the gen_tokens - 1 single-token forwards and argmaxes that follow;
- prefill_tps = prompt_tokens / prefill_s, decode_tps = (gen_tokens - 1) / decode_s.

Like the rest of the library it never prints and raises ValueError for bad arguments. It imports no
kernel (so no numba): tools/bench_peers.py reads PARAGRAPH from it in the parent process, and a parent
that maps libllvmlite keeps the child's copy of those pages shared, which engine/memory.py cannot page
out, and the child's peak RSS would count them.
"""

from __future__ import annotations

import hashlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

# Plain English prose: tokenizes the same way in any BPE or SentencePiece vocabulary.
PARAGRAPH = (
    "The old lighthouse stood at the end of a narrow spit of rock, and every evening the keeper climbed "
    "its one hundred and twelve steps to light the lamp. Ships passing in the night saw the beam sweep "
    "across the water and knew where the reef began. In winter the wind came off the sea so hard that "
    "the windows rattled in their frames, but the light never failed. Children from the village sometimes "
    "walked out along the shore to watch the keeper at work, and he would tell them stories about storms, "
    "lost sailors and the strange lights that danced over the waves on calm summer nights.\n"
)
WARMUP_PROMPT = 8   # tokens in the untimed warm-up prefill (compiles the batched kernels)
WARMUP_DECODE = 2   # untimed single-token steps (compiles the decode kernels)


@dataclass
class Run:
    prefill_s: float
    ttft_s: float
    decode_s: float
    tokens: list[int]


@dataclass
class BenchResult:
    prompt_tokens: int
    generated_tokens: int
    runs: list[Run] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return statistics.median(self.prompt_tokens / max(r.prefill_s, 1e-9) for r in self.runs)

    @property
    def decode_tps(self) -> float:
        return statistics.median((self.generated_tokens - 1) / max(r.decode_s, 1e-9) for r in self.runs)

    @property
    def ttft_s(self) -> float:
        return statistics.median(r.ttft_s for r in self.runs)

    def per_run(self) -> list[dict]:
        return [{"prefill_tps": self.prompt_tokens / max(r.prefill_s, 1e-9),
                 "decode_tps": (self.generated_tokens - 1) / max(r.decode_s, 1e-9),
                 "ttft_s": r.ttft_s} for r in self.runs]


def check_args(prompt_tokens: int, gen_tokens: int, repeats: int, n_ctx: int | None = None) -> None:
    """Raise ValueError (ContextLengthError for the context) for counts the benchmark cannot run."""
    if prompt_tokens < 1:
        raise ValueError(f"--prompt-tokens must be at least 1, got {prompt_tokens}")
    if gen_tokens < 2:
        raise ValueError(f"--gen-tokens must be at least 2 (the first token comes from prefill, decode speed "
                         f"needs more), got {gen_tokens}")
    if repeats < 1:
        raise ValueError(f"--repeats must be at least 1, got {repeats}")
    if n_ctx is not None and prompt_tokens + gen_tokens > n_ctx:
        from engine.errors import ContextLengthError

        raise ContextLengthError(f"{prompt_tokens} prompt + {gen_tokens} generated tokens do not fit the context "
                                 f"of {n_ctx}; use fewer tokens or a larger --ctx")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """Exactly n ids: PARAGRAPH tokenized without BOS, repeated and cut."""
    base = list(tokenizer.encode(PARAGRAPH))
    if base and base[0] == tokenizer.bos_token_id:
        base = base[1:]
    if not base:
        raise ValueError("the benchmark paragraph tokenizes to nothing with this tokenizer")
    return (base * (n // len(base) + 1))[:n]


def ids_digest(ids: Sequence[int]) -> str:
    """Short fingerprint of a token id sequence, so peers can show they ran the same prompt."""
    return hashlib.sha1(",".join(str(int(i)) for i in ids).encode()).hexdigest()[:12]


def _greedy(logits: np.ndarray) -> int:
    return int(np.argmax(logits[-1]))


def warm_up(model, ids: Sequence[int]) -> None:
    """Untimed: a short prefill and a few decode steps, so numba compiles (or loads) every kernel."""
    n = min(WARMUP_PROMPT, len(ids))
    cache = model.new_cache(n + WARMUP_DECODE)
    tok = _greedy(model.forward(np.asarray(ids[:n]), cache, all_logits=False))
    for _ in range(WARMUP_DECODE):
        tok = _greedy(model.forward(np.asarray([tok]), cache, all_logits=False))


def run_once(model, cache, ids: Sequence[int], gen_tokens: int) -> Run:
    cache.reset()
    prompt = np.asarray(ids, dtype=np.int64)
    t0 = time.perf_counter()
    logits = model.forward(prompt, cache, all_logits=False)
    t1 = time.perf_counter()
    tok = _greedy(logits)
    t2 = time.perf_counter()
    out = [tok]
    for _ in range(gen_tokens - 1):
        tok = _greedy(model.forward(np.asarray([tok], dtype=np.int64), cache, all_logits=False))
        out.append(tok)
    t3 = time.perf_counter()
    return Run(prefill_s=t1 - t0, ttft_s=t2 - t0, decode_s=t3 - t2, tokens=out)


def bench(llm, prompt_tokens: int, gen_tokens: int, repeats: int,
          progress: Callable[[int, int], None] | None = None) -> BenchResult:
    """Warm up, then time `repeats` runs of prefill + greedy decode on a fresh cache each."""
    check_args(prompt_tokens, gen_tokens, repeats, llm.n_ctx)
    ids = prompt_ids(llm.tokenizer, prompt_tokens)
    warm_up(llm.model, ids)
    cache = llm.model.new_cache(prompt_tokens + gen_tokens)
    result = BenchResult(prompt_tokens=prompt_tokens, generated_tokens=gen_tokens)
    for i in range(repeats):
        result.runs.append(run_once(llm.model, cache, ids, gen_tokens))
        if progress is not None:
            progress(i + 1, repeats)
    return result

