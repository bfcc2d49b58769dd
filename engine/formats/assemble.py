"""Builds ModelWeights from any source, given functions that fetch one tensor by its source name.

Each reader (hf_loader, gguf_loader) supplies `matrix(name) -> Weight`, `vector(name) -> (n,) f32`
and `has(name)`; this module checks presence and shapes against the config so a mismatched file gets
an error naming the tensor, its shape and the expected one.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from engine.errors import ModelFormatError
from engine.formats.weight_map import (FUSED_PARTS, LAYER_BIASES, LAYER_MATRICES, LAYER_VECTORS, QK_NORMS,
                                       SANDWICH_NORMS, source_name)
from engine.model.config import ModelConfig
from engine.model.transformer import LayerWeights, ModelWeights
from engine.model.weights import Weight


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "embed": (c.vocab_size, c.hidden_size), "lm_head": (c.vocab_size, c.hidden_size),
        "norm": (c.hidden_size,), "attn_norm": (c.hidden_size,), "ffn_norm": (c.hidden_size,),
        "wq": (q, c.hidden_size), "wk": (kv, c.hidden_size), "wv": (kv, c.hidden_size), "wo": (c.hidden_size, q),
        "w_gate": (c.intermediate_size, c.hidden_size), "w_up": (c.intermediate_size, c.hidden_size),
        "w_down": (c.hidden_size, c.intermediate_size),
        "bq": (q,), "bk": (kv,), "bv": (kv,), "bo": (c.hidden_size,),
        "q_norm": (c.head_dim,), "k_norm": (c.head_dim,), "post_attn_norm": (c.hidden_size,),
        "post_ffn_norm": (c.hidden_size,),
        "wqkv": (q + 2 * kv, c.hidden_size), "w_gate_up": (2 * c.intermediate_size, c.hidden_size),
    }


def assemble(config: ModelConfig, table: dict, source: str,
             matrix: Callable[[str], Weight], vector: Callable[[str], np.ndarray], has: Callable[[str], bool],
             fix: Callable[[str, object], object] = lambda ours, t: t,
             progress: Callable[[int, int], None] | None = None,
             skip: frozenset[str] = frozenset()) -> ModelWeights:
    """skip: our names of matrices left unloaded (None), such as "layers.3.w_gate" or "embed": a deploy's
    flash plan serves them from the file, so loading them would only raise the peak memory it budgets."""
    shapes = expected_shapes(config)

    def fetch(ours: str, required: bool = True):
        name = source_name(table, ours)
        if has(name) and ours in skip:
            return None
        if not has(name):
            if required:
                raise ModelFormatError(f"{source}: tensor {name!r} is missing; the file is incomplete or not a "
                                       f"{config.model_type} model")
            return None
        field = ours.rsplit(".", 1)[-1]
        is_matrix = field in LAYER_MATRICES or field in ("embed", "lm_head", "wqkv", "w_gate_up")
        t = fix(ours, matrix(name) if is_matrix else vector(name))
        if tuple(t.shape) != shapes[field]:
            raise ModelFormatError(f"{source}: tensor {name!r} has shape {tuple(t.shape)}, expected "
                                   f"{shapes[field]} from the config; the weights don't match the config")
        return t

    embed = fetch("embed")
    # Tied embeddings: one matrix serves as both lookup table and LM head (no copy).
    lm_head = fetch("lm_head", required=False)
    if lm_head is None:
        lm_head = embed
    layers = []
    n = config.num_hidden_layers
    for i in range(n):
        parts = {f: fetch(f"layers.{i}.{f}") for f in LAYER_VECTORS}
        fused = {}
        for f in LAYER_MATRICES:
            if "layers.{}." + f in table:
                parts[f] = fetch(f"layers.{i}.{f}")
                continue
            # a row block of a fused tensor (Phi-3): rows of q|k|v or gate|up, as views
            whole, block = FUSED_PARTS[f]
            if whole not in fused:
                fused[whole] = fetch(f"layers.{i}.{whole}")
            rows = [shapes[p][0] for p, (w, _) in FUSED_PARTS.items() if w == whole]
            parts[f] = None if fused[whole] is None else fused[whole].row_slice(sum(rows[:block]), sum(rows[:block + 1]))
        for f in QK_NORMS:
            parts[f] = fetch(f"layers.{i}.{f}") if config.qk_norm else None
        for f in SANDWICH_NORMS:
            parts[f] = fetch(f"layers.{i}.{f}") if config.sandwich_norms else None
        wanted = set()
        if config.qkv_bias:
            wanted |= {"bq", "bk", "bv"}
        if config.o_bias:
            wanted.add("bo")
        for f in LAYER_BIASES:
            parts[f] = fetch(f"layers.{i}.{f}", required=f in wanted)
        layers.append(LayerWeights(**parts, **fused))
        if progress:
            progress(i + 1, n)
    return ModelWeights(embed=embed, layers=layers, norm=fetch("norm"), lm_head=lm_head)
