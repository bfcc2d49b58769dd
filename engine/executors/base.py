"""What an executor is: the interface every way of running the model's layers has, and the set of
them chosen for a model (DESIGN.md's polymorphic neuron engine; STYLE.md: choose once, at load).

Two levels:
- a *phase* executor runs every layer for one phase (prefill: several tokens; decode: one token):
  `run(x, cache, start, cos, sin)` updates the residual stream x (n, hidden) f32 in place and writes
  the tokens' K/V at positions start..start+n-1; cos, sin (kinds, n, head_dim/2) f32 hold each RoPE
  the layers use (engine/model/rope.RopeTable). The layer-by-layer stack (engine/executors/stack.py)
  and the one-region decode (engine/executors/one_region.py) are phase executors;
- an *FFN* executor computes one layer's FFN inside the layer-by-layer stack: `ffn(h)` takes the
  normed input h (n, hidden) f32 and returns the FFN output, (n, hidden) or (hidden,) f32, which the
  stack adds to x. Dense (engine/executors/dense.py), sparse neuron clusters (sparse.py) and flash
  (flash_ffn.py) are FFN executors.
Each is built at load with what it needs (weights arranged by engine/model/layout.py, scratch buffers
made once), says in one line what it is (`describe`), and reports what it counted (`reports`).
"""

from __future__ import annotations

from typing import Protocol


class Counters(Protocol):
    """What an executor counts (bytes read from flash, cache hits, I/O wait): a snapshot now, and the
    report, as a dict of figures, of what happened since an earlier snapshot."""

    def snapshot(self) -> object: ...

    def since(self, snapshot: object) -> dict: ...


class Executor:
    """The common part of every executor."""

    kind = "executor"

    def describe(self) -> str:
        """One line: what runs and how (no layer numbers: Executors.describe adds those)."""
        return self.kind

    def reports(self) -> list[Counters]:
        """What this executor reports through (nothing by default); executors that share a store (a
        bundle file's layers) return the same object, which is then counted once."""
        return []


class Executors:
    """The executors chosen for a model at load: one phase executor for prefill and one for decode,
    plus whatever else reports (a matrix streamed from flash). The model's forward pass calls them and
    asks nothing about them."""

    def __init__(self, prefill, decode, extra: tuple = (), source: str = ""):
        """source: where the choice came from (a plan.json, or "defaults"), for describe()."""
        self.prefill = prefill
        self.decode = decode
        self.extra = tuple(extra)
        self.source = source

    def describe(self) -> str:
        """One line per distinct executor: its phase, its layers and what it is."""
        lines = [f"{'plan':8s} {self.source}"] if self.source else []
        for name, phase in (("prefill", self.prefill), ("decode", self.decode)):
            groups: dict[str, list[int]] = {}
            for layer, text in phase.layer_descriptions():
                groups.setdefault(text, []).append(layer)
            lines += [f"{name:8s} {'layers' if len(layers) > 1 else 'layer':6s} {_ranges(layers):8s} {text}"
                      for text, layers in groups.items()]
        lines += [f"{'':8s} {e.describe()}" for e in self.extra]
        return "\n".join(lines)

    def snapshot(self) -> list:
        """Every reporting store's counters now."""
        found = {}
        for e in (self.prefill, self.decode, *self.extra):
            for c in e.reports():
                found[id(c)] = c
        return [(c, c.snapshot()) for c in found.values()]

    def report(self, snapshot: list) -> dict | None:
        """What the executors counted since `snapshot`, merged into one dict; None when none counts."""
        if not snapshot:
            return None
        out = {}
        for c, before in snapshot:
            out.update(c.since(before))
        return out


def _ranges(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2,5,7-8"."""
    parts, start = [], None
    for i, v in enumerate(layers):
        start = v if start is None else start
        if i + 1 == len(layers) or layers[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)
