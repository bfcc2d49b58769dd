"""plan.json: the solver's decisions as a versioned, deterministic JSON document.

Same inputs give byte-identical files: keys sorted, floats rounded to 4 significant digits (the noise
floor of what they predict), no timestamps, paths or host names beyond the device profile's name.
"""

from __future__ import annotations

import json
import math

from engine.formats.deploy import PLAN_SCHEMA, PLAN_SCHEMA_VERSION
from planner.solver import Solution

BUNDLE_FILE = "ffn.bundles"


def build(sol: Solution, *, cost, device, fingerprint: str, model_name: str, budget_text: str, weights_file: str,
          copied: list[str], recall_floor: float, predictor_reports: list, bundles: dict | None = None) -> dict:
    """bundles: the header planner/bundles.py wrote: plans below 100% run every FFN from it."""
    s = cost.shape
    full = sol.budget_bytes >= s.weight_bytes
    assert full or bundles is not None, "below 100% the FFNs run from a bundle file"
    reports = {r.layer: r for r in predictor_reports}
    layers = []
    for ev, c in zip(sol.evidence, sol.layers):
        r = reports.get(ev.layer)
        layers.append({
            "layer": ev.layer, "mode": c.mode, "hot_neurons": c.hot, "cold_cache_neurons": c.cache,
            "cluster_size": c.cluster, "resident_bytes": c.mem, "flash_bytes_per_token": c.flash_bytes,
            "predicted_ms": c.time_s * 1e3,
            "predictor": {"rank": ev.predictor_rank, "threshold": ev.predictor_threshold,
                          "recall": r.recall if r else None, "precision": r.precision if r else None,
                          "predicted_active": ev.predicted_active, "used": c.mode == "sparse"},
            "label_sparsity": ev.label_sparsity,
            "rationale": _layer_reason(ev, c, s.ffn, recall_floor),
        })
    rationale = list(sol.rationale)
    if bundles is None:
        rationale.append("files: the weights are a copy of the source model, all resident")
    else:
        rationale.append(f"files: the weights are a copy of the source model (attention, embeddings and norms are "
                         f"used from it); every FFN runs from {BUNDLE_FILE}: neuron bundles hot to cold (the cold "
                         f"ones of sparse layers placed by co-activation), down "
                         f"stored transposed as {bundles['down_format']}, {bundles['record_bytes']} bytes per bundle")
    plan = {
        "schema": PLAN_SCHEMA, "schema_version": PLAN_SCHEMA_VERSION,
        "model": {"name": model_name, "fingerprint": fingerprint, "layers": s.n_layers, "hidden": s.hidden,
                  "ffn": s.ffn, "format": s.weight_format or s.fmt, "weight_bytes": s.weight_bytes},
        "device": device.summary_dict(),
        "budget_bytes": sol.budget_bytes, "budget_request": budget_text,
        "prefill": {"engine": sol.prefill_engine, "fallback": sol.prefill_fallback,
                    "providers": list(sol.prefill_providers), "chunk_tokens": sol.prefill_chunk,
                    "threads": sol.compute_threads},
        "decode": {"layers": layers, "recall_floor": recall_floor},
        "io": {"direct_io": sol.direct_io, "reader_threads": sol.io_threads, "prefetch_layers": sol.prefetch_layers,
               "request_bytes": max((c.request_bytes for c in sol.layers), default=0),
               "staging_bytes": sol.staging_bytes, "max_gap_records": sol.max_gap},
        "threads": {"compute": sol.compute_threads, "io": sol.io_threads},
        "memory": {"resident_bytes": sol.fixed_bytes, "hot_bytes": sum(s.hot_ffn_bytes(c.hot, c.mode) for c in sol.layers),
                   "cold_cache_bytes": sum(round(c.cache * s.bundle_bytes) for c in sol.layers),
                   "predictor_bytes": sum(ev.predictor_bytes for ev, c in zip(sol.evidence, sol.layers) if c.mode == "sparse"),
                   "staging_bytes": sol.staging_bytes, "kv_cache_bytes": sol.kv_bytes,
                   "runtime_overhead_bytes": sol.runtime_bytes + sol.kv_bytes},
        "predicted": {"ttft_s": sol.ttft_s, "decode_tps": 1.0 / sol.decode_s, "peak_rss_mb": sol.peak_rss_bytes / 2**20,
                      "flash_bytes_per_token": sol.flash_bytes_per_token},
        "execution": {"weights": "resident"},
        "files": {"weights": weights_file, "predictors": "predictors.npz", "copied": sorted(copied)},
        "rationale": rationale,
    }
    if bundles is not None:
        plan["execution"] = {"weights": "flash"}
        plan["files"]["bundles"] = BUNDLE_FILE
        plan["flash"] = {"file": BUNDLE_FILE, "file_bytes": bundles["file_bytes"], "record_bytes": bundles["record_bytes"],
                         "down_format": bundles["down_format"], "layer_offsets": [x["offset"] for x in bundles["layers"]],
                         # frequency-aware: the best measured hit rate of the policies (tools/bench_flash.py)
                         "cache_policy": "freq"}
    if sol.head_on_flash:
        # engine/flash/matrix.py: the embeddings / LM head are read from the weights file on every use.
        plan["execution"]["lm_head"] = "flash"
    return _round(plan)


def _layer_reason(ev, c, ffn: int, floor: float) -> str:
    if c.mode == "sparse":
        return (f"sparse: predictor marks {ev.predicted_active:.0%} active at test recall {ev.recall:.3f}; "
                f"{c.hot} hot + {c.cache} cached of {ffn}, clusters of {c.cluster}")
    where = "all resident" if c.hot == ffn else f"{c.hot} of {ffn} neurons resident, the rest streamed from flash"
    return f"dense ({where}): {ev.reason}"


def _round(x):
    if isinstance(x, float):
        if not math.isfinite(x) or x == 0:
            return x if math.isfinite(x) else None
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round(v) for v in x]
    return x


def dumps(plan: dict) -> str:
    return json.dumps(plan, indent=1, sort_keys=True) + "\n"
