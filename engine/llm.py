"""The library API: the LLM that `engine.load(source)` returns (engine/loader.py), with its tokenizer,
logits, generate, stream, chat and describe.

The library never prints; errors are PocketInferError subclasses with one-line messages.

Threads. An LLM is one conversation: one KV cache and the prompt ids it holds, for prefix reuse. Its calls
are serialized: a call from a second thread waits until the first one's generation is finished (or its
stream closed), and a second call from the thread that is iterating a stream raises RuntimeError rather
than wait for itself. `llm.session()` is another conversation over the same weights, with its own cache;
threads driving different sessions generate at the same time, their forward passes interleaved token by
token (the model runs one pass at a time, engine/model/transformer.py), and each gets exactly the tokens
it would get alone.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from engine.errors import ContextLengthError
from engine.generate import Chunk, Response, stream_generate
from engine.model.transformer import Transformer
from engine.text.sampling import SamplingParams, make_sampler
from engine.text.tokenizer import Tokenizer

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
DEFAULT_MAX_TOKENS = 256


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, source: str, n_ctx: int, threads: int,
                 file_bytes: int = 0, plan: dict | None = None):
        """plan: a deploy directory's plan.json as a dict (its predictions, for --verbose), else None."""
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.source = source
        self.n_ctx = n_ctx
        self.threads = threads
        self.file_bytes = file_bytes
        self.plan = plan
        self._cache = None
        self._cache_ids: list[int] = []   # the token ids whose K/V the cache holds, for prefix reuse
        self._lock = threading.Lock()     # held by the call using the cache (module docstring)
        self._owner: int | None = None    # the thread holding it

    def session(self) -> "LLM":
        """Another conversation over the same weights, tokenizer and executors: its own KV cache and
        prefix, its own lock (module docstring). Costs the cache only."""
        other = copy.copy(self)
        other._cache, other._cache_ids = None, []
        other._lock, other._owner = threading.Lock(), None
        return other

    # ------------------------------------------------------------------ low level

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), vocab) float32 logits computed from an empty cache."""
        ids = self._check_ids(ids)
        if len(ids) > self.n_ctx:
            raise ContextLengthError(f"{len(ids)} tokens do not fit the context of {self.n_ctx}; pass fewer "
                                     "tokens or load with a larger n_ctx")
        cache = self.model.new_cache(max(1, len(ids)))
        return self.model.forward(np.asarray(ids), cache, all_logits=True)

    @property
    def weight_bytes(self) -> int:
        return self.model.weights.nbytes

    def describe(self) -> str:
        """The executors chosen for each phase and layer, one line per distinct executor."""
        return self.model.describe()

    # ------------------------------------------------------------------ generation

    def stream(self, prompt: str | Sequence[int], *, max_tokens: int | None = DEFAULT_MAX_TOKENS,
               stop: Sequence[str] | str | None = None, **sampling) -> Iterator[Chunk]:
        """Yield Chunks of new text; the last one has finish_reason "stop" or "length" and the final stats.
        Sampling: temperature, top_k, top_p, min_p, repeat_penalty, repeat_last_n, seed."""
        unknown = set(sampling) - set(_SAMPLING_KEYS)
        if unknown:
            raise TypeError(f"unknown sampling argument(s): {', '.join(sorted(unknown))} "
                            f"(known: max_tokens, stop, {', '.join(_SAMPLING_KEYS)})")
        params = SamplingParams(**sampling)
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        if not ids:
            raise ValueError("the prompt is empty: give some text or token ids")
        if len(ids) >= self.n_ctx:
            raise ContextLengthError(f"the prompt has {len(ids)} tokens but the context holds {self.n_ctx}; "
                                     "shorten it or load with a larger n_ctx")
        room = self.n_ctx - len(ids)
        max_tokens = room if max_tokens is None else min(int(max_tokens), room)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if isinstance(stop, str):
            stop = [stop]
        with self._turn():
            reuse = self._prepare_cache(ids)
            generated: list[int] = []
            try:
                for chunk in stream_generate(self.model, self._cache, ids, reuse, make_sampler(params), max_tokens,
                                             set(self.tokenizer.eos_token_ids), stop or (), self.tokenizer.decode):
                    if chunk.token is not None:
                        generated.append(chunk.token)
                    yield chunk
            finally:
                # What the cache now holds: the prompt and every generated token that was fed back.
                self._cache_ids = (ids + generated)[: self._cache.length]

    def generate(self, prompt: str | Sequence[int], **kwargs) -> Response:
        text, tokens, last = [], [], None
        for chunk in self.stream(prompt, **kwargs):
            text.append(chunk.text)
            if chunk.token is not None:
                tokens.append(chunk.token)
            last = chunk
        s = last.stats
        return Response(text="".join(text), tokens=tokens, finish_reason=last.finish_reason,
                        prompt_tokens=s.prompt_tokens, prompt_tps=s.prompt_tps, generation_tps=s.generation_tps,
                        ttft_s=s.ttft_s, peak_rss_mb=s.peak_rss_mb, stats=s)

    def chat(self, messages: list[dict], stream: bool = False, **kwargs):
        """Render the model's chat template and generate the assistant's reply (a Response, or an
        iterator of Chunks with stream=True). max_tokens defaults to the rest of the context."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        kwargs.setdefault("max_tokens", None)
        return self.stream(prompt, **kwargs) if stream else self.generate(prompt, **kwargs)

    def reset(self) -> None:
        """Forget the cached conversation (the next call prefills from scratch)."""
        with self._turn():
            self._cache_ids = []
            if self._cache is not None:
                self._cache.reset()

    def cached_tokens(self, ids: Sequence[int]) -> int:
        """How many leading `ids` this conversation's cache holds: what a call with them would reuse."""
        common = 0
        for a, b in zip(self._cache_ids, ids):
            if a != b:
                break
            common += 1
        return common

    def save_session(self, path) -> None:
        """Write this conversation's KV cache and token ids to `path` (engine/session_file.py), so that
        load_session resumes it later, in this process or another, without prefilling it again."""
        from engine import session_file

        with self._turn():
            session_file.save(path, self.model, self._cache, self._cache_ids)

    def load_session(self, path) -> None:
        """Resume the conversation saved at `path`: the next call whose prompt starts with its tokens
        reuses their K/V. SessionError when the file is not a session of this model and KV cache type."""
        from engine import session_file

        with self._turn():
            ids, k, v = session_file.load(path, self.model, self.n_ctx)
            if self._cache is None:
                self._cache = self.model.new_cache(self.n_ctx)
            n = len(ids)
            self._cache.k_all[:, :, :n] = k
            self._cache.v_all[:, :, :n] = v
            self._cache.length = n
            self._cache_ids = ids

    # ------------------------------------------------------------------ helpers

    @contextmanager
    def _turn(self):
        """Hold this conversation's cache for one call: wait for another thread's call to end; raise for a
        call from the thread already inside one (it would wait for itself)."""
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError("this LLM is already generating in this thread: finish or close that stream first, "
                               "or use llm.session() for a second conversation")
        with self._lock:
            self._owner = me
            try:
                yield
            finally:
                self._owner = None

    def _prepare_cache(self, ids: list[int]) -> int:
        """Reuse the longest common prefix with what the cache holds; return how many ids it covers."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.n_ctx)
        common = min(self.cached_tokens(ids), len(ids) - 1)   # at least one token is evaluated, for logits
        self._cache.truncate(common)
        self._cache_ids = self._cache_ids[:common]
        return common

    def _check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        vocab = self.config.vocab_size
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for a vocabulary of {vocab}")
        return ids
