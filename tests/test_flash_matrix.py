"""engine/flash/matrix.py: a matrix streamed from its model file gives exactly the resident weight's
results (one-token matmul and row lookups; several tokens within float rounding), through chunk boundaries, an unaligned tail at the end of the file,
O_DIRECT or its buffered fallback; a truncated file is refused at open, a failing read raises."""

import os

import numpy as np
import pytest

from engine.errors import FlashReadError
from engine.flash.matrix import FlashMatrix
from engine.formats.gguf_file import GGUFFile
from engine.formats.gguf_quants import weight_from_gguf


def _gguf(path, qtype, rows=300, cols=256, seed=0):
    """A GGUF whose second (last) tensor is the matrix under test, so its data ends the file."""
    gguf = pytest.importorskip("gguf")
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    for name, r in (("first.weight", 37), ("head.weight", rows)):
        arr = rng.standard_normal((r, cols)).astype(np.float32)
        if qtype == "F32":
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_1", "Q4_0", "F32"])
@pytest.mark.parametrize("direct", [True, False])
def test_flash_matrix_equals_resident(tmp_path, qtype, direct):
    path = _gguf(tmp_path / "m.gguf", qtype)
    g = GGUFFile(path)
    for name in ("head.weight", "first.weight"):
        t = g.tensors[name]
        resident = weight_from_gguf(t.ggml_type, g.raw(name), t.shape, name, str(path))
        # chunk_bytes small enough for several chunks, and not a multiple of the row size
        fm = FlashMatrix(path, t.offset, t.ggml_type, t.shape, name, direct=direct, chunk_bytes=5000)
        try:
            assert fm.rows_per_chunk < t.shape[0]
            rng = np.random.default_rng(1)
            x = rng.standard_normal((1, t.shape[1])).astype(np.float32)
            if qtype == "F32":      # BLAS GEMV: its blocking depends on the row count
                np.testing.assert_allclose(fm.matmul(x), resident.matmul(x), rtol=1e-5, atol=1e-5)
            else:                   # decode: the same row-wise kernel, bit for bit
                np.testing.assert_array_equal(fm.matmul(x), resident.matmul(x))
            # Several tokens go through BLAS on dequantized tiles, whose blocking follows the chunk: float
            # rounding only. (Generation needs the last position's logits alone: one token.)
            x = rng.standard_normal((3, t.shape[1])).astype(np.float32)
            np.testing.assert_allclose(fm.matmul(x), resident.matmul(x), rtol=1e-5, atol=1e-5)
            ids = np.array([0, t.shape[0] - 1, 5, 5])
            np.testing.assert_array_equal(fm.rows_f32(ids), resident.rows_f32(ids))
            assert fm.nbytes <= 2 * (5000 + 3 * 4096) + 3 * 4096 + fm.row_bytes   # the read buffers only
            assert fm.bytes_read > 0
        finally:
            fm.close()


def test_flash_matrix_refuses_truncated_file(tmp_path):
    path = _gguf(tmp_path / "m.gguf", "Q8_0")
    t = GGUFFile(path).tensors["head.weight"]
    with open(path, "r+b") as f:
        f.truncate(t.offset + 100)
    with pytest.raises(FlashReadError, match="truncated"):
        FlashMatrix(path, t.offset, t.ggml_type, t.shape, "head.weight")


def test_flash_matrix_read_error_raises_and_recovers(tmp_path):
    path = _gguf(tmp_path / "m.gguf", "Q8_0")
    t = GGUFFile(path).tensors["first.weight"]
    fm = FlashMatrix(path, t.offset, t.ggml_type, t.shape, "first.weight", direct=False, chunk_bytes=4096)
    x = np.ones((1, t.shape[1]), np.float32)
    want = fm.matmul(x)
    good, bad = fm.reader.fd, os.open(os.devnull, os.O_WRONLY)     # reads from it fail with EBADF
    fm.reader._use_fd(bad)
    with pytest.raises(FlashReadError, match="aborted"):
        fm.matmul(x)
    fm.reader._use_fd(good)
    os.close(bad)
    np.testing.assert_array_equal(fm.matmul(x), want)     # usable for the next request
    fm.close()


def test_deploy_with_the_lm_head_on_flash_gives_the_resident_tokens(tmp_path, stories_dir):
    """A deploy whose plan streams the embeddings / LM head (execution.lm_head = "flash") never loads
    them, and its greedy tokens and decode logits equal the resident deploy's exactly."""
    import json

    from model_factory import hf_to_gguf
    from test_stories260k import _vocab_meta

    import engine
    from planner.pipeline import make_deploy

    src = hf_to_gguf(stories_dir, tmp_path / "stories.gguf", "Q8_0", _vocab_meta(stories_dir))
    cal = tmp_path / "cal.txt"
    cal.write_text("Once upon a time, there was a little dog who liked to play in the park with his friends. " * 12)
    dep = make_deploy(src, "100%", tmp_path / "dep", device_profile="snapdragon-8gen3-ufs4", calibration=cal,
                      threads=1).path

    def greedy(llm, steps=12):
        cache = llm.model.new_cache(32)
        logits = llm.model.forward(np.array([1, 17, 93, 5]), cache, all_logits=False)
        out = []
        for _ in range(steps):
            tok = int(np.argmax(logits[-1]))
            out.append((tok, logits.copy()))
            logits = llm.model.forward(np.array([tok]), cache, all_logits=False)
        return out

    want = greedy(engine.load(dep, threads=1))
    plan = json.loads((dep / "plan.json").read_text())
    plan["execution"]["lm_head"] = "flash"
    (dep / "plan.json").write_text(json.dumps(plan))
    llm = engine.load(dep, threads=1)
    head = llm.model.weights.lm_head
    assert isinstance(head, FlashMatrix) and isinstance(llm.model.weights.embed, FlashMatrix)
    got = greedy(llm)
    assert [t for t, _ in got] == [t for t, _ in want]
    for (_, a), (_, b) in zip(got, want):
        np.testing.assert_array_equal(a, b)
    assert head.bytes_read > 0
