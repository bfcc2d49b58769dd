"""A 2:4-pruned deploy (`pocketinfer prune`) against its dense source, in one process: perplexity on a
held-out text, the weight bytes a decode step reads, the share of matrix groups pruned, and decode speed
measured side by side (the two models' runs alternate, A B A B, on the same threads)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from engine.executors.input_sparse import GROUPS, group_weights
from engine.measure.bench import prompt_ids, run_once, warm_up
from engine.measure.perplexity import perplexity


@dataclass(frozen=True)
class PruneReport:
    ppl: float
    dense_ppl: float
    scored_tokens: int
    bytes_per_token: int          # matrices and LM head read by one decode step
    dense_bytes_per_token: int
    pruned_groups: int
    total_groups: int
    decode_tps: float             # median over rounds
    dense_decode_tps: float
    speedup: float                # median of the per-round ratios
    rounds: int

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {
            "ppl_change": self.ppl / self.dense_ppl - 1.0,
            "bytes_ratio": self.bytes_per_token / self.dense_bytes_per_token}


def decode_bytes(model) -> int:
    """Bytes of the weights one decode step reads: every layer's matrices and the LM head (the token's
    embedding row is negligible)."""
    layers = model.weights.layers
    return sum(w.nbytes for lw in layers for g in GROUPS for w in group_weights(lw, g)) + model.weights.lm_head.nbytes


def compare(pruned, dense, groups: int, text_ids: list[int], ctx: int, windows: int, prompt_tokens: int,
            gen_tokens: int, rounds: int) -> PruneReport:
    """pruned, dense: engine.llm.LLM of the deploy and of its weights file; groups: the matrix groups the
    deploy's plan lists as pruned."""
    p = perplexity(pruned, text_ids, ctx, windows)
    d = perplexity(dense, text_ids, ctx, windows)
    ids = prompt_ids(pruned.tokenizer, prompt_tokens)
    caches = []
    for llm in (pruned, dense):
        warm_up(llm.model, ids)
        caches.append(llm.model.new_cache(prompt_tokens + gen_tokens))
    tps = ([], [])
    for _ in range(rounds):
        for k, llm in enumerate((pruned, dense)):
            run = run_once(llm.model, caches[k], ids, gen_tokens)
            tps[k].append((gen_tokens - 1) / max(run.decode_s, 1e-9))
    return PruneReport(p.ppl, d.ppl, p.scored_tokens, decode_bytes(pruned.model), decode_bytes(dense.model),
                       groups, len(GROUPS) * pruned.config.num_hidden_layers,
                       statistics.median(tps[0]), statistics.median(tps[1]),
                       statistics.median(a / b for a, b in zip(*tps)), rounds)
