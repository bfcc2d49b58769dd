"""Loads a GGUF file (llama, qwen2, qwen3, phi3 and gemma3 architectures): config from metadata, weights
repacked for our kernels, tokenizer and chat template from the `tokenizer.*` keys."""

from __future__ import annotations

import numpy as np

from engine.errors import ModelFormatError
from engine.flash.matrix import attach_head
from engine.formats import weight_map
from engine.formats.assemble import assemble
from engine.formats.gguf_file import GGUFFile
from engine.formats.gguf_quants import vector_from_gguf, weight_from_gguf
from engine.formats.mapped_rows import MappedRows
from engine.model.config import ModelConfig
from engine.model.transformer import ModelWeights
from engine.model.weights import Weight

# general.architecture -> (HF architecture, model_type, hidden_act)
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", "silu"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", "silu"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", "silu"),
    "phi3": ("Phi3ForCausalLM", "phi3", "silu"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", "gelu_pytorch_tanh"),
}
SUPPORTED_ARCHS = tuple(ARCHITECTURES)


def _get(meta: dict, key: str, source: str, default=None, required: bool = False):
    if key in meta:
        return meta[key]
    if required:
        raise ModelFormatError(f"{source}: GGUF metadata key {key!r} is missing; re-convert the model with llama.cpp")
    return default


def config_from_gguf(g: GGUFFile) -> ModelConfig:
    src, meta = str(g.path), g.meta
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ModelFormatError(f"{src}: general.architecture={arch!r} is not supported "
                               f"(supported: {', '.join(SUPPORTED_ARCHS)})")
    a = arch + "."
    heads = int(_get(meta, a + "attention.head_count", src, required=True))
    hidden = int(_get(meta, a + "embedding_length", src, required=True))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = _get(meta, a + "vocab_size", src, default=len(tokens) if tokens is not None else None)
    if vocab is None and "token_embd.weight" in g.tensors:
        vocab = g.tensors["token_embd.weight"].shape[0]
    scaling = None
    if _get(meta, a + "rope.scaling.type", src) == "linear":
        scaling = {"rope_type": "linear", "factor": float(meta[a + "rope.scaling.factor"])}
    hf_arch, model_type, act = ARCHITECTURES[arch]
    d = {
        "architectures": [hf_arch], "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _get(meta, a + "feed_forward_length", src, required=True),
        "num_hidden_layers": _get(meta, a + "block_count", src, required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(meta, a + "attention.head_count_kv", src, default=heads),
        "head_dim": _get(meta, a + "attention.key_length", src, default=hidden // heads),
        "max_position_embeddings": _get(meta, a + "context_length", src, default=2048),
        "rms_norm_eps": float(_get(meta, a + "attention.layer_norm_rms_epsilon", src, default=1e-5)),
        "rope_theta": float(_get(meta, a + "rope.freq_base", src, default=10000.0)),
        "rope_scaling": scaling,
        "hidden_act": act,
        "sliding_window": _get(meta, a + "attention.sliding_window", src),
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if arch == "gemma3" and d["num_hidden_layers"] == 62:
        # llama.cpp's rule: Gemma 3 27B scales attention by 1/sqrt(hidden/heads), the others by 1/sqrt(head_dim)
        d["query_pre_attn_scalar"] = hidden // heads
    if arch == "qwen2" or arch == "qwen3":
        d["use_sliding_window"] = False      # llama.cpp runs Qwen's layers with full attention
    d = {k: (int(v) if isinstance(v, (np.integer,)) else v) for k, v in d.items()}
    for k in ("vocab_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads", "head_dim",
              "max_position_embeddings"):
        d[k] = int(d[k])
    if d["sliding_window"] is not None:
        d["sliding_window"] = int(d["sliding_window"])
    return ModelConfig.from_hf_dict(d, source=src)


def _unpermute_order(rows: int, n_head: int) -> np.ndarray:
    """Row order that turns llama.cpp's Q/K rows back into Hugging Face's.

    llama.cpp's converter permutes each head's rows so that RoPE pairs are adjacent (interleaved),
    GGUF row h*hd + 2i + t holding HF row h*hd + t*hd/2 + i. Without undoing it, RoPE rotates the
    wrong pairs and the output diverges after a few tokens.
    """
    hd = rows // n_head
    return np.arange(rows).reshape(n_head, hd // 2, 2).transpose(0, 2, 1).reshape(-1)


CHUNK_BYTES = 16 << 20      # file bytes converted (and released) at a time


def _converted_in_row_chunks(g: GGUFFile, name: str, src: str) -> Weight:
    """The tensor in its kernel layout, converted CHUNK_BYTES of whole rows at a time (blocks never cross
    rows), each chunk's file pages released once copied: a large tensor (Gemma 3's 178 MB embedding
    table) then never has its file pages and its copy resident at once."""
    t = g.tensors[name]
    rows, cols = t.shape
    row_bytes = t.nbytes // rows
    step = max(1, CHUNK_BYTES // row_bytes)
    raw = g.raw(name)
    first = weight_from_gguf(t.ggml_type, raw[:min(step, rows) * row_bytes], (min(step, rows), cols), name, src)
    if rows <= step:
        g.release(name)
        return first
    arrays = [np.empty((rows,) + a.shape[1:], a.dtype) for a in first._arrays()]
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        part = first if r0 == 0 else weight_from_gguf(t.ggml_type, raw[r0 * row_bytes:r1 * row_bytes],
                                                      (r1 - r0, cols), name, src)
        for out, a in zip(arrays, part._arrays()):
            out[r0:r1] = a
        g.release(name, r0 * row_bytes, (r1 - r0) * row_bytes)
    return type(first)(*arrays)


def load_weights(g: GGUFFile, config: ModelConfig, progress=None, skip: frozenset[str] = frozenset(),
                 direct_io: bool = True) -> ModelWeights:
    """skip: our names of matrices left unloaded (engine/formats/assemble.py); when they include the
    embeddings, those and the LM head are streamed from the file at every use instead
    (engine/flash/matrix.py, O_DIRECT reads unless direct_io is False)."""
    src = str(g.path)
    untied = "output.weight" in g.tensors
    permuted = g.meta.get("general.architecture") == "llama"     # the converter permutes only llama's Q/K rows

    def matrix(name) -> Weight | MappedRows:
        t = g.tensors[name]
        if len(t.shape) != 2:
            raise ModelFormatError(f"{src}: tensor {name!r} has shape {t.shape}, expected a matrix")
        if untied and name == "token_embd.weight":      # only looked up: it stays in the file mapping
            return MappedRows(t.ggml_type, g.raw(name), t.shape, name, src)
        return _converted_in_row_chunks(g, name, src)

    def vector(name) -> np.ndarray:
        t = g.tensors[name]
        n = int(np.prod(t.shape))
        v = vector_from_gguf(t.ggml_type, g.raw(name), n, name, src).reshape(t.shape)
        g.release(name)
        return v

    def fix(ours: str, t):
        """Q and K rows (and their biases, rare in llama GGUFs) back in Hugging Face's order."""
        heads = {"wq": config.num_attention_heads, "bq": config.num_attention_heads,
                 "wk": config.num_key_value_heads, "bk": config.num_key_value_heads}.get(ours.rsplit(".", 1)[-1])
        if heads is None or not permuted:
            return t
        order = _unpermute_order(t.shape[0], heads)
        return t.take_rows(order) if isinstance(t, Weight) else t[order]

    weights = assemble(config, weight_map.gguf_table(config.model_type), src, matrix, vector, lambda n: n in g.tensors, fix, progress,
                       skip=skip)
    if "rope_freqs.weight" in g.tensors:
        weights.rope_freq_factors = vector("rope_freqs.weight")
    if "embed" in skip:
        attach_head(weights, g, direct_io)
    return weights
