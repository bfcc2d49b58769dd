"""engine/model/miniature.py: a GGUF model's miniature has the same weight layouts and gets the same
executors, so warming up on it compiles what the real model runs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from engine.executors.one_region import OneRegionDecode
from engine.executors.plan import default_plan
from engine.formats.gguf_file import GGUFFile
from engine.formats.gguf_loader import config_from_gguf, load_weights
from engine.formats.mapped_rows import MappedRows
from engine.model.miniature import WIDTH, gguf_miniature
from engine.model.transformer import build

pytest.importorskip("torch", reason="the test models are made with the [test] extra (torch, transformers)")

VOCAB = {"model": "llama", "tokens": ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)],
         "scores": [0.0] * 128, "types": [2, 3, 3] + [1] * 125}


def layouts(w):
    return type(w).__name__, [(a.dtype, a.ndim, a.shape[1] == 0, a.flags.c_contiguous) for a in w._arrays()]


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "F32"])
def test_miniature_has_the_models_layouts_and_paths(tmp_path, qtype):
    from model_factory import hf_to_gguf, make_hf_model

    make_hf_model("llama", tmp_path)
    g = GGUFFile(hf_to_gguf(tmp_path, tmp_path / "m.gguf", qtype, VOCAB))
    config = config_from_gguf(g)
    mini_config, mini, layer_of = gguf_miniature(g, config)
    real = load_weights(g, config)
    assert layer_of == [0]
    assert mini_config.hidden_size == WIDTH and mini_config.num_hidden_layers == 1   # uniform layers: one
    assert mini_config.head_dim == config.head_dim
    assert (mini_config.num_key_value_heads < mini_config.num_attention_heads) == (
        config.num_key_value_heads < config.num_attention_heads)
    fields = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    for f in fields:
        assert layouts(getattr(mini.layers[0], f)) == layouts(getattr(real.layers[0], f)), f
    # an untied table stays in the file mapping; its looked-up rows are dequantized from the same layout
    embed = real.embed.rows(np.array([0])) if isinstance(real.embed, MappedRows) else real.embed
    assert isinstance(real.embed, MappedRows) == (real.lm_head is not real.embed)
    assert layouts(mini.embed) == layouts(embed) and (mini.lm_head is mini.embed) == (real.lm_head is real.embed)
    a, b = build(config, real, default_plan(config)), build(mini_config, mini, default_plan(mini_config))
    for phase in ("prefill", "decode"):
        ea, eb = getattr(a.executors, phase), getattr(b.executors, phase)
        assert type(ea) is type(eb) and ea.layer_descriptions()[0] == eb.layer_descriptions()[0]
    if isinstance(a.executors.decode, OneRegionDecode):
        assert [(s.dtype, s.ndim) for s in a.executors.decode.stacks] == [
            (s.dtype, s.ndim) for s in b.executors.decode.stacks]
    b.warm_up()                                         # it runs: prefill and one decode step
    cache = b.new_cache(4)
    assert np.isfinite(b.forward(np.array([1, 2]), cache)).all()


def test_mixed_layers_stay_mixed(tmp_path, monkeypatch):
    """One miniature layer per distinct combination of layer tensor types."""
    from model_factory import hf_to_gguf, make_hf_model

    make_hf_model("llama", tmp_path)
    g = GGUFFile(hf_to_gguf(tmp_path, tmp_path / "m.gguf", "Q4_0", VOCAB))
    config = config_from_gguf(g)
    t = g.tensors["blk.1.ffn_down.weight"]
    g.tensors["blk.1.ffn_down.weight"] = dataclasses.replace(t, ggml_type=8)     # as if it were Q8_0
    mini_config, mini, layer_of = gguf_miniature(g, config)
    assert mini_config.num_hidden_layers == 2 and layer_of == [0, 1]
    assert type(mini.layers[0].w_down).__name__ == "Q4Weight" and type(mini.layers[1].w_down).__name__ == "I8Weight"


def test_a_layer_per_decode_mode(tmp_path):
    """Layers of the same types but different decode modes get a miniature layer each."""
    from model_factory import hf_to_gguf, make_hf_model

    make_hf_model("llama", tmp_path, num_hidden_layers=3)
    g = GGUFFile(hf_to_gguf(tmp_path, tmp_path / "m.gguf", "Q4_0", VOCAB))
    config = config_from_gguf(g)
    mini_config, _, layer_of = gguf_miniature(g, config, ("dense", "relu-exact", "dense"))
    assert mini_config.num_hidden_layers == 2 and layer_of == [0, 1]
