"""The readable plan: per-layer table, memory breakdown, predicted figures and the reasons for them."""

from __future__ import annotations

from planner.budget import format_bytes


def format_plan(plan: dict) -> str:
    m, pred, ex = plan["model"], plan["predicted"], plan["execution"]
    lines = [f"plan for {m['name']} ({m['layers']} layers, hidden {m['hidden']}, ffn {m['ffn']}, {m['format']}, "
             f"{format_bytes(m['weight_bytes'])} of weights) on {plan['device']['name']} ({plan['device']['kind']})",
             f"budget {format_bytes(plan['budget_bytes'])} ({plan['budget_request']})", "",
             f"{'layers':<9}{'mode':<8}{'hot':>7}{'cache':>7}{'cluster':>8}{'resident':>11}{'flash/tok':>11}"
             f"{'ms/tok':>8}  predictor recall/precision/active"]
    for group in _groups(plan["decode"]["layers"]):
        a, b, d = group[0]["layer"], group[-1]["layer"], group[0]
        p = d["predictor"]
        lines.append(f"{f'{a}-{b}' if a != b else str(a):<9}{d['mode']:<8}{d['hot_neurons']:>7}"
                     f"{d['cold_cache_neurons']:>7}{d['cluster_size'] or '-':>8}{format_bytes(d['resident_bytes']):>11}"
                     f"{format_bytes(d['flash_bytes_per_token']):>11}{d['predicted_ms']:>8.3f}  "
                     f"{_f(p['recall'])}/{_f(p['precision'])}/{_f(p['predicted_active'])}")
    reasons = sorted({d["rationale"] for d in plan["decode"]["layers"]})
    for r in reasons[:3]:
        lines.append(f"  why: {r}")
    if len(reasons) > 3:
        lines.append(f"  ... and {len(reasons) - 3} more per-layer reasons in plan.json")
    mem = plan["memory"]
    lines += ["", "memory:"]
    head_flash = plan.get("execution", {}).get("lm_head") == "flash"
    resident = ("resident (attention, norms, LM head read buffers)" if head_flash
                else "resident (embeddings, lm_head, attention, norms)")
    for key, label in (("resident_bytes", resident),
                       ("hot_bytes", "hot FFN neurons"), ("cold_cache_bytes", "cold-neuron cache"),
                       ("predictor_bytes", "predictors"), ("staging_bytes", "I/O buffers"),
                       ("kv_cache_bytes", "KV cache (512 tokens, part of the runtime overhead)"),
                       ("runtime_overhead_bytes", "runtime overhead (interpreter, libraries, scratch, KV)")):
        lines.append(f"  {label:<56}{format_bytes(mem[key]):>11}")
    lines += ["", f"predicted: TTFT {pred['ttft_s'] * 1000:.0f} ms (128-token prompt), decode {pred['decode_tps']:.1f} "
                  f"tok/s, peak RSS {pred['peak_rss_mb']:.0f} MiB, flash {format_bytes(pred['flash_bytes_per_token'])}/token"]
    if ex["weights"] == "flash":
        lines.append(f"runs with FFNs from {plan['flash']['file']} (neuron bundles on flash, segmented cache)"
                     + ("; embeddings / LM head streamed from the weights file" if head_flash else ""))
    inputs = plan["decode"].get("input_sparsity")
    if inputs is not None:
        sp = inputs["sparsity"]
        mean = [sum(row[g] for row in sp) / max(1, len(sp)) for g in range(len(inputs["groups"]))]
        lines += ["", f"input-sparse decode (quality budget {inputs['budget']:.1%}): mean sparsity "
                  + ", ".join(f"{g} {m:.0%}" for g, m in zip(inputs["groups"], mean))
                  + f"; reads {inputs['bytes_per_token'] / max(inputs['dense_bytes_per_token'], 1):.1%} of the dense "
                  "weight bytes per token"] + [f"  {r}" for r in inputs["rationale"][:3]]
    lines += ["", "reasons:"] + [f"  - {r}" for r in plan["rationale"]]
    return "\n".join(lines)


def _groups(layers: list[dict]) -> list[list[dict]]:
    """Consecutive layers with the same decisions share one row."""
    out: list[list[dict]] = []
    key = lambda d: (d["mode"], d["hot_neurons"], d["cold_cache_neurons"], d["cluster_size"])
    for d in layers:
        if out and key(out[-1][-1]) == key(d):
            out[-1].append(d)
        else:
            out.append([d])
    return out


def _f(x) -> str:
    return "-" if x is None else f"{x:.2f}"
