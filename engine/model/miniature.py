"""A miniature of a GGUF model: the same weight layouts and dtypes at tiny shapes, all zeros, so that
every kernel the model will run is compiled or loaded from numba's cache *before* the weights are read.

Why: loading kernels touches ~20-30 MiB of the JIT compiler's code and heap, which engine/memory.py
gives back afterwards; warming up on the real model would put that on top of the weights, where it
sets the process's peak RSS. numba compiles per argument *types* (dtype, dimensions, layout), not per
shape, so a model with the same layouts at 256-wide shapes selects the same compiled code, and the
same executors are chosen for it (one-region decode, layer stacking, sparse records): the model and
its miniature are both built by engine/model/transformer.build, under the same plan.

The miniature keeps, from the real model: each tensor's GGUF type, the head dimension, whether K/V
heads are shared (GQA) or not, biases, tied or separate LM head, and one layer per distinct
combination of layer tensor types and decode mode (so a mixed model stays mixed). Everything else is small:
hidden and FFN width 256 (the largest GGUF block), a query width that is a multiple of 256, vocab 256.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from engine.formats.assemble import assemble
from engine.formats.gguf_file import GGUFFile
from engine.formats.gguf_quants import tensor_nbytes, vector_from_gguf, weight_from_gguf
from engine.formats.weight_map import GGUF, LAYER_BIASES, LAYER_MATRICES, LAYER_VECTORS, gguf_table, source_name
from engine.model.config import ModelConfig
from engine.model.transformer import ModelWeights

WIDTH = 256      # hidden, FFN and query widths are multiples of this (the K-quants' 256-value blocks)


def _layer_types(g: GGUFFile, i: int) -> tuple:
    names = [source_name(GGUF, f"layers.{i}.{f}") for f in LAYER_MATRICES + LAYER_VECTORS + LAYER_BIASES]
    return tuple(int(g.tensors[n].ggml_type) if n in g.tensors else None for n in names)


def gguf_miniature(g: GGUFFile, config: ModelConfig, modes: tuple[str, ...] | None = None
                   ) -> tuple[ModelConfig, ModelWeights, list[int]]:
    """(config, weights, layer_of) of the miniature of the GGUF model `g` whose config is `config`:
    one layer per distinct combination of the layer's tensor types and its decode mode (modes, one per
    layer, engine/executors/plan.py), layer_of[j] the real layer miniature layer j stands for."""
    hd = config.head_dim
    heads = WIDTH // math.gcd(WIDTH, hd)              # query width heads * hd: a multiple of WIDTH
    kv = 1 if config.num_key_value_heads < config.num_attention_heads else heads
    distinct, layer_of = [], []                        # the real layer each miniature layer stands for
    for i in range(config.num_hidden_layers):
        types = (_layer_types(g, i), modes[i] if modes else "dense")
        if types not in distinct:
            distinct.append(types)
            layer_of.append(i)
    mini = dataclasses.replace(config, vocab_size=WIDTH, hidden_size=WIDTH, intermediate_size=WIDTH,
                               num_hidden_layers=len(layer_of), num_attention_heads=heads,
                               num_key_value_heads=kv, head_dim=hd, source=f"{config.source} (miniature)",
                               layer_types=tuple(config.layer_types[i] for i in layer_of) if config.layer_types else None)
    shapes = _mini_shapes(mini)

    def real_name(name: str) -> str:
        if name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            return f"blk.{layer_of[int(i)]}.{rest}"
        return name

    def short(name: str) -> str:
        return name.split(".", 2)[2] if name.startswith("blk.") else name

    def matrix(name):
        t = g.tensors[real_name(name)]
        rows, cols = shapes[short(name)]
        raw = np.zeros(tensor_nbytes(t.ggml_type, rows * cols), np.uint8)
        return weight_from_gguf(t.ggml_type, raw, (rows, cols), name, mini.source)

    def vector(name):
        t = g.tensors[real_name(name)]
        (n,) = shapes[short(name)]
        raw = np.zeros(tensor_nbytes(t.ggml_type, n), np.uint8)
        return vector_from_gguf(t.ggml_type, raw, n, name, mini.source)

    weights = assemble(mini, gguf_table(mini.model_type), mini.source, matrix, vector, lambda n: real_name(n) in g.tensors)
    if "rope_freqs.weight" in g.tensors:
        weights.rope_freq_factors = np.ones(hd // 2, np.float32)
    return mini, weights, layer_of


def _mini_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes by GGUF name without the "blk.N." prefix, in numpy (rows, cols) order."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, f = c.hidden_size, c.intermediate_size
    return {"token_embd.weight": (c.vocab_size, h), "output.weight": (c.vocab_size, h), "output_norm.weight": (h,),
            "attn_norm.weight": (h,), "ffn_norm.weight": (h,), "attn_q.weight": (q, h), "attn_k.weight": (kv, h),
            "attn_v.weight": (kv, h), "attn_output.weight": (h, q), "ffn_gate.weight": (f, h),
            "ffn_up.weight": (f, h), "ffn_down.weight": (h, f), "attn_q.bias": (q,), "attn_k.bias": (kv,),
            "attn_v.bias": (kv,), "attn_output.bias": (h,), "attn_q_norm.weight": (c.head_dim,),
            "attn_k_norm.weight": (c.head_dim,), "post_attention_norm.weight": (h,), "post_ffw_norm.weight": (h,),
            "attn_qkv.weight": (q + 2 * kv, h), **({"ffn_up.weight": (2 * f, h)} if c.model_type == "phi3" else {})}


def warm_up_kernels(g: GGUFFile, config: ModelConfig, plan, kv_dtype=np.uint16) -> None:
    """Compile or load every kernel the GGUF model will run under `plan` (engine/executors/plan.py;
    resident and without predictors) with a KV cache of kv_dtype, on its miniature, and give the
    compiler's memory back (engine/memory.py): call before reading the weights."""
    from engine.memory import release_compiler_pages
    from engine.model.transformer import build

    kinds = plan.decode
    if plan.input_thresholds is not None:          # which groups run input-sparse is a kind of its own
        kinds = tuple(f"{m}, inputs {tuple(t > 0 for t in row)}" for m, row in zip(plan.decode, plan.input_thresholds))
    mini, weights, layer_of = gguf_miniature(g, config, kinds)
    thresholds = None if plan.input_thresholds is None else tuple(plan.input_thresholds[i] for i in layer_of)
    mini_plan = dataclasses.replace(plan, decode=tuple(plan.decode[i] for i in layer_of), input_thresholds=thresholds)
    model = build(mini, weights, mini_plan, kv_dtype)
    model.warm_up()
    del model
    release_compiler_pages()
