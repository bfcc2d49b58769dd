"""The solver: per-layer decisions that maximize predicted decode tok/s under the memory budget and the
quality floor, plus the prefill, thread and I/O settings.

Per layer the candidates are (mode, hot neurons H, cold-cache capacity C):
- dense: H neurons resident; the other F - H are streamed from flash every token in large sequential
  requests (a cache is useless when every neuron is needed every token);
- sparse (only where the layer's predictor meets the recall floor): a predictor, H hot neurons and a
  cold LRU cache of C neurons; the predicted-active cold neurons that miss the cache are read in
  clusters, with the cluster size that gives the most useful bytes per second on this storage.
The memory split across layers is a multiple-choice knapsack, solved with a Lagrange multiplier on
memory (bisection), then filled greedily with the best time saved per byte. All of it is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import PlanError
from planner.budget import format_bytes
from planner.cost_model import KV_TOKENS, RUNTIME_BASE_BYTES, SPARSE_EFFICIENCY, TTFT_PROMPT_TOKENS, CostModel

H_STEPS = 8                                  # hot-neuron counts tried: 0, F/8, ..., F
CACHE_SHARES = (0.0, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
CLUSTER_SIZES = (1, 2, 4, 8, 16, 32, 64)
SEQUENTIAL_REQUEST = 1 << 20                 # prefill streams a layer's cold region in 1 MiB requests
RECALL_SLACK = 0.01                          # test recall may miss the floor by sampling noise (~300 test tokens)
CHUNK_CHOICES = (512, 256, 128, 64)
CHUNK_SCRATCH_BYTES = 16 << 20              # prefill activations per chunk stay below this
FLASH_TIE_S_PER_BYTE = 1e-12                 # 1 ms per GB read: breaks ties only


@dataclass(frozen=True)
class LayerEvidence:
    """What the model profile and predictor training say about one layer."""
    layer: int
    sparse_ok: bool
    reason: str                      # why sparse is (not) allowed
    predicted_active: float          # share of neurons the predictor marks active per token
    recall: float
    precision: float
    predictor_bytes: int
    predictor_threshold: float
    predictor_rank: int
    label_sparsity: float
    hits: dict                       # {(H, C): (hit rate, cold accesses per token)} for sparse candidates


@dataclass(frozen=True)
class Candidate:
    mode: str                        # "dense" | "sparse"
    hot: int
    cache: int
    cluster: int                     # neurons per read/compute cluster; 0 for dense
    mem: int                         # resident bytes for this layer's FFN (+ predictor)
    time_s: float                    # predicted seconds per token for this layer's FFN
    compute_s: float
    io_s: float
    flash_bytes: float               # bytes read from flash per token
    io_threads: int
    request_bytes: int


@dataclass(frozen=True)
class Solution:
    budget_bytes: int
    layers: tuple[Candidate, ...]
    evidence: tuple[LayerEvidence, ...]
    fixed_bytes: int
    staging_bytes: int
    decode_s: float
    ttft_s: float
    prefill_engine: str                  # engine/executors/prefill.py: int8, onnx or f32
    prefill_chunk: int
    compute_threads: int
    io_threads: int
    direct_io: bool
    prefetch_layers: int
    kv_bytes: int
    runtime_bytes: int
    rationale: tuple[str, ...]
    head_on_flash: bool = False      # embeddings / LM head streamed from the weights file every token
    head_flash_bytes: float = 0.0    # their bytes read per token
    max_gap: int = 0                 # bundles of a gap read through rather than splitting a request
    prefill_fallback: str = "f32"    # what runs when ONNX Runtime cannot: int8 or f32
    prefill_providers: tuple[str, ...] = ("CPUExecutionProvider",)   # ONNX Runtime's, in order


    @property
    def resident_bytes(self) -> int:
        return self.fixed_bytes + self.staging_bytes + sum(c.mem for c in self.layers)

    @property
    def flash_bytes_per_token(self) -> float:
        return sum(c.flash_bytes for c in self.layers) + self.head_flash_bytes

    @property
    def peak_rss_bytes(self) -> int:
        return self.resident_bytes + self.kv_bytes + self.runtime_bytes


def minimum_bytes(cost: CostModel) -> int:
    """The smallest budget a plan can meet: the always-resident weights plus the I/O buffers (without
    the embeddings / LM head where the runtime can stream them from flash)."""
    s = cost.shape
    fixed = min(s.fixed_bytes_head_on_flash, s.fixed_bytes) if s.head_streamable else s.fixed_bytes
    return fixed + cost.staging_bytes()


def head_on_flash(cost: CostModel, budget_bytes: int) -> bool:
    """Whether the embeddings / LM head must stream from flash: only when the budget cannot hold them
    beside attention, norms and the I/O buffers (PowerInfer-2 keeps them resident; reading them costs
    their whole size every token, as much as the FFN bytes they would displace)."""
    s = cost.shape
    staging = cost.staging_bytes()
    return (s.head_streamable and budget_bytes < s.weight_bytes and budget_bytes < s.fixed_bytes + staging
            and s.fixed_bytes_head_on_flash < s.fixed_bytes)


def check_budget(cost: CostModel, budget_bytes: int) -> int:
    """The bytes left for FFN neurons and predictors; PlanError stating the minimum when there are none."""
    s = cost.shape
    staging = 0 if budget_bytes >= s.weight_bytes else cost.staging_bytes()
    head_flash = head_on_flash(cost, budget_bytes)
    fixed = s.fixed_bytes_head_on_flash if head_flash else s.fixed_bytes
    avail = budget_bytes - fixed - staging
    if avail < 0:
        what = ("attention, norms and the buffers that stream the embeddings / LM head from flash"
                if head_flash else "embeddings, lm_head, attention and norms")
        raise PlanError(f"memory budget {format_bytes(budget_bytes)} ({budget_bytes} bytes) is below the minimum "
                        f"resident set of {format_bytes(minimum_bytes(cost))} ({minimum_bytes(cost)} bytes): "
                        f"{what} ({format_bytes(fixed)}) stay in memory, plus {format_bytes(staging)} of I/O "
                        "buffers; give at least that")
    return avail


def solve(cost: CostModel, evidence: list[LayerEvidence], budget_bytes: int, recall_floor: float) -> Solution:
    s = cost.shape
    avail = check_budget(cost, budget_bytes)
    staging = 0 if budget_bytes >= s.weight_bytes else cost.staging_bytes()
    cands = [layer_candidates(cost, ev) for ev in evidence]
    chosen = _knapsack(cands, avail)
    return _assemble(cost, evidence, chosen, budget_bytes, staging, recall_floor, head_on_flash(cost, budget_bytes))


def layer_candidates(cost: CostModel, ev: LayerEvidence) -> list[Candidate]:
    s = cost.shape
    F, bb = s.ffn, s.bundle_bytes
    out = []
    dense_c = cost.dense_ffn_s()
    for k in range(H_STEPS + 1):
        hot = round(F * k / H_STEPS)
        cold_bytes = (F - hot) * bb
        req = min(cost.stream_request(), max(4096, _align(cold_bytes)))
        _, th = cost.read_s(cold_bytes, req, "sequential")
        # Fully resident: the dense kernels. Otherwise the flash FFN runs the layer (its reads of the
        # next layer overlap this one's compute).
        if hot == F:
            t, comp, io = dense_c, dense_c, 0.0
        else:
            t, io = cost.dense_flash_layer_s(hot)
            comp = t
        out.append(Candidate("dense", hot, 0, 0, s.hot_ffn_bytes(hot, "dense"), t, comp, io, cold_bytes, th,
                             req if cold_bytes else 0))
    if not ev.sparse_ok:
        return out
    sparse_c = cost.sparse_ffn_s(ev.predicted_active, ev.predictor_bytes)
    for k in range(H_STEPS + 1):
        hot = round(F * k / H_STEPS)
        for share in CACHE_SHARES:
            cache = round(F * share)
            if hot + cache > F or (hot == F and cache):
                continue
            hit, accesses = ev.hits.get((hot, cache), (1.0, 0.0))
            misses = accesses * (1.0 - hit)
            cluster, io, th, req, read_bytes = _cluster_io(cost, misses, F - hot - cache, bb)
            mem = ev.predictor_bytes + round((hot + cache) * bb)
            comp = sparse_c if hot == F else sparse_c + cost.flash_ffn_s(0, misses)   # + copying what lands
            out.append(Candidate("sparse", hot, cache, cluster, mem, max(comp, io), comp, io, read_bytes, th, req))
    return out


def _cluster_io(cost: CostModel, misses: float, n_cold: int, bb: float):
    """(cluster size, seconds, threads, request bytes, bytes read) for `misses` cold neurons per token."""
    if misses <= 0 or n_cold <= 0:
        return CLUSTER_SIZES[0], 0.0, 0, 0, 0.0
    p = min(1.0, misses / n_cold)          # chance a cold, uncached neuron is needed this token
    best = None
    for c in CLUSTER_SIZES:
        req = _align(c * bb)
        if req > cost.stream_request() and c != CLUSTER_SIZES[0]:
            continue                      # the runtime's request buffers are budgeted for at most that
        issued = 1.0 - (1.0 - p) ** c      # a cluster is read when any of its neurons is needed
        useful = p * c * bb / issued       # needed bytes per request issued
        t, th = cost.read_s(misses * bb * req / useful, req)
        key = (round(t, 12), c)
        if best is None or key < best[0]:
            best = (key, c, t, th, req, misses * bb * req / useful)
    return best[1], best[2], best[3], best[4], best[5]


def _align(n: float) -> int:
    return int(-(-int(round(n)) // 4096) * 4096)


def _knapsack(cands: list[list[Candidate]], avail: int) -> list[Candidate]:
    def pick(lam: float) -> list[Candidate]:
        return [min(cs, key=lambda c: (_cost(c) + lam * c.mem, c.mem)) for cs in cands]

    if sum(c.mem for c in pick(0.0)) <= avail:
        return pick(0.0)
    lo, hi = 0.0, 1.0
    while sum(c.mem for c in pick(hi)) > avail and hi < 1e6:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        if sum(c.mem for c in pick(mid)) > avail:
            lo = mid
        else:
            hi = mid
    chosen = pick(hi)
    # Fill the slack the multiplier leaves: repeatedly take the upgrade with the best time saved per byte.
    while True:
        slack = avail - sum(c.mem for c in chosen)
        best = None
        for i, cs in enumerate(cands):
            for c in cs:
                extra = c.mem - chosen[i].mem
                gain = _cost(chosen[i]) - _cost(c)
                if gain > 0 and 0 <= extra <= slack:
                    key = (-gain / max(extra, 1), i, c.mem)
                    if best is None or key < best[0]:
                        best = (key, i, c)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]


def _cost(c: Candidate) -> float:
    """The objective: seconds per token, plus a tie-breaker against flash reads. Reads hidden under
    compute cost no time in the model, but they take CPU time for the syscalls and wear the device;
    at equal time, the candidate that keeps more in memory wins."""
    return c.time_s + FLASH_TIE_S_PER_BYTE * c.flash_bytes


def prefill_engine(gflops: dict, hidden: int, spare_bytes: float | None = None,
                   onnx_bytes: float = 0.0) -> tuple[str, float, str]:
    """(engine, GFLOP/s, fallback): the fastest of the int8 GEMM, ONNX Runtime and f32 BLAS as the
    device profile measured them at the width nearest the model's (kernels.matmul_gflops: "int8",
    "onnx" and "numpy" at 576 columns, the same "@2048" at 2048; int8 absent without numba, onnx without
    onnxruntime), and the faster of int8 and f32 as ONNX Runtime's fallback; f32 on a tie or without a
    figure. ONNX Runtime prepacks the weights into its own copy (engine/executors/onnx_prefill.py), so it
    is a candidate only when the budget has onnx_bytes to spare (spare_bytes None: not counted)."""
    suffix = "@2048" if hidden >= 1536 and "numpy@2048" in gflops else ""
    f32 = gflops["numpy" + suffix]
    int8 = gflops.get("int8" + suffix, 0.0)
    fallback, best = ("int8", int8) if int8 > f32 else ("f32", f32)
    onnx = gflops.get("onnx" + suffix, 0.0)
    if onnx > best and (spare_bytes is None or spare_bytes >= onnx_bytes):
        return "onnx", onnx, fallback
    return fallback, best, fallback


def onnx_providers(gflops: dict) -> tuple[str, ...]:
    """ONNX Runtime's execution providers the device profile measured ("onnx:<provider>" keys), fastest
    first, then the CPU one."""
    eps = sorted((k.split(":", 1)[1] for k in gflops if k.startswith("onnx:") and "@" not in k),
                 key=lambda k: -gflops["onnx:" + k])
    return tuple(p for p in eps if p != "CPUExecutionProvider") + ("CPUExecutionProvider",)


def _fixed_parts(s) -> str:
    if s.embed_mapped and s.embed_resident_bytes < s.embed_bytes:
        return (f"the looked-up rows of the mapped token table (counted as {format_bytes(s.embed_resident_bytes)} "
                f"of its {format_bytes(s.embed_bytes)}), lm_head, attention, norms")
    return "embeddings, lm_head, attention, norms"


def _assemble(cost, evidence, chosen, budget, staging, recall_floor, head_flash: bool = False) -> Solution:
    s, dev = cost.shape, cost.dev
    F = s.ffn
    decode_s = cost.fixed_decode_s(head_flash) + sum(c.time_s for c in chosen)
    uses_flash = any(c.flash_bytes > 0 for c in chosen)
    fixed = s.fixed_bytes_head_on_flash if head_flash else s.fixed_bytes
    spare = -1.0 if uses_flash else budget - (fixed + staging + sum(c.mem for c in chosen))
    ort_copy = s.n_layers * (s.attn_bytes + s.ffn_bytes)      # ONNX Runtime's prepacked layers
    engine, gflops, fallback = prefill_engine(dev.kernels.matmul_gflops, s.hidden, spare, ort_copy)
    cold_bytes = sum((F - c.hot - c.cache) * s.bundle_bytes for c in chosen)
    prefill_io, _ = cost.read_s(cold_bytes, SEQUENTIAL_REQUEST, "sequential")
    ttft = cost.prefill_s(TTFT_PROMPT_TOKENS, gflops) + prefill_io
    head_bytes = 0.0
    if head_flash:   # one pass over the LM head for the last position, one row read per prompt token
        head_bytes = (s.lm_head_bytes or s.embed_bytes) + 4096
        ttft += cost.head_read_s() + TTFT_PROMPT_TOKENS * cost.read_s(4096, 4096)[0]
    # Prefill activations per chunk: gate|up (2F) plus a few hidden-sized buffers, f32.
    chunk = next(ch for ch in CHUNK_CHOICES if ch * (2 * F + 4 * s.hidden) * 4 <= CHUNK_SCRATCH_BYTES or ch == 64)
    clusters = sorted(dev.cpu.clusters, key=lambda cl: -cl.max_mhz)
    top = clusters[0].max_mhz if clusters else 0.0
    big = sum(len(cl.cores) for cl in clusters if top and cl.max_mhz >= 0.75 * top) if top else 0
    threads = min(dev.cpu.physical_cores, big or dev.cpu.physical_cores)
    # At most the threads the staging memory was budgeted for (CostModel.staging_bytes).
    io_threads = min(cost.io_threads(), max((c.io_threads for c in chosen), default=0)) if uses_flash else 0
    kv = KV_TOKENS * s.kv_bytes_per_token
    sol = Solution(budget_bytes=budget, layers=tuple(chosen), evidence=tuple(evidence), fixed_bytes=fixed,
                   staging_bytes=staging, decode_s=decode_s, ttft_s=ttft, prefill_engine=engine,
                   prefill_fallback=fallback, prefill_providers=onnx_providers(dev.kernels.matmul_gflops),
                   prefill_chunk=chunk,
                   compute_threads=threads, io_threads=io_threads, direct_io=dev.storage.direct_io and uses_flash,
                   prefetch_layers=1 if uses_flash else 0, kv_bytes=kv, runtime_bytes=RUNTIME_BASE_BYTES, rationale=(),
                   head_on_flash=head_flash, head_flash_bytes=head_bytes,
                   max_gap=cost.merge_gap() if uses_flash else 0)
    return Solution(**{**sol.__dict__, "rationale": tuple(_rationale(cost, sol, recall_floor))})


def _rationale(cost: CostModel, sol: Solution, recall_floor: float) -> list[str]:
    s, dev = cost.shape, cost.dev
    lines = []
    modes = {c.mode for c in sol.layers}
    n_sparse = sum(c.mode == "sparse" for c in sol.layers)
    ok = [e for e in sol.evidence if e.sparse_ok]
    if not ok:
        why = sorted({e.reason for e in sol.evidence})
        lines.append(f"decode: dense in every layer: no layer's predictor meets the recall floor {recall_floor:.3f} "
                     f"with a useful sparsity ({'; '.join(why[:2])})")
    else:
        lines.append(f"decode: {n_sparse} of {s.n_layers} layers sparse; {len(ok)} had a predictor meeting the "
                     f"recall floor {recall_floor:.3f}; sparse time "
                     + (f"from the measured sparse kernel ({cost.sparse_gbps(s.ffn) / 1e9:.1f} GB/s on all "
                        "neurons)" if cost.sparse_measured else f"assumes {SPARSE_EFFICIENCY:.0%} of the dense kernel's GB/s "
                        "(the device profile has no sparse kernel figure)"))
    if sol.budget_bytes >= s.weight_bytes:
        lines.append(f"memory: the budget {format_bytes(sol.budget_bytes)} holds all {format_bytes(s.weight_bytes)} of "
                     "weights: every FFN neuron is resident, nothing is read from flash")
    else:
        hot = sum(c.hot for c in sol.layers)
        if sol.head_on_flash:
            lines.append(f"memory: the embeddings / LM head ({format_bytes(s.head_bytes)}) do not fit beside attention "
                         f"and norms in {format_bytes(sol.budget_bytes)}: they stream from the weights file every token "
                         f"({format_bytes(sol.head_flash_bytes)} read per token, {cost.head_read_s() * 1e3:.1f} ms at "
                         "the measured sequential speed, overlapped with the LM head's compute)")
        lines.append(f"memory: {format_bytes(sol.fixed_bytes)} always resident "
                     f"({'attention, norms, read buffers' if sol.head_on_flash else _fixed_parts(s)}); "
                     f"{hot} of {s.n_layers * s.ffn} FFN neurons hot in memory, the rest on flash: "
                     f"{format_bytes(sol.flash_bytes_per_token)} read per token"
                     + (" in large sequential requests (dense layers need every neuron)" if "sparse" not in modes else ""))
    if sol.io_threads:
        req = max(c.request_bytes for c in sol.layers)
        lines.append(f"io: {sol.io_threads} reader thread(s) at up to {req >> 10} KiB requests, "
                     f"{'O_DIRECT' if sol.direct_io else 'buffered (O_DIRECT refused by the filesystem)'}, prefetch "
                     f"{sol.prefetch_layers} layer ahead so reads overlap compute; gaps of up to {sol.max_gap} "
                     "bundle(s) between misses are read through (one request costs more than those bytes)")
    g = dev.kernels.matmul_gflops
    width = "@2048" if s.hidden >= 1536 and "numpy@2048" in g else ""
    measured = ", ".join(f"{name} {g[key + width]:.0f}" for name, key in
                         (("int8 GEMM", "int8"), ("ONNX Runtime", "onnx"), ("f32 BLAS", "numpy")) if key + width in g)
    why = ""
    if sol.prefill_engine != "onnx" and prefill_engine(g, s.hidden)[0] == "onnx":    # the budget ruled it out
        why = ("; ONNX Runtime measured faster but prepacks its own copy of the layers' weights, which "
               + ("flash-resident FFNs rule out" if any(c.flash_bytes > 0 for c in sol.layers) else "the budget cannot hold"))
    lines.append(f"prefill: the {sol.prefill_engine} engine, the fastest measured ({measured} GFLOP/s at a 128-token "
                 f"chunk, {2048 if width else 576} columns), in chunks of {sol.prefill_chunk} tokens{why}"
                 + (f"; {sol.prefill_fallback} when ONNX Runtime cannot run, providers "
                    f"{', '.join(sol.prefill_providers)}" if sol.prefill_engine == "onnx" else ""))
    lines.append(f"threads: {sol.compute_threads} compute threads (the fastest core clusters: "
                 f"{'+'.join(str(len(c.cores)) for c in dev.cpu.clusters)} cores in clusters)")
    calib = ""
    if cost.measured_step_s:
        calib = (f", compute terms scaled x{cost.compute_scale:.2f} to this model's measured dense decode step "
                 f"({cost.measured_step_s * 1e3:.2f} ms against {cost.kernel_step_s * 1e3:.2f} ms from the kernel figures)")
    lines.append(f"speed: decode {1 / sol.decode_s:.1f} tok/s predicted from the {dev.kernels.backend} matvec at "
                 f"{dev.kernels.stream_gbps():.1f} GB/s streaming" + calib
                 + (f" and flash at {dev.storage.mbps(SEQUENTIAL_REQUEST, None, 'sequential'):.0f} MB/s sequential"
                    if sol.flash_bytes_per_token else "")
                 + (f"; a layer streamed from flash measured {cost.flash_layer_s * 1e3:.2f} ms on this machine "
                    "(reads, copies, kernels and Python; planner/decode_probe.py)"
                    if cost.flash_layer_s is not None and sol.flash_bytes_per_token else ""))
    return lines
