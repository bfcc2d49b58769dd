"""Write a random-weight llama-architecture GGUF of any shape, for speed measurements at realistic sizes.

The weights are random (N(0, 0.02)), so the model's text is meaningless: label every figure measured on
it "synthetic". Its vocabulary is placeholder SentencePiece-style tokens, enough for both pocketinfer
and llama.cpp to load it.

    python tools/make_synthetic_gguf.py --preset tinyllama --type Q4_0 -o /tmp/tinyllama-synth-q4_0.gguf
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

PRESETS = {
    # TinyLlama-1.1B's shape (the scale check).
    "tinyllama": dict(layers=22, hidden=2048, ffn=5632, heads=32, kv_heads=4, vocab=32000, ctx=2048),
    "smollm2-135m": dict(layers=30, hidden=576, ffn=1536, heads=9, kv_heads=3, vocab=49152, ctx=8192),
}


def write(path: str, layers: int, hidden: int, ffn: int, heads: int, kv_heads: int, vocab: int, ctx: int,
          qtype: str, seed: int = 0) -> None:
    import gguf

    rng = np.random.default_rng(seed)
    qt = getattr(gguf.GGMLQuantizationType, qtype)
    tmp = path + ".part"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("synthetic random-weight model")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("llama")
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tokens += [f"▁t{i}" for i in range(vocab - len(tokens))]
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(vocab - 259)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (vocab - 259))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def mat(name, rows, cols):
        a = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)
        w.add_tensor(name, gguf.quants.quantize(a, qt) if qtype != "F32" else a,
                     raw_dtype=qt if qtype != "F32" else None)

    hd = hidden // heads
    mat("token_embd.weight", vocab, hidden)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
        mat(f"blk.{i}.attn_q.weight", heads * hd, hidden)
        mat(f"blk.{i}.attn_k.weight", kv_heads * hd, hidden)
        mat(f"blk.{i}.attn_v.weight", kv_heads * hd, hidden)
        mat(f"blk.{i}.attn_output.weight", hidden, heads * hd)
        mat(f"blk.{i}.ffn_gate.weight", ffn, hidden)
        mat(f"blk.{i}.ffn_up.weight", ffn, hidden)
        mat(f"blk.{i}.ffn_down.weight", hidden, ffn)
        print(f"layer {i + 1}/{layers}", file=sys.stderr, flush=True)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    mat("output.weight", vocab, hidden)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)   # never leave a half-written file that looks complete


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama")
    ap.add_argument("--type", default="Q4_0", help="Q4_0, Q4_1, Q8_0 or F32 (what gguf.quants can write)")
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write(args.output, **PRESETS[args.preset], qtype=args.type, seed=args.seed)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
