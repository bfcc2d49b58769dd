"""engine/executors/onnx_session.py: the cache of model files keeps the most recently used graphs."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("onnx", reason="the ONNX engine's graphs are built with the onnx package")

from engine.executors import onnx_graph, onnx_session  # noqa: E402
from engine.model.weights import F32Weight  # noqa: E402


def _graph(rows: int):
    return onnx_graph.matmul(F32Weight(np.zeros((rows, 32), np.float32)))


def test_the_cache_keeps_the_most_recently_used_graphs(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_session, "KEEP_GRAPHS", 2)
    first = onnx_session.model_file(_graph(1), tmp_path)
    os.utime(first.parent, (1, 1))                      # long ago
    second = onnx_session.model_file(_graph(2), tmp_path)
    os.utime(second.parent, (2, 2))                     # long ago, but after the first
    assert onnx_session.model_file(_graph(1), tmp_path) == first      # reused: now the most recent
    third = onnx_session.model_file(_graph(3), tmp_path)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == sorted([first.parent.name, third.parent.name])
    assert first.exists() and third.exists() and not second.exists()
