"""Write tests/data/tok_smollm2_llamacpp.json and tok_stories260k_llamacpp.json: llama.cpp's token ids.

Run from the project root with the test venv (gguf, tokenizers) and point it at a Python that has
llama-cpp-python (it is only run in a subprocess, so the two need not share a venv):

    python tests/data/tok_make_llamacpp_fixture.py --llamacpp-python /work/venv-llamacpp/bin/python \
        [--smollm2 path/to/SmolLM2-135M-Instruct.Q4_1.gguf]

Each variant's metadata (see smollm2_variant / stories_variant in tests/test_gguf_tokenizer.py) is
written as a vocab-only GGUF, loaded with Llama(path, vocab_only=True), and every string is tokenized
with tokenize(text.encode(), add_bos=True, special=True) -> "ids" and add_bos=False -> "ids_plain".
(add_bos=True means "add the special tokens the vocab asks for", llama.cpp's add_special.)
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from test_gguf_tokenizer import (  # noqa: E402
    SMOLLM2_VARIANTS,
    STORIES,
    STORIES_VARIANTS,
    gguf_meta,
    smollm2_path,
    smollm2_variant,
    stories_meta,
    stories_variant,
    write_vocab_gguf,
)

NAMED = [
    "12345", "3.14159", "1,000,000", "café naïve", "👍🏽 🎉", "你好，世界", "日本語",
    "a  b   c\n\n\t x", "  leading spaces", "trailing spaces   ", " ", "", "Hello world",
    "<|im_start|>user\nhi<|im_end|>", "<|endoftext|><|im_start|>", "def f(x):\n    return x**2",
    "I'm here, you're there; THEY'LL've", "x\u00a0y\u2003z", "\r\n\r\n", "ÀÉÎõü",
    "The year 2024: ٣٤٥ and ½ ²", "emoji 🧑\u200d🤝\u200d🧑 zwj", "tabs\t\tand\u000bvt", "?!...---",
    "https://example.com/a_b?c=1&d=2", "<s>hi</s> there", "hi<unk>x",
    "Once upon a time, there was a little girl named Lily.",
]
# pieces that stress pre-tokenizer regexes, byte fallback and special-token matching
PIECES = ["a", "Z", "é", "ß", "ı", "İ", "0", "7", "٣", "½", "²", " ", "  ", "\n", "\t", "\r", "\u00a0",
          "\u3000", "'s", "'T", "'LL", ".", ",", "!", "?", "-", "_", "$", "+", "<", ">", "|", "~", "^", "`",
          "你", "好", "日", "ア", "한", "👍", "🏽", "🎉", "\u200d", "\u0301", "\u064b", "€", "©", "™",
          "<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>", "\x7f", "\ufeff", "𝔘", "Ω", "ǅ"]
SEED, N_RANDOM = 0, 120

LLAMACPP_SNIPPET = """
import json, sys
import llama_cpp
job = json.load(sys.stdin)
llm = llama_cpp.Llama(model_path=job["gguf"], vocab_only=True, verbose=False)
cases = [{"text": s, "ids": llm.tokenize(s.encode(), add_bos=True, special=True),
          "ids_plain": llm.tokenize(s.encode(), add_bos=False, special=True)} for s in job["strings"]]
json.dump({"version": llama_cpp.__version__, "cases": cases}, sys.stdout)
"""


def llamacpp_ids(python: str, meta: dict, strings: list[str], tmp: Path) -> tuple[str, list[dict]]:
    path = tmp / "vocab.gguf"
    write_vocab_gguf(path, meta)
    run = subprocess.run([python, "-c", LLAMACPP_SNIPPET], input=json.dumps({"gguf": str(path), "strings": strings}),
                         capture_output=True, text=True, check=True)
    out = json.loads(run.stdout)
    return out["version"], out["cases"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llamacpp-python", required=True, help="a Python interpreter with llama-cpp-python")
    ap.add_argument("--smollm2", type=Path, default=None, help="SmolLM2-135M-Instruct.Q4_1.gguf")
    args = ap.parse_args()
    rng = random.Random(SEED)
    strings = NAMED + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 12))) for _ in range(N_RANDOM)]
    how = (f"tests/data/tok_make_llamacpp_fixture.py: strings = NAMED + {N_RANDOM} random joins of PIECES "
           f"(random.Random({SEED})); each variant written as a vocab-only GGUF and tokenized by llama-cpp-python "
           "Llama(path, vocab_only=True).tokenize(text.encode(), add_bos=True|False, special=True)")
    smollm2 = args.smollm2 or smollm2_path()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jobs = [("tok_smollm2_llamacpp.json", smollm2.name, gguf_meta(smollm2), smollm2_variant, SMOLLM2_VARIANTS),
                ("tok_stories260k_llamacpp.json", "stories260K tokenizer.json", stories_meta(STORIES),
                 stories_variant, STORIES_VARIANTS)]
        for out_name, source, meta, variant_of, variants in jobs:
            meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.ggml.")}
            fixture = {"produced_by": how, "source": source, "strings": strings, "variants": {}}
            for name in variants:
                fixture["llama_cpp_python_version"], fixture["variants"][name] = llamacpp_ids(
                    args.llamacpp_python, variant_of(meta, name), strings, tmp)
            text = json.dumps(fixture, ensure_ascii=False, separators=(",", ":")) + "\n"
            (Path(__file__).parent / out_name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
