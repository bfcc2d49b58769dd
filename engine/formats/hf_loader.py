"""Loads a Hugging Face model directory: config.json, generation_config.json, model.safetensors (or the
shards named in model.safetensors.index.json), tokenizer.json and tokenizer_config.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from engine.errors import ConfigError, ModelFormatError
from engine.formats import weight_map
from engine.formats.assemble import assemble
from engine.formats.safetensors_file import SafetensorsFile
from engine.model.config import PLUS_ONE_NORM_TYPES, ModelConfig
from engine.model.transformer import ModelWeights
from engine.model.weights import dense_from_numpy, vector_f32


def read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise ModelFormatError(f"{path}: file not found; an HF model directory needs it")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFormatError(f"{path}: invalid JSON ({e}); fix or re-download it") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return data


def load_config(directory: Path) -> ModelConfig:
    d = read_json(directory / "config.json")
    gen = read_json(directory / "generation_config.json", required=False)
    # generation_config.json's eos list (e.g. Llama-3's <|eot_id|>) is what generation should stop on.
    if gen.get("eos_token_id") is not None:
        d = {**d, "eos_token_id": gen["eos_token_id"]}
    return ModelConfig.from_hf_dict(d, source=str(directory / "config.json"))


def _open_shards(directory: Path) -> dict[str, SafetensorsFile]:
    """tensor name -> the file that holds it."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.exists():
        f = SafetensorsFile(single)
        return {name: f for name in f.keys()}
    if index.exists():
        wmap = read_json(index).get("weight_map")
        if not isinstance(wmap, dict):
            raise ModelFormatError(f"{index}: no 'weight_map' object; re-download the model")
        files = {fn: SafetensorsFile(directory / fn) for fn in sorted(set(wmap.values()))}
        return {name: files[fn] for name, fn in wmap.items()}
    raise ModelFormatError(f"{directory}: no model.safetensors or model.safetensors.index.json; "
                           "pocketinfer reads safetensors checkpoints (convert .bin files first)")


def load_weights(directory: Path, config: ModelConfig, progress=None, skip: frozenset[str] = frozenset()) -> ModelWeights:
    """skip: our names of matrices left unloaded (engine/formats/assemble.py)."""
    shards = _open_shards(directory)

    def matrix(name):
        f = shards[name]
        if len(f.shape(name)) != 2:
            raise ModelFormatError(f"{f.path}: tensor {name!r} has shape {f.shape(name)}, expected a matrix")
        w = dense_from_numpy(f.get(name), f.dtype(name))
        f.release(name)
        return w

    plus_one = config.model_type in PLUS_ONE_NORM_TYPES

    def vector(name):
        f = shards[name]
        v = vector_f32(f.get(name), f.dtype(name))
        f.release(name)
        if plus_one and name.endswith("norm.weight"):
            v = v + np.float32(1.0)        # Gemma's RMSNorm multiplies by 1 + w; GGUF files store 1 + w already
        return v

    try:
        return assemble(config, weight_map.hf_table(config.model_type), str(directory), matrix, vector, lambda n: n in shards, progress=progress,
                        skip=skip)
    except ValueError as e:
        if isinstance(e, (ModelFormatError, ConfigError)):
            raise
        raise ModelFormatError(f"{directory}: {e}") from None
