"""The library API: `engine.load(source)` returns an LLM with tokenizer, logits, generate, stream and chat.

The library never prints; errors are PocketInferError subclasses with one-line messages.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from engine.errors import ContextLengthError, ModelFormatError
from engine.generate import Chunk, Response, stream_generate
from engine.memory import pin_mmap_threshold, release_compiler_pages, start_compiler, trim_heap
from engine.model.transformer import Transformer
from engine.text.sampling import SamplingParams, make_sampler
from engine.threads import set_threads
from engine.text.tokenizer import Tokenizer

_SAMPLING_KEYS = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "repeat_last_n", "seed")
DEFAULT_MAX_TOKENS = 256


class LLM:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, source: str, n_ctx: int, threads: int,
                 file_bytes: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.config = model.config
        self.source = source
        self.n_ctx = n_ctx
        self.threads = threads
        self.file_bytes = file_bytes
        self._cache = None
        self._cache_ids: list[int] = []   # the token ids whose K/V the cache holds, for prefix reuse

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
        self._cache_ids = []
        if self._cache is not None:
            self._cache.reset()

    # ------------------------------------------------------------------ helpers

    def _prepare_cache(self, ids: list[int]) -> int:
        """Reuse the longest common prefix with what the cache holds; return how many ids it covers."""
        if self._cache is None:
            self._cache = self.model.new_cache(self.n_ctx)
        common = 0
        for a, b in zip(self._cache_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)   # at least one token must be evaluated to get logits
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


KV_CACHE_TYPES = {"f16": np.uint16, "f32": np.float32}   # the cache's element: half bits or float32


def load(source: str | os.PathLike = "smollm2-135m-instruct", *, threads: int | None = None, plan=None,
         n_ctx: int | None = None, kv_cache: str | None = None, progress=None, sparse: bool = True) -> LLM:
    """Load a model: an HF directory, a .gguf file, a deploy directory or a registry alias (pulled on
    first use). threads defaults to the physical core count; n_ctx to min(model context, 4096);
    kv_cache ("f16" or "f32") to half for GGUF files, as llama.cpp, and float32 for HF checkpoints
    (their float reference). sparse=False: every in-RAM FFN dense, whatever the defaults or the
    deploy's plan say (eval-sparsity builds its own executor beside the untouched dense path)."""
    from engine.formats import registry

    if kv_cache is not None and kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")

    path = registry.resolve(source)
    if plan is not None:
        raise ModelFormatError("plan= is not supported: load the deploy directory `pocketinfer plan` wrote instead")
    deploy = None
    if path.is_dir() and (path / "plan.json").exists():
        # A deploy directory: its weights, checked against the plan's fingerprint. This version runs them
        # fully resident (the flash-resident path comes with its own issue); plan.json says so.
        from engine.formats import deploy as deploy_dir

        deploy = deploy_dir.read_plan(path)
        deploy_root = path
        if threads is None:
            threads = deploy_dir.deploy_threads(deploy)
        path = deploy_dir.model_path(path, deploy)
    threads = set_threads(threads)
    # Half for GGUF files, as llama.cpp; float32 for HF checkpoints (their float reference).
    kv_dtype = KV_CACHE_TYPES[kv_cache or ("f32" if path.is_dir() else "f16")]
    pin_mmap_threshold()
    start_compiler()
    if deploy is not None and deploy_dir.head_on_flash(deploy) and path.is_dir():
        raise ModelFormatError(f"{deploy_root / 'plan.json'}: the plan streams the LM head from flash, which this "
                               "version supports for GGUF weights only; re-run `pocketinfer plan` with a larger budget")
    if path.is_dir():
        from engine.formats import hf_loader
        from engine.text.tokenizer import from_hf_dir

        config = hf_loader.load_config(path)
        weights = hf_loader.load_weights(path, config, progress)
        tokenizer = from_hf_dir(path, config.eos_ids, config.bos_token_id)
        file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    elif path.suffix.lower() == ".gguf" or _is_gguf(path):
        from engine.formats import gguf_loader
        from engine.formats.gguf_file import GGUFFile
        from engine.text.tokenizer import from_gguf

        g = GGUFFile(path)
        config = gguf_loader.config_from_gguf(g)
        if deploy is None:
            # Kernels first, on a miniature of the model: the compiler's memory is then given back
            # before the weights arrive, not on top of them (engine/model/miniature.py). A deploy's flash FFN
            # warms up on the model itself below.
            from engine.model.miniature import warm_up_kernels

            warm_up_kernels(g, config, kv_dtype)
        tokenizer = from_gguf(g.meta, str(path))
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type"):
            g.meta.pop(key, None)   # ~10 MiB of Python strings the tokenizer has copied: not in the peak
        skip = deploy_dir.unloaded_weights(deploy, config.num_hidden_layers) if deploy is not None else None
        weights = gguf_loader.load_weights(g, config, progress, skip=skip)
        if deploy is not None and deploy_dir.head_on_flash(deploy):
            from engine.flash.matrix import attach_head
            attach_head(weights, g, direct=bool(deploy.get("io", {}).get("direct_io", True)))
        file_bytes = path.stat().st_size
        del g  # drop the file mapping: the weights were copied into their own layout
    else:
        raise ModelFormatError(f"{path}: not a model (expected an HF directory with config.json or a .gguf file)")
    ctx = min(config.max_position_embeddings, 4096) if n_ctx is None else int(n_ctx)
    if ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, got {ctx}")
    from engine.executors import flash_plan
    from engine.executors.sparse import attach, decode_plan
    on_flash = deploy is not None and flash_plan.uses_flash(deploy)
    # The in-RAM decode modes: a deploy's plan.json, else the defaults (relu-exact for ReLU-family
    # models, dense for the rest). Sparse layers move their gate and up into neuron records
    # (engine/executors/sparse.py), so the model skips the one-call decode stacks that would copy them first.
    if on_flash:
        modes, predictors, cluster = None, None, 1
    elif not sparse:
        modes, predictors, cluster = ["dense"] * config.num_hidden_layers, {}, 1
    else:
        modes, predictors, cluster = decode_plan(deploy_root / "plan.json" if deploy is not None else None, config)
    model = Transformer(config, weights, decode_stacks=on_flash or all(m == "dense" for m in modes))
    model.kv_dtype = kv_dtype
    trim_heap()      # the arrays Transformer restacked (engine/model/transformer.py) leave holes in the heap
    if on_flash:
        # A plan below 100%: FFNs from the bundle file (issue 6); their matrices were never loaded.
        flash_plan.attach_flash(model, deploy_root, deploy)
        del weights
    else:
        attach(model, modes, predictors=predictors, cluster=cluster, records="move")
        trim_heap()  # the stacked gate|up the records replaced
    model.warm_up()
    release_compiler_pages()
    llm = LLM(model, tokenizer, source=str(path), n_ctx=ctx, threads=threads, file_bytes=file_bytes)
    llm.plan = deploy   # a deploy directory's plan.json as a dict, else None
    return llm


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
