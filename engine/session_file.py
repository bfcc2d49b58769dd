"""A conversation's KV cache on disk, so that an app resumes a long conversation without paying its prefill
again (LLM.save_session / LLM.load_session).

Format, version 1: an uncompressed .npz (numpy's zip of .npy files, read with allow_pickle=False):
- `header`: a 0-d string array holding JSON: {"format": "pocketinfer-session", "version": 1,
  "fingerprint": the model's (below), "kv_dtype": "float32" or "uint16" (IEEE half bits), "tokens": n};
- `ids` (n,) int64: the token ids whose K/V are stored, in order;
- `k`, `v` (layers, kv_heads, n, head_dim) of kv_dtype: positions 0..n-1 of the cache (engine/model/kv_cache.py).
The file is written to a temporary name beside the target, then renamed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from engine.errors import SessionError

FORMAT = "pocketinfer-session"
VERSION = 1


def fingerprint(model) -> str:
    """What the stored K/V depend on: the config (without where it was read from), the KV element type,
    and a sample of the weights (every norm vector and the first embedding rows), so that another
    checkpoint of the same shape has another fingerprint."""
    h = hashlib.sha256()
    config = {k: v for k, v in dataclasses.asdict(model.config).items() if k != "source"}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(np.dtype(model.kv_dtype).str.encode())
    w = model.weights
    for lw in w.layers:
        h.update(np.ascontiguousarray(lw.attn_norm, dtype=np.float32).tobytes())
        h.update(np.ascontiguousarray(lw.ffn_norm, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(w.norm, dtype=np.float32).tobytes())
    h.update(w.embed.rows_f32(np.arange(min(4, model.config.vocab_size))).tobytes())
    return h.hexdigest()[:32]


def save(path: str | os.PathLike, model, cache, ids: list[int]) -> None:
    """Write positions 0..len(ids)-1 of `cache` (None: an empty conversation) and their ids to `path`."""
    path = Path(path)
    n = len(ids)
    c = model.config
    shape = (c.num_hidden_layers, c.num_key_value_heads, n, c.head_dim)
    dtype = np.dtype(model.kv_dtype)
    k = cache.k_all[:, :, :n] if cache is not None else np.zeros(shape, dtype)
    v = cache.v_all[:, :, :n] if cache is not None else np.zeros(shape, dtype)
    header = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint(model), "kv_dtype": dtype.name,
              "tokens": n}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, header=np.array(json.dumps(header)), ids=np.asarray(ids, dtype=np.int64), k=k, v=v)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: str | os.PathLike, model, n_ctx: int) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(ids, k, v) from a session file written for this model; SessionError naming what does not match."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            header = json.loads(str(z["header"]))
            ids, k, v = z["ids"], z["k"], z["v"]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise SessionError(f"{path}: not a readable pocketinfer session file ({type(e).__name__}: {e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SessionError(f"{path}: not a pocketinfer session file (field format is not {FORMAT!r})")
    if header.get("version") != VERSION:
        raise SessionError(f"{path}: session format version {header.get('version')!r}; this pocketinfer reads "
                           f"version {VERSION}: save the conversation again with this version")
    if header.get("fingerprint") != fingerprint(model):
        raise SessionError(f"{path}: the session was saved from another model (or KV cache type); load it with "
                           "the model and kv_cache it was saved with")
    c, n = model.config, len(ids)
    shape = (c.num_hidden_layers, c.num_key_value_heads, n, c.head_dim)
    dtype = np.dtype(model.kv_dtype)
    if header.get("tokens") != n or k.shape != shape or v.shape != shape or k.dtype != dtype or v.dtype != dtype:
        raise SessionError(f"{path}: field k/v has shape {k.shape} {k.dtype}, expected {shape} {dtype.name} for "
                           f"{n} tokens; the file is damaged, save the conversation again")
    if n >= n_ctx:
        raise SessionError(f"{path}: the session holds {n} tokens, the context {n_ctx}; load the model with a "
                           f"larger n_ctx")
    if n and not (0 <= ids.min() and ids.max() < c.vocab_size):
        raise SessionError(f"{path}: field ids holds a token outside the vocabulary of {c.vocab_size}; the file is "
                           "damaged")
    return [int(i) for i in ids], k, v
