"""`engine.load(source)`: from a model source to an LLM ready to generate.

1. resolve the source (engine/formats/registry.py): a registry alias (pulled on first use), a .gguf
   file, a Hugging Face directory, or a deploy directory (engine/formats/deploy.py: its plan.json and
   the weights it was made for);
2. the execution plan (engine/executors/plan.py): the deploy's, else the defaults;
3. read the config and the tokenizer, warm the kernels up on the model's miniature (GGUF;
   engine/model/miniature.py), then read the weights the plan keeps in memory, repacked into the
   kernels' layouts (engine/formats/);
4. build the model: the executors chosen for the plan, the weights arranged for them
   (engine/executors/choose.py, engine/model/layout.py), then a warm-up step.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from engine.errors import ModelFormatError
from engine.executors.prefill import ENGINES
from engine.llm import LLM
from engine.memory import pin_mmap_threshold, release_compiler_pages, start_compiler, trim_heap
from engine.threads import set_threads

KV_CACHE_TYPES = {"f16": np.uint16, "f32": np.float32}   # the cache's element: half bits or float32


def load(source: str | os.PathLike = "smollm2-135m-instruct", *, threads: int | None = None,
         n_ctx: int | None = None, kv_cache: str | None = None, progress=None, sparse: bool = True,
         prefill: str | None = None) -> LLM:
    """Load a model: an HF directory, a .gguf file, a deploy directory or a registry alias (pulled on
    first use). threads defaults to the physical core count; n_ctx to min(model context, 4096);
    kv_cache ("f16" or "f32") to half for GGUF files, as llama.cpp, and float32 for HF checkpoints
    (their float reference). sparse=False: every in-RAM FFN dense, whatever the defaults or the
    deploy's plan say (eval-sparsity builds its own executors beside the untouched dense path). prefill
    ("int8", "onnx" or "f32", engine/executors/prefill.py) overrides the plan's or the default prefill engine."""
    from engine.formats import deploy as deploy_dir, registry
    from engine.model.transformer import build

    if kv_cache is not None and kv_cache not in KV_CACHE_TYPES:
        raise ValueError(f"kv_cache={kv_cache!r} is not one of {', '.join(KV_CACHE_TYPES)}")
    if prefill is not None and prefill not in ENGINES:
        raise ValueError(f"prefill={prefill!r} is not one of {', '.join(ENGINES)}")
    path = registry.resolve(source)
    deploy = plan_file = None
    if path.is_dir() and (path / "plan.json").exists():
        plan_file = path / "plan.json"
        deploy = deploy_dir.read_plan(path)
        if threads is None:
            threads = deploy_dir.deploy_threads(deploy)
        path = deploy_dir.model_path(path, deploy)
    threads = set_threads(threads)
    kv_dtype = KV_CACHE_TYPES[kv_cache or ("f32" if path.is_dir() else "f16")]
    pin_mmap_threshold()
    start_compiler()
    if path.is_dir():
        from engine.formats import hf_loader

        config = hf_loader.load_config(path)
        plan = _plan(plan_file, config, sparse, prefill)
        if plan.head_on_flash:
            raise ModelFormatError(f"{plan_file}: the plan streams the LM head from flash, which this version "
                                   "supports for GGUF weights only; re-run `pocketinfer plan` with a larger budget")
        weights = hf_loader.load_weights(path, config, progress, skip=plan.unloaded())
        from engine.text.tokenizer import from_hf_dir

        tokenizer = from_hf_dir(path, config.eos_ids, config.bos_token_id)
        file_bytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    elif path.suffix.lower() == ".gguf" or _is_gguf(path):
        from engine.formats import gguf_loader
        from engine.formats.gguf_file import GGUFFile
        from engine.text.tokenizer import from_gguf

        g = GGUFFile(path)
        config = gguf_loader.config_from_gguf(g)
        plan = _plan(plan_file, config, sparse, prefill)
        if plan.flash is None and not plan.predictors:
            # Kernels first, on a miniature of the model: the compiler's memory is then given back
            # before the weights arrive, not on top of them (engine/model/miniature.py). A plan with
            # predictors or flash FFNs warms up on the model itself below.
            from engine.model.miniature import warm_up_kernels

            warm_up_kernels(g, config, plan, kv_dtype)
        tokenizer = from_gguf(g.meta, str(path))
        if tokenizer.chat_template is None:
            tokenizer.chat_template = registry.chat_template_for(path)
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                    "tokenizer.ggml.token_type"):
            g.meta.pop(key, None)   # ~10 MiB of Python strings the tokenizer has copied: not in the peak
        weights = gguf_loader.load_weights(g, config, progress, skip=plan.unloaded(),
                                           direct_io=plan.direct_io)
        file_bytes = path.stat().st_size
        del g  # the weights were copied into their own layout (an untied embedding table keeps a view of the mapping)
    else:
        raise ModelFormatError(f"{path}: not a model (expected an HF directory with config.json or a .gguf file)")
    ctx = min(config.max_position_embeddings, 4096) if n_ctx is None else int(n_ctx)
    if ctx < 2:
        raise ValueError(f"n_ctx must be at least 2, got {ctx}")
    if plan.pruned is not None:
        from engine.formats.pruned import apply as apply_pruned

        apply_pruned(weights, plan.pruned)
    model = build(config, weights, plan, kv_dtype)
    trim_heap()      # what the layouts replaced (engine/model/layout.py) leaves holes in the heap
    model.warm_up()
    release_compiler_pages()
    return LLM(model, tokenizer, source=str(path), n_ctx=ctx, threads=threads, file_bytes=file_bytes, plan=deploy)


def _plan(plan_file: Path | None, config, sparse: bool, prefill: str | None):
    from engine.executors.plan import default_plan, read_plan

    plan = default_plan(config, sparse) if plan_file is None else read_plan(plan_file, config)
    if plan_file is not None and not sparse and plan.flash is None:
        plan = dataclasses.replace(plan, decode=("dense",) * config.num_hidden_layers, predictors={})
    if prefill is not None:
        plan = dataclasses.replace(plan, prefill=prefill)
    return plan


def _is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
