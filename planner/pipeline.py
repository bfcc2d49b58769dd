"""`pocketinfer plan` end to end: device profile, model profile, predictors, cache replay, solver,
plan.json and the deploy directory. Cheap checks (target, calibration text, profile, budget) run
before the expensive ones, so bad input fails in seconds.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from planner import cache_replay, deploy, plan_json
from planner.predictors import DEFAULT_RECALL
from planner.solver import CACHE_SHARES, H_STEPS, RECALL_SLACK, LayerEvidence

Progress = Callable[[str, int, int], None]
REPLAY_TOKENS = 512


@dataclass(frozen=True)
class Result:
    path: Path
    plan: dict


def load_device(spec, progress: Progress | None = None):
    """The given profile, else this machine's cached one when this code measured it on this CPU, else a
    fresh measurement (then cached)."""
    from planner import device

    path = device.resolve_profile(spec)
    if path is not None:
        return device.load_profile(path)
    from engine.formats.registry import cache_dir
    from planner.device_probe import PROBE_VERSION, cpu_info, profile_device

    cached = device.default_path()
    if cached.exists():
        prof = device.load_profile(cached)
        # measured by this code on this CPU (a home folder can outlive the machine and the code)
        cpu = cpu_info()
        if prof.probe_version == PROBE_VERSION and (prof.cpu.model, prof.cpu.simd) == (cpu.model, cpu.simd):
            return prof

    stages = ["cpu topology", "memory bandwidth", "storage reads", "kernels", "call overhead"]
    prof = profile_device(cache_dir() / "models",
                          progress=(lambda st: progress("device profile", stages.index(st) + 1, len(stages)))
                          if progress else None)
    device.save_profile(prof, cached)
    return prof


def make_deploy(source: str | os.PathLike, budget_text: str, out: str | os.PathLike, *, device_profile=None,
                calibration=None, recall_floor: float | None = None, threads: int | None = None,
                overwrite: bool = False, progress: Progress | None = None, quality_budget: str | None = None,
                prune=None) -> Result:
    """The deploy directory of `source` under a memory budget; quality_budget: also input-sparse decode
    (planner/input_sparsity.py); prune (planner/prune.PruneSpec): also 2:4-prune its matrices
    (planner/prune.py), every layer then decoding dense."""
    from engine.errors import PlanError
    from engine.formats import registry
    from engine.formats.deploy import fingerprint, weight_files
    from engine.loader import load
    from planner.budget import parse_budget, parse_quality_budget
    from planner.input_sparsity import check_budget as check_quality_budget
    from planner.cost_model import CostModel, shape_of
    from planner.decode_probe import measure_decode_step, measure_flash_layer
    from planner.model_profile import profile_model, read_calibration
    from planner.predictors import train_all
    from planner.solver import check_budget, solve

    recall_floor = DEFAULT_RECALL if recall_floor is None else float(recall_floor)
    if not 0.5 <= recall_floor <= 1.0:
        raise PlanError(f"recall floor {recall_floor} must be between 0.5 and 1")
    quality = None if quality_budget is None else parse_quality_budget(quality_budget)
    if quality is not None:
        check_quality_budget(quality)
    if prune is not None:
        prune.check()
        if quality is not None:
            raise PlanError("2:4 pruning and input-sparse decode do not combine; plan one or the other")
    out = Path(out).expanduser()
    deploy.check_target(out, overwrite)
    calibration_text = read_calibration(calibration)   # fail now on an empty or unreadable file
    dev = load_device(device_profile, progress)
    src = registry.resolve(source)
    if src.is_dir() and (src / "plan.json").exists():
        raise PlanError(f"{src} is a deploy directory; plan from the original model")
    llm = load(src, threads=threads)
    cost = CostModel(dev, shape_of(llm))
    budget = parse_budget(budget_text, cost.shape.weight_bytes)
    check_budget(cost, budget)
    if prune is not None and budget < cost.shape.weight_bytes:
        raise PlanError(f"2:4-pruned matrices run resident; give a memory budget of 100% (got {budget_text})")
    if quality is not None and budget < cost.shape.weight_bytes:
        raise PlanError(f"--quality-budget plans input-sparse decode of a resident model; give --memory-budget 100% "
                        f"(got {budget_text})")
    fp = fingerprint(weight_files(src))
    if device_profile is None:
        # Planning for this machine: calibrate on this model's real dense step here. A given profile
        # (a phone's, planned on a laptop) keeps its own kernel figures: this machine's step says nothing
        # about that device. Measured once per model and device profile (planner/calibration_cache.py),
        # so planning twice gives the same plan.
        from planner.calibration_cache import measured

        d = dev.to_dict()
        cost.calibrate(measured(d, fp, f"decode step t{llm.threads}", lambda: measure_decode_step(llm)))
        if budget < cost.shape.weight_bytes:
            # Something will stream from flash: time the flash FFN on a few of this model's layers, on
            # the storage the deploy goes to.
            out.parent.mkdir(parents=True, exist_ok=True)
            req, th = cost.stream_request(), cost.io_threads()
            cost.calibrate_flash(measured(d, fp, f"flash layer r{req} io{th} t{llm.threads}",
                                          lambda: measure_flash_layer(llm, out.parent, req, th)))

    profile = profile_model(llm, calibration, progress)
    predictors, reports = train_all(profile, recall_floor, progress=progress)
    evidence = build_evidence(profile, predictors, reports, recall_floor, progress)
    sol = solve(cost, evidence, budget, recall_floor)
    inputs = None
    if quality is not None:
        from planner.input_sparsity import plan as input_plan
        inputs = input_plan(llm, calibration_text, quality, head=False, progress=progress)
    pruned = None
    if prune is not None:
        from planner.prune import prune as prune_model
        pruned = prune_model(llm, prune, calibration_text, progress)

    bundle_header: list[dict] = []

    def write_bundle_file(directory: Path) -> None:
        # Below 100% the FFNs run from the bundle file, neurons hot to cold in the order whose first H
        # the solver made hot (build_evidence's order); in sparse layers the cold ones after them are
        # placed by co-activation, so that a token's misses merge into fewer requests.
        from planner.bundles import hot_to_cold, write_bundles
        from planner.coactivation import MAX_COLD, coactivation_order
        orders = [hot_to_cold(st.freq) for st in profile.layers]
        for i, c in enumerate(sol.layers):
            if c.mode == "sparse" and 2 < profile.ffn - c.hot <= MAX_COLD:
                orders[i] = coactivation_order(profile.active[i], orders[i], c.hot)
        bundle_header.append(write_bundles(directory / plan_json.BUNDLE_FILE, llm.model.weights.layers, orders,
                                           fingerprint=fp, act=llm.config.hidden_act, progress=progress))

    def plan_text(weights_name: str, copied: list[str]) -> str:
        plan = plan_json.build(sol, cost=cost, device=dev, fingerprint=fp, model_name=src.name,
                               budget_text=str(budget_text), weights_file=weights_name, copied=copied,
                               recall_floor=recall_floor, predictor_reports=reports,
                               bundles=bundle_header[0] if bundle_header else None)
        if inputs is not None:
            plan["decode"]["input_sparsity"] = inputs.as_dict()
        if pruned is not None:
            plan["sparsity"] = plan_json._round(pruned.as_dict())
            for layer in plan["decode"]["layers"]:
                if layer["mode"] != "dense":
                    layer["mode"] = "dense"
                    layer["rationale"] = "dense: the layer's matrices are 2:4-pruned (no neuron predictor on top)"
            plan["rationale"].append(f"2:4 sparsity: {pruned.lines[0]}; the pruned matrices are in "
                                     f"{plan['sparsity']['file']}, the rest used from the weights")
        holder.append(plan)
        return plan_json.dumps(plan)

    holder: list[dict] = []
    full = budget >= cost.shape.weight_bytes
    def write_pruned(directory: Path) -> None:
        from engine.formats.pruned import FILE
        pruned.save(directory / FILE)

    path = deploy.write(out, src, plan_text, predictors, profile.hidden, profile.ffn, overwrite, progress,
                        bundles_fn=None if full else write_bundle_file,
                        extra_fn=None if pruned is None else write_pruned)
    return Result(path=path, plan=holder[0])


def build_evidence(profile, predictors, reports, recall_floor: float, progress: Progress | None = None
                   ) -> list[LayerEvidence]:
    """Per layer: may it go sparse, and the cold-cache hit rates of its predicted-active sets."""
    F = profile.ffn
    n = profile.n_tokens
    replay = slice(max(0, n - REPLAY_TOKENS), n)
    out = []
    for i, (stats, r) in enumerate(zip(profile.layers, reports)):
        p = predictors[i]
        if stats.label_sparsity <= 0:
            ok, reason = False, "no threshold keeps the dropped activation energy within the quality floor"
        elif r.recall < recall_floor - RECALL_SLACK:
            ok, reason = False, f"predictor test recall {r.recall:.3f} is below the floor {recall_floor:.3f}"
        elif r.predicted_active >= 0.9:
            ok, reason = False, f"at the recall floor the predictor marks {r.predicted_active:.0%} of neurons active"
        else:
            ok, reason = True, f"predictor test recall {r.recall:.3f}, {r.predicted_active:.0%} predicted active"
        hits = {}
        if ok:
            masks = p.active(profile.h[i, replay].astype(np.float32))      # (tokens, ffn) bool
            order = np.lexsort((np.arange(F), -stats.freq))                 # hot to cold, ties by id
            for k in range(H_STEPS + 1):
                hot_n = round(F * k / H_STEPS)
                hot = np.zeros(F, dtype=bool)
                hot[order[:hot_n]] = True
                caps = [round(F * s) for s in CACHE_SHARES]
                rates, accesses = cache_replay.lru_hit_rates(masks, hot, caps)
                for c, rate in zip(caps, rates):
                    hits[(hot_n, c)] = (rate, accesses)
        out.append(LayerEvidence(layer=i, sparse_ok=ok, reason=reason, predicted_active=r.predicted_active,
                                 recall=r.recall, precision=r.precision, predictor_bytes=r.nbytes,
                                 predictor_threshold=p.threshold, predictor_rank=r.rank,
                                 label_sparsity=stats.label_sparsity, hits=hits))
        if progress:
            progress("cache replay", i + 1, len(reports))
    return out
