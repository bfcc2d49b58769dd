"""Choosing the executors, once, at load (STYLE.md: choose once; DESIGN.md: the polymorphic engine).

From the plan (engine/executors/plan.py), the model's weight layouts and the kernels this machine has:
- prefill: ONNX Runtime (engine/executors/onnx_prefill.py) when the plan's prefill engine is "onnx" and
  every FFN is resident, with the layer-by-layer stack on the plan's fallback engine behind it; else the
  layer-by-layer stack, every FFN dense, or flash when the plan streams FFNs, its matmuls through the
  plan's prefill engine (engine/executors/prefill.py: int8 GEMM or f32 BLAS);
- decode:
  - flash, when the plan streams every FFN from the bundle file (engine/executors/flash_ffn.py);
  - input-sparse (engine/executors/input_sparse_decode.py), when the plan has input thresholds: the
    thresholded groups' Q4 weights stored column by column (layout.to_columns);
  - the one-region decode (engine/executors/one_region.py), when every layer is dense and it can run
    them all (numba; Q4, Q5 or 32-block I8 layouts, at most two per matrix group, no biases, the same shapes);
  - else the layer-by-layer stack with each layer's FFN executor: dense, or sparse in the plan's mode.
engine/model/layout.py arranges the weights for what was chosen, the same way for the model and for its
miniature (engine/model/miniature.py), and `Executors.describe()` prints the choice.

`observing` and `layer_by_layer` make the other executor sets that measurement code runs a model with
(Transformer.running): every FFN observed, or the layers through given FFN executors.
"""

from __future__ import annotations

from engine.executors import prefill as prefill_engines
from engine.executors.base import Executors
from engine.executors.dense import DenseFFN, ObservedFFN
from engine.executors.input_sparse_decode import InputSparseDecode
from engine.executors.onnx_prefill import OnnxPrefill
from engine.executors.one_region import AVAILABLE as ONE_REGION, OneRegionDecode
from engine.executors.plan import Plan
from engine.executors.sparse import decode_ffns
from engine.executors.stack import LayerStack
from engine.model import layout


def choose(config, weights, plan: Plan) -> Executors:
    """The executors that run `weights` (a model's ModelWeights, arranged here in place) under `plan`."""
    layers = weights.layers
    extra = (weights.lm_head,) if plan.head_on_flash else ()
    resident_dense = plan.flash is None and all(m == "dense" for m in plan.decode)
    input_sparse = resident_dense and plan.input_thresholds is not None
    stacking = resident_dense and ONE_REGION and not input_sparse     # the one-region decode may run
    if input_sparse:
        layout.to_columns(layers, plan.input_thresholds)
    if stacking:
        for lw in layers:
            layout.match_fused_layouts(lw)
    one_region = stacking and layout.stackable(layers)
    if one_region:
        stacks = layout.stack_layers(layers)      # fuses q|k|v and gate|up as it stacks
    else:
        for lw in layers:
            layout.fuse(lw)
    if plan.flash is not None:
        from engine.executors.flash_ffn import open_flash

        store = open_flash(config, plan)
        return Executors(LayerStack(config, layers, store.layer_ffns(batched=True), batched=True,
                                    engine=plan.stack_engine),
                         LayerStack(config, layers, store.layer_ffns(batched=False), batched=False), extra,
                         plan.source)
    if input_sparse:
        decode = InputSparseDecode(config, layers, plan.input_thresholds)
    elif one_region:
        decode = OneRegionDecode(config, stacks)
    else:
        decode = LayerStack(config, layers, decode_ffns(config, layers, plan.decode, predictors=plan.predictors,
                                                        cluster=plan.cluster), batched=False)
    matmul = prefill_engines.matmul_of(plan.stack_engine)
    prefill = LayerStack(config, layers, [DenseFFN(lw, config.act_kind, matmul) for lw in layers], batched=True,
                         engine=plan.stack_engine)
    if plan.prefill == "onnx" and not input_sparse:          # the ONNX graph reads separate q, k, v rows
        prefill = OnnxPrefill(config, layers, prefill, plan.providers)
    return Executors(prefill, decode, extra, plan.source)


def observing(model, observer) -> Executors:
    """The model's layers with every FFN dense and observed (engine/executors/dense.ObservedFFN), in
    both phases."""
    c = model.config
    ffns = [ObservedFFN(lw, c.act_kind, i, observer) for i, lw in enumerate(model.weights.layers)]
    return layer_by_layer(model, ffns, ffns)


def layer_by_layer(model, decode_ffns: list, prefill_ffns: list | None = None) -> Executors:
    """The model's layers run layer by layer with the given FFN executors (one per layer) in decode,
    and in prefill too when prefill_ffns is given, its matmuls then through f32 BLAS, the exact reference
    that measurement compares against (else the model's own prefill)."""
    c, layers = model.config, model.weights.layers
    prefill = model.executors.prefill if prefill_ffns is None else LayerStack(c, layers, prefill_ffns, batched=True)
    return Executors(prefill, LayerStack(c, layers, decode_ffns, batched=False), model.executors.extra)
