"""A deploy directory's plan -> the flash FFN executor on a loaded model (the runtime side of plan.json's
"flash" section; it never imports planner/).

plan.json, when the budget is below the model's weight bytes, names the bundle file (files.bundles) and
per layer the mode ("dense": every neuron each token; "sparse": the layer's predictor picks them), the
hot-neuron count (resident segment) and the cold-cache capacity (dynamic segment); io.direct_io,
io.reader_threads and io.request_bytes set the reader. The FFN weights loaded with the rest of the
model are dropped after, so the process holds only what the plan budgets.
"""

from __future__ import annotations

from pathlib import Path

from engine.flash.bundles import open_bundles
from engine.errors import ModelFormatError
from engine.executors.flash_ffn import FlashFFN, LayerPlan
from engine.executors.predictor import load_predictors


def uses_flash(plan: dict) -> bool:
    return plan.get("execution", {}).get("weights") == "flash"


def attach_flash(model, directory: Path, plan: dict) -> FlashFFN:
    c = model.config
    files = plan.get("files", {})
    try:
        layers = plan["decode"]["layers"]
        rel = files["bundles"]
    except (KeyError, TypeError):
        raise ModelFormatError(f"{directory / 'plan.json'}: a flash plan without files.bundles or decode.layers; "
                               "re-run `pocketinfer plan`") from None
    bundles = open_bundles(directory / rel, fingerprint=plan["model"]["fingerprint"], n_layers=c.num_hidden_layers,
                           hidden=c.hidden_size, ffn=c.intermediate_size)
    plans = [LayerPlan("predicted" if lay.get("mode") == "sparse" else "dense", int(lay.get("hot_neurons", 0)),
                       int(lay.get("cold_cache_neurons", 0))) for lay in layers]
    predictors = {}
    if any(p.mode == "predicted" for p in plans):
        predictors = load_predictors(directory / files.get("predictors", "predictors.npz"), c.hidden_size,
                                     c.intermediate_size)
    io = plan.get("io", {})
    flash = FlashFFN(bundles, plans, c.act_kind, predictors=predictors, direct=bool(io.get("direct_io", True)),
                     io_threads=max(1, int(io.get("reader_threads") or 1)),
                     request_bytes=int(io.get("request_bytes") or 256 << 10),
                     policy=plan.get("flash", {}).get("cache_policy", "lru"))
    model.flash = flash
    model.sparse = None
    for lw in model.weights.layers:
        # The copies the model loaded: the bundle file serves every FFN from now on.
        lw.w_gate = lw.w_up = lw.w_down = lw.w_gate_up = None
    return flash
