"""Declarative tensor-name maps from each source format to pocketinfer's own names.

Our names: `embed`, `norm`, `lm_head`, and per layer `layers.{}.X`. `{}` is the layer index.
Traps, stated where they bite:
- tied embeddings: when the LM head tensor is absent, the embedding matrix doubles as the LM head;
- GGUF (llama arch) stores Q and K rows permuted for llama.cpp's interleaved RoPE; gguf_loader.py
  undoes it, since our RoPE (kernels/rope.py) uses Hugging Face's rotate-half order;
- GGUF dims are listed fastest-first: gguf_file.py reverses them to numpy's (rows, cols).
"""

LAYER_MATRICES = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
LAYER_VECTORS = ("attn_norm", "ffn_norm")
LAYER_BIASES = ("bq", "bk", "bv", "bo")
QK_NORMS = ("q_norm", "k_norm")                    # config.qk_norm
SANDWICH_NORMS = ("post_attn_norm", "post_ffn_norm")   # config.sandwich_norms
# Phi-3 stores q|k|v and gate|up as one tensor each: our matrix -> (the fused one, its row block).
FUSED_PARTS = {"wq": ("wqkv", 0), "wk": ("wqkv", 1), "wv": ("wqkv", 2), "w_gate": ("w_gate_up", 0),
               "w_up": ("w_gate_up", 1)}

HF = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "layers.{}.attn_norm": "model.layers.{}.input_layernorm.weight",
    "layers.{}.wq": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.wk": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.wv": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.wo": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.bq": "model.layers.{}.self_attn.q_proj.bias",
    "layers.{}.bk": "model.layers.{}.self_attn.k_proj.bias",
    "layers.{}.bv": "model.layers.{}.self_attn.v_proj.bias",
    "layers.{}.bo": "model.layers.{}.self_attn.o_proj.bias",
    "layers.{}.ffn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.w_gate": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.w_up": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.w_down": "model.layers.{}.mlp.down_proj.weight",
    "layers.{}.q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.k_norm": "model.layers.{}.self_attn.k_norm.weight",
}
# Gemma 3 names its norms after where they sit: post_attention_layernorm is the attention output's norm.
HF_GEMMA3 = {**HF,
             "layers.{}.post_attn_norm": "model.layers.{}.post_attention_layernorm.weight",
             "layers.{}.ffn_norm": "model.layers.{}.pre_feedforward_layernorm.weight",
             "layers.{}.post_ffn_norm": "model.layers.{}.post_feedforward_layernorm.weight"}
HF_PHI3 = {**{k: v for k, v in HF.items() if k.rsplit(".", 1)[-1] not in FUSED_PARTS},
           "layers.{}.wqkv": "model.layers.{}.self_attn.qkv_proj.weight",
           "layers.{}.w_gate_up": "model.layers.{}.mlp.gate_up_proj.weight"}

GGUF = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "layers.{}.attn_norm": "blk.{}.attn_norm.weight",
    "layers.{}.wq": "blk.{}.attn_q.weight",
    "layers.{}.wk": "blk.{}.attn_k.weight",
    "layers.{}.wv": "blk.{}.attn_v.weight",
    "layers.{}.wo": "blk.{}.attn_output.weight",
    "layers.{}.bq": "blk.{}.attn_q.bias",
    "layers.{}.bk": "blk.{}.attn_k.bias",
    "layers.{}.bv": "blk.{}.attn_v.bias",
    "layers.{}.bo": "blk.{}.attn_output.bias",
    "layers.{}.ffn_norm": "blk.{}.ffn_norm.weight",
    "layers.{}.w_gate": "blk.{}.ffn_gate.weight",
    "layers.{}.w_up": "blk.{}.ffn_up.weight",
    "layers.{}.w_down": "blk.{}.ffn_down.weight",
    "layers.{}.q_norm": "blk.{}.attn_q_norm.weight",
    "layers.{}.k_norm": "blk.{}.attn_k_norm.weight",
    "layers.{}.post_attn_norm": "blk.{}.post_attention_norm.weight",
    "layers.{}.post_ffn_norm": "blk.{}.post_ffw_norm.weight",
}
GGUF_PHI3 = {**{k: v for k, v in GGUF.items() if k.rsplit(".", 1)[-1] not in FUSED_PARTS},
             "layers.{}.wqkv": "blk.{}.attn_qkv.weight",
             "layers.{}.w_gate_up": "blk.{}.ffn_up.weight"}


def hf_table(model_type: str) -> dict:
    """The HF name map of a model type."""
    return {"gemma3_text": HF_GEMMA3, "phi3": HF_PHI3}.get(model_type, HF)


def gguf_table(model_type: str) -> dict:
    """The GGUF name map of a model type."""
    return GGUF_PHI3 if model_type == "phi3" else GGUF


def source_name(table: dict, ours: str) -> str:
    """'layers.3.wq' -> the source's name for it, e.g. 'model.layers.3.self_attn.q_proj.weight'."""
    if ours.startswith("layers."):
        _, idx, field = ours.split(".", 2)
        return table["layers.{}." + field].format(idx)
    return table[ours]
