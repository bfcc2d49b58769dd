"""engine/session_file.py through LLM.save_session / load_session: a saved conversation resumes with the
same tokens and without prefilling its saved part again; files of another model, version or shape, and
damaged files, are refused with one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.errors import SessionError

P1 = "Once upon a time, there was a little dog named Max."


@pytest.fixture(scope="module")
def llm(stories_dir):
    from engine.loader import load

    return load(stories_dir, n_ctx=256)


def test_a_saved_conversation_resumes_where_it_stopped(llm, stories_dir, tmp_path):
    from engine.loader import load

    first = llm.session()
    r1 = first.generate(P1, max_tokens=16, temperature=0)
    path = tmp_path / "chat.session"
    first.save_session(path)
    tok = llm.tokenizer
    p2 = tok.encode(P1) + r1.tokens + tok.encode(" The next day,")[1:]     # ids: the conversation goes on
    direct = first.generate(p2, max_tokens=16, temperature=0)
    resumed = load(stories_dir, n_ctx=256)              # another LLM object, as another process would have
    resumed.load_session(path)
    again = resumed.generate(p2, max_tokens=16, temperature=0)
    assert again.tokens == direct.tokens
    assert again.stats.cached_tokens == direct.stats.cached_tokens == len(tok.encode(P1)) + len(r1.tokens) - 1
    assert not list(tmp_path.glob(".*.tmp"))           # written under a temporary name, then renamed


def test_an_empty_conversation_saves_and_loads(llm, tmp_path):
    llm.session().save_session(tmp_path / "empty")
    s = llm.session()
    s.load_session(tmp_path / "empty")
    assert s.generate(P1, max_tokens=4, temperature=0).stats.cached_tokens == 0


def _saved(llm, tmp_path):
    s = llm.session()
    s.generate(P1, max_tokens=4, temperature=0)
    path = tmp_path / "s.npz"
    s.save_session(path)
    return path


def _rewrite(path, **changes):
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"]))
    header.update({k: v for k, v in changes.items() if k in header})
    arrays.update({k: v for k, v in changes.items() if k not in header})
    arrays["header"] = np.array(json.dumps(header))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def test_another_kv_cache_type_is_refused(llm, stories_dir, tmp_path):
    from engine.loader import load

    path = _saved(llm, tmp_path)
    half = load(stories_dir, n_ctx=256, kv_cache="f16")
    with pytest.raises(SessionError, match="saved from another model"):
        half.load_session(path)


@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "version 99; this pocketinfer reads version 1"),
    ({"format": "something"}, "not a pocketinfer session file"),
    ({"tokens": 3}, "field k/v has shape"),
    ({"k": np.zeros((1, 1, 1, 1), np.float32)}, "field k/v has shape"),
    ({"ids": 10**6}, "field ids holds a token outside the vocabulary"),
])
def test_damaged_or_foreign_files_are_refused(llm, tmp_path, change, message):
    path = _saved(llm, tmp_path)
    if "ids" in change:                                 # every id replaced by this one
        with np.load(path) as z:
            change = {"ids": np.full(len(z["ids"]), change["ids"], np.int64)}
    _rewrite(path, **change)
    s = llm.session()
    with pytest.raises(SessionError, match=message):
        s.load_session(path)
    assert s.generate(P1, max_tokens=2, temperature=0).tokens      # still usable


def test_not_a_session_file_and_too_small_a_context(llm, stories_dir, tmp_path):
    from engine.loader import load

    junk = tmp_path / "junk"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(SessionError, match="junk: not a readable pocketinfer session file"):
        llm.session().load_session(junk)
    path = _saved(llm, tmp_path)
    with pytest.raises(SessionError, match="larger n_ctx"):
        load(stories_dir, n_ctx=8).load_session(path)
