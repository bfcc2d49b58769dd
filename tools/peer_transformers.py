"""Hugging Face transformers' side of tools/bench_peers.py: the same GGUF, dequantized to float32 torch.

Runs with pocketinfer's python, where torch and transformers are installed as test extras, in its own
process; it never imports pocketinfer. The measuring protocol and the JSON it prints are those of
tools/peer_llamacpp.py (imported from there). Loading:

- `AutoModelForCausalLM.from_pretrained(dir, gguf_file=name, dtype=torch.float32)`, offline;
- transformers 5.x refuses that without the `accelerate` package ("accelerate is required when
  loading a GGUF file"). Then the same thing is done by hand with transformers' own pieces: the
  config from the GGUF, the model built from it, and the state dict from
  `transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint` (which dequantizes every tensor
  and undoes llama.cpp's Q/K row order). "loader" in the JSON says which path ran.

Exit status 3 with a one-line reason means "transformers can't run this here" (bench_peers skips it).

    python tools/peer_transformers.py --model M.gguf --text-file paragraph.txt [--threads 2] ...
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the GGUF is local: never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peer_llamacpp import measure, parse_args, read_text, repeat_to, report, rss_mb  # noqa: E402

SKIP = 3


def skip(reason: str) -> int:
    print(f"transformers peer skipped: {reason}", file=sys.stderr)
    return SKIP


def load(path: str, torch):
    """(model, tokenizer, loader description)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    directory, name = os.path.split(os.path.abspath(path))
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
        return model.eval(), tokenizer, "from_pretrained(gguf_file=...)"
    except ValueError as e:
        if "accelerate" not in str(e):
            raise
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = load_gguf_checkpoint(os.path.join(directory, name), return_tensors=True, model_to_load=model)["tensors"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    del state
    model.tie_weights()
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"GGUF tensors did not map onto the model: missing {sorted(set(missing) - tied)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}")
    return model.eval(), tokenizer, "from_config + load_gguf_checkpoint (accelerate not installed)"


def main() -> int:
    args = parse_args("transformers (torch fp32) side of tools/bench_peers.py")
    try:
        import torch
        import transformers
    except ImportError as e:
        return skip(f"{e.name} is not installed (pip install '.[test]')")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        model, tokenizer, loader = load(args.model, torch)
    except Exception as e:  # a version that cannot read this GGUF: say why, let bench_peers go on
        return skip(f"transformers {transformers.__version__} could not load {os.path.basename(args.model)}: "
                    f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    base = tokenizer(read_text(args.text_file), add_special_tokens=False)["input_ids"]
    ids = repeat_to(base, args.prompt_tokens)
    state = {"past": None}

    def forward(toks):
        out = model(input_ids=torch.tensor([toks], dtype=torch.long), past_key_values=state["past"],
                    use_cache=True, logits_to_keep=1)
        state["past"] = out.past_key_values
        return out.logits[0, -1].float().numpy()

    def reset() -> None:
        state["past"] = None

    with torch.inference_mode():
        runs, tokens = measure(forward, lambda tok: forward([tok]), reset, ids, args.gen_tokens, args.repeats)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    report(args, engine=f"transformers {transformers.__version__} (torch {torch.__version__}, fp32)",
           weight_bytes=weight_bytes, threads=torch.get_num_threads(), ids=ids, runs=runs, tokens=tokens,
           rss_loaded=rss_loaded, load_s=load_s, loader=loader)
    return 0


if __name__ == "__main__":
    sys.exit(main())
