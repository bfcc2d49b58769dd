"""Makes test models inside the tests: random-weight HF checkpoints (transformers + torch, test-only
dependencies) and GGUF files written from an HF directory with the `gguf` package, the way llama.cpp's
converter lays them out (Q/K rows permuted, dims reversed)."""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import numpy as np

# Small but not degenerate: GQA (4 query heads over 2 KV heads), two layers, 16-dim heads.
BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            bos_token_id=1, eos_token_id=2)

VARIANTS = {
    "llama": ("LlamaForCausalLM", {}),
    "llama-tied": ("LlamaForCausalLM", {"tie_word_embeddings": True}),
    "llama3-rope": ("LlamaForCausalLM", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "mistral": ("MistralForCausalLM", {"sliding_window": 8}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "llama-relu": ("LlamaForCausalLM", {"hidden_act": "relu"}),
    "llama-gelu": ("LlamaForCausalLM", {"hidden_act": "gelu"}),
    "bamboo-drelu": ("LlamaForCausalLM", {"hidden_act": "relu"}),   # rewritten as BambooForCausalLM below
    # q/k norms; a head_dim that is not hidden/heads
    "qwen3": ("Qwen3ForCausalLM", {"head_dim": 24}),
    # q|k|v and gate|up fused in the checkpoint; a sliding window on every layer
    "phi3": ("Phi3ForCausalLM", {"pad_token_id": 0, "sliding_window": 12}),
    # sliding and full layers with their own RoPE bases, a window shorter than the test's 26 tokens,
    # an attention scale other than 1/sqrt(head_dim), norms around both outputs, GeGLU, scaled embeddings
    "gemma3": ("Gemma3ForCausalLM", {
        "num_hidden_layers": 3, "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "sliding_window": 6, "query_pre_attn_scalar": 24, "head_dim": 16, "pad_token_id": 0,
        "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}}}),
}


def make_hf_model(name: str, directory: Path, seed: int = 0, dtype: str = "float32", shard_size: str | None = None,
                  **overrides):
    """Write a random-weight checkpoint to `directory`; returns the float32 torch reference model.
    overrides: config fields other than BASE's (e.g. intermediate_size)."""
    import torch
    import transformers

    arch, extra = VARIANTS[name]
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "TextConfig" if "Gemma3" in arch else "Config"))
    config = cfg_cls(**{**BASE, **extra, **overrides})
    if hasattr(config, "_attn_implementation"):
        config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    # Larger weights than HF's 0.02 init, so the logits spread widely and a 1e-4 tolerance means something.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
            elif "bias" in n:
                p.normal_(0.0, 0.5)
            else:
                p.uniform_(0.5, 1.5)
    if name == "bamboo-drelu":
        _make_drelu(model)
    save = model.to(getattr(torch, dtype)) if dtype != "float32" else model
    save.save_pretrained(directory, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    model = model.float()
    write_word_tokenizer(directory, config.vocab_size)
    if name == "bamboo-drelu":
        cfg_path = directory / "config.json"
        d = json.loads(cfg_path.read_text())
        d.update(architectures=["BambooForCausalLM"], model_type="bamboo")
        cfg_path.write_text(json.dumps(d))
    return model


def write_word_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer.json ("w3 w17 ...") so random checkpoints load like real ones."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def _make_drelu(model):
    """TurboSparse / Bamboo's dReLU FFN: down(relu(gate(x)) * relu(up(x)))."""
    import torch

    for layer in model.model.layers:
        mlp = layer.mlp
        mlp.forward = (lambda m: lambda x: m.down_proj(torch.relu(m.gate_proj(x)) * torch.relu(m.up_proj(x))))(mlp)


def torch_logits(model, ids) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([list(ids)])).logits[0].float().numpy()


def torch_cached_steps(model, prompt, steps):
    """Prefill `prompt`, then feed `steps` tokens one at a time through the KV cache; returns each
    step's logits (vocab,) float32."""
    import torch

    with torch.no_grad():
        out = model(torch.tensor([list(prompt)]), use_cache=True)
        past, per_step = out.past_key_values, []
        for t in steps:
            out = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            per_step.append(out.logits[0, -1].float().numpy())
    return per_step


# ------------------------------------------------------------------ GGUF writer (llama arch)

def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF rows -> llama.cpp's interleaved RoPE row order, as llama.cpp's converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_to_gguf(hf_dir: Path, out: Path, qtype: str = "F32", vocab_meta: dict | None = None,
               arch: str = "llama", qtypes: dict[str, str] | None = None) -> Path:
    """Convert a float32 HF checkpoint into a GGUF file of `arch` (llama, qwen3, phi3 or gemma3) with 2-D
    weights in `qtype` (or qtypes[fnmatch pattern of the GGUF name], the first that matches, as a
    Q4_K_M file mixes types), named and laid out as llama.cpp's converter does: only llama's Q/K rows permuted,
    Gemma's norms stored as 1 + w. Without vocab_meta, a stand-in vocabulary of the config's size."""
    import gguf
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    w = gguf.GGUFWriter(str(out), arch)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)       # Gemma 3: the global layers' base goes in the file
    w.add_rope_freq_base(rope.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    if cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    meta = vocab_meta or _stand_in_vocab(cfg["vocab_size"])
    w.add_tokenizer_model(meta.get("model", "llama"))
    if "tokens" in meta:
        w.add_token_list(meta["tokens"])
        w.add_token_scores(meta["scores"])
        w.add_token_types(meta["types"])
        w.add_bos_token_id(cfg.get("bos_token_id", 1))
        w.add_eos_token_id(cfg.get("eos_token_id", 2))
    names = {
        "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    layer_names = {
        "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
        "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
        "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
        "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
        "mlp.down_proj.weight": "ffn_down.weight", "self_attn.q_norm.weight": "attn_q_norm.weight",
        "self_attn.k_norm.weight": "attn_k_norm.weight", "self_attn.qkv_proj.weight": "attn_qkv.weight",
        "mlp.gate_up_proj.weight": "ffn_up.weight",
    }
    if arch == "gemma3":
        layer_names.update({"post_attention_layernorm.weight": "post_attention_norm.weight",
                            "pre_feedforward_layernorm.weight": "ffn_norm.weight",
                            "post_feedforward_layernorm.weight": "post_ffw_norm.weight"})
    for hf_name, arr in tensors.items():
        if hf_name in names:
            name = names[hf_name]
        else:
            parts = hf_name.split(".")  # model.layers.{i}.rest
            name = f"blk.{parts[2]}." + layer_names[".".join(parts[3:])]
        arr = arr.astype(np.float32)
        if arch == "gemma3" and name.endswith("norm.weight"):
            arr = arr + np.float32(1.0)
        if arch == "llama" and name.endswith("attn_q.weight"):
            arr = _permute(arr, heads)
        elif arch == "llama" and name.endswith("attn_k.weight"):
            arr = _permute(arr, kv)
        kind = next((t for pattern, t in (qtypes or {}).items() if fnmatch.fnmatch(name, pattern)), qtype)
        qt = getattr(gguf.GGMLQuantizationType, kind)
        block = gguf.GGML_QUANT_SIZES[qt][0]
        # Like llama.cpp's quantizer, rows whose length is not a multiple of the block stay F32.
        if arr.ndim == 2 and kind != "F32" and arr.shape[1] % block == 0:
            writers = {"F16": lambda v: v.astype(np.float16), "Q4_K": quantize_q4_k, "Q6_K": quantize_q6_k}
            data = writers.get(kind, lambda v: gguf.quants.quantize(v, qt))(arr)
            # add_tensor derives the logical shape from the quantized byte shape and raw_dtype.
            w.add_tensor(name, data, raw_dtype=qt if kind != "F16" else None)
        else:
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _stand_in_vocab(n: int) -> dict:
    """A SentencePiece-type vocabulary of n tokens: <unk>, <s>, </s>, then pieces "a0", "a1", ..."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"a{i}" for i in range(n - 3)]
    return {"model": "llama", "tokens": tokens, "scores": [0.0] * 3 + [-float(i) for i in range(n - 3)],
            "types": [2, 3, 3] + [1] * (n - 3)}


# ------------------------------------------------------------------ K-quant writers (gguf-py has none)

def quantize_q4_k(a: np.ndarray) -> np.ndarray:
    """(rows, cols) f32 -> (rows, cols/256*144) uint8 Q4_K blocks: per 32-element sub-block a 6-bit scale
    and min of the super-block's f16 d and dmin, 4-bit values (engine/formats/gguf_quants.py's layout)."""
    x = a.astype(np.float32).reshape(-1, 8, 32)                              # (blocks, sub-block, 32)
    lo = np.minimum(x.min(axis=2), 0)                                        # values are d*sc*q - dmin*mn
    step = (x.max(axis=2) - lo) / 15
    d = (step.max(axis=1) / 63).astype(np.float16)
    dmin = (-lo.min(axis=1) / 63).astype(np.float16)
    sc = np.clip(np.rint(step / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 1, 63).astype(np.uint8)
    mn = np.clip(np.rint(-lo / np.maximum(dmin.astype(np.float32), 1e-30)[:, None]), 0, 63).astype(np.uint8)
    ds = d.astype(np.float32)[:, None] * sc
    ms = dmin.astype(np.float32)[:, None] * mn
    q = np.clip(np.rint((x + ms[..., None]) / np.maximum(ds, 1e-30)[..., None]), 0, 15).astype(np.uint8)
    out = np.zeros((x.shape[0], 144), np.uint8)
    out[:, 0:2] = d.view(np.uint8).reshape(-1, 2)
    out[:, 2:4] = dmin.view(np.uint8).reshape(-1, 2)
    out[:, 4:8] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 8:12] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 12:16] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    qs = q.reshape(-1, 4, 2, 32)                                             # chunk c: sub-blocks 2c, 2c+1
    out[:, 16:] = (qs[:, :, 0] | (qs[:, :, 1] << 4)).reshape(-1, 128)
    return out.reshape(a.shape[0], -1)


def quantize_q6_k(a: np.ndarray) -> np.ndarray:
    """(rows, cols) f32 -> (rows, cols/256*210) uint8 Q6_K blocks: per 16 elements an int8 scale of the
    super-block's f16 d, 6-bit values (engine/formats/gguf_quants.py's layout)."""
    x = a.astype(np.float32).reshape(-1, 16, 16)
    step = np.abs(x).max(axis=2) / 31
    d = (step.max(axis=1) / 127).astype(np.float16)
    scale = np.clip(np.rint(step / np.maximum(d.astype(np.float32), 1e-30)[:, None]), 1, 127).astype(np.int8)
    ds = d.astype(np.float32)[:, None] * scale
    q = (np.clip(np.rint(x / np.maximum(ds, 1e-30)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 4, 32)
    out = np.zeros((x.shape[0], 210), np.uint8)
    ql = out[:, :128].reshape(-1, 2, 2, 32)                                  # half, t % 2, l
    ql[:] = (q[:, :, 0:2] & 15) | ((q[:, :, 2:4] & 15) << 4)                 # quarter t's nibble t // 2
    qh = out[:, 128:192].reshape(-1, 2, 32)
    qh[:] = sum(((q[:, :, t] >> 4) & 3) << (2 * t) for t in range(4))
    out[:, 192:208] = scale.view(np.uint8)
    out[:, 208:210] = d.view(np.uint8).reshape(-1, 2)
    return out.reshape(a.shape[0], -1)
