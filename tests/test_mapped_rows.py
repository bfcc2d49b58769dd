"""engine/formats/mapped_rows.py: an untied GGUF embedding table stays in the file mapping, and its lookups
give exactly the rows the resident table gives."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import ModelFormatError
from engine.formats.gguf_file import GGUFFile
from engine.formats.gguf_loader import config_from_gguf, load_weights
from engine.formats.gguf_quants import weight_from_gguf
from engine.formats.mapped_rows import MappedRows

pytest.importorskip("torch", reason="the test models are made with the [test] extra (torch, transformers)")

VOCAB = {"model": "llama", "tokens": ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 128)],
         "scores": [0.0] * 128, "types": [2, 3, 3] + [1] * 125}


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "F16", "F32"])
def test_untied_embeddings_stay_mapped_and_look_up_the_resident_rows(tmp_path, qtype):
    from model_factory import hf_to_gguf, make_hf_model

    make_hf_model("llama", tmp_path)
    g = GGUFFile(hf_to_gguf(tmp_path, tmp_path / "m.gguf", qtype, VOCAB))
    weights = load_weights(g, config_from_gguf(g))
    embed = weights.embed
    assert isinstance(embed, MappedRows) and weights.lm_head is not embed
    assert np.shares_memory(embed.raw, g.raw("token_embd.weight"))         # a view of the file, not a copy
    t = g.tensors["token_embd.weight"]
    resident = weight_from_gguf(t.ggml_type, g.raw(t.name), t.shape, t.name, "test")
    ids = np.array([5, 0, 127, 5, 64])
    np.testing.assert_array_equal(embed.rows_f32(ids), resident.rows_f32(ids))
    np.testing.assert_array_equal(embed.to_float32(), resident.to_float32())
    assert embed.nbytes == t.nbytes


def test_tied_embeddings_are_resident(tmp_path):
    from model_factory import hf_to_gguf, make_hf_model

    make_hf_model("llama-tied", tmp_path)
    g = GGUFFile(hf_to_gguf(tmp_path, tmp_path / "m.gguf", "Q8_0", VOCAB))
    weights = load_weights(g, config_from_gguf(g))
    assert weights.lm_head is weights.embed and not isinstance(weights.embed, MappedRows)


def test_a_table_of_the_wrong_size_is_refused():
    raw = np.zeros(34 * 4 - 1, np.uint8)           # four Q8_0 blocks, one byte short
    with pytest.raises(ModelFormatError, match="'t'.*expected 136"):
        MappedRows(8, raw, (4, 32), "t", "m.gguf")
