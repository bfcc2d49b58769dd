"""Side-by-side comparison of pocketinfer with llama.cpp (llama-cpp-python) on one GGUF model.

llama-cpp-python lives in its own venv and runs in a subprocess (tools/llamacpp_side.py); it is
never a pocketinfer dependency. Both sides get identical inputs, and the tool compares:

- tokenization of tricky strings (special tokens recognized, the model's default BOS);
- 32 greedy tokens for a few prompts, from the same prompt ids, argmax of the raw logits;
- perplexity on tests/data/ppl_text.txt: non-overlapping windows of --ctx tokens, BOS first in each
  when the model adds BOS, the mean NLL of predicting tokens 1..ctx-1 of each window (llama.cpp's own
  tool convention is shown beside it).

Usage (from the repo root, with pocketinfer's python):

    python tools/compare_llamacpp.py --install              # create .venv-llamacpp (builds, minutes)
    python tools/compare_llamacpp.py                        # compare; exit 1 on a mismatch
    python tools/compare_llamacpp.py --llamacpp-only --write-fixture   # refresh the golden file
    python tools/compare_llamacpp.py --from-fixture         # pocketinfer vs the golden file only

The venv is --llamacpp-venv, else $POCKETINFER_LLAMACPP_VENV, else .venv-llamacpp in the repo.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIXTURE = REPO / "tests" / "data" / "smollm2_llamacpp_golden.json"
PPL_TEXT = REPO / "tests" / "data" / "ppl_text.txt"
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_VENV = REPO / ".venv-llamacpp"
SIDE_SCRIPT = REPO / "tools" / "llamacpp_side.py"

# Strings whose tokenization is easy to get wrong: the smollm pre-tokenizer splits digits one by
# one, byte-level BPE must round-trip any UTF-8, and ChatML (SmolLM2) and turn markers (Gemma) are
# special tokens.
TOKENIZE_CASES = [
    "",
    "Hello world",
    " Hello world",
    "12345 3.14159 1,000,000",
    "Café naïve résumé — Ångström, Straße, œuvre",
    "👍🏽🎉 emoji: 🇫🇷 👩‍👩‍👧",
    "日本語のテキストと中文文本，한국어도。",
    "tabs\tand   spaces    \n\n\n  newlines\r\n end  ",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 40))",
    "for (int i = 0; i < n; ++i) { x[i] *= 2; }",
    "https://example.com/path?q=1&r=two#frag",
    "I'm sure they'll say it's 'quoted' and \"double-quoted\".",
    "ALL CAPS and MiXeD cAsE wordsss",
    # Gemma's turn markers (special there, plain text elsewhere); SentencePiece's byte fallback
    "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n",
    "\u00a0non-breaking\u2003spaces\u200b and a zero-width one",
    "  leading spaces, and a trailing one ",
]

GREEDY_PROMPTS = [
    {"name": "sentence", "text": "The capital of France is"},
    {"name": "story", "text": "Once upon a time, in a small village by the sea,"},
    {"name": "chat", "messages": [{"role": "user", "content": "What is the boiling point of water?"}]},
    {"name": "code", "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
    {"name": "list", "text": "Here is a list of five fruits:\n1."},
]

N_GREEDY = 32

# llama.cpp rounds activations to 8 bits inside its quantized matmuls. Its logits sit ~0.1 (std;
# p99 0.3, max 1.5) from an exact float32 pass over the same dequantized weights, and its argmax
# differs from that pass at ~3.5% of positions. Emulating the rounding does not remove this: the
# rounding amplifies float-level differences (even a change of BLAS thread count) to the same size.
# So a greedy disagreement where llama.cpp's own choice leads ours by less than TIE_MARGIN logits is
# a near-tie, not a bug (the largest lead seen at a disagreement so far: 0.33).
TIE_MARGIN = 0.5
PPL_TOL = 0.01  # relative


# ---------------------------------------------------------------------------------------------
# the llama.cpp side (subprocess)


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_venv(venv: Path, version: str | None) -> None:
    """Create or update the llama.cpp venv. pip builds llama-cpp-python from source (minutes)."""
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--upgrade", spec], check=True)


def run_llamacpp(venv: Path, model: Path, request: dict) -> dict:
    py = venv_python(venv)
    if not py.exists():
        raise SystemExit(f"no llama.cpp venv at {venv}: run with --install, or give --llamacpp-venv")
    with tempfile.TemporaryDirectory() as tmp:
        req, out = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request, ensure_ascii=False), encoding="utf-8")
        cmd = [str(py), str(SIDE_SCRIPT), "--model", str(model), "--request", str(req), "--out", str(out)]
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise SystemExit(f"llama.cpp side failed ({proc.returncode}): {shlex.join(cmd)}")
        return json.loads(out.read_text(encoding="utf-8"))


def build_request(threads: int, ctx: int, max_windows: int | None) -> dict:
    return {
        "threads": threads,
        "tokenize": TOKENIZE_CASES,
        "greedy": {"n_tokens": N_GREEDY, "prompts": GREEDY_PROMPTS},
        "perplexity": {"text_file": str(PPL_TEXT), "ctx": ctx, "max_windows": max_windows},
    }


# ---------------------------------------------------------------------------------------------
# model and fixture


def import_from_repo() -> None:
    """Make `import engine` work from a source checkout (an installed pocketinfer comes first)."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))


def resolve_model(source: str) -> Path:
    """A GGUF path as given, or a registry alias resolved (and fetched on first use) by pocketinfer."""
    import_from_repo()
    from engine.formats import registry

    path = registry.resolve(source)
    if not path.is_file():
        raise SystemExit(f"{source} resolved to {path}, which is not a GGUF file")
    return path.resolve()


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_fixture(result: dict, model_source: str, model: Path, argv: list[str]) -> None:
    fixture = {
        "about": "llama.cpp's outputs for SmolLM2-135M-Instruct Q4_1, written by tools/compare_llamacpp.py",
        "generated": {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join(["python", "tools/compare_llamacpp.py", *argv]),
            "llama_cpp_python_version": result["model_info"]["llama_cpp_python_version"],
            "threads": result["threads"],
        },
        "model": {"source": model_source, "file": model.name, "bytes": model.stat().st_size,
                  "sha256": sha256_of(model)},
        "ppl_text_sha256": hashlib.sha256(PPL_TEXT.read_bytes()).hexdigest(),
        "perplexity_convention": (
            "text tokenized with the model's default BOS; non-overlapping windows of ctx tokens "
            "(trailing partial window dropped), each from an empty cache, and when the model adds BOS "
            "the stream's leading BOS dropped and BOS put in place of every window's first token; "
            "ppl = exp(mean NLL of predicting tokens 1..ctx-1 of every window). llamacpp_tool_ppl = "
            "llama-perplexity's convention on the same windows (only tokens ctx/2+1..ctx-1 scored)."
        ),
        **{k: result[k] for k in ("model_info", "tokenize", "greedy", "perplexity")},
    }
    FIXTURE.write_text(json.dumps(fixture, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {FIXTURE.relative_to(REPO)}")


# ---------------------------------------------------------------------------------------------
# the pocketinfer side (in process)


def pocketinfer_side(model: Path, ref: dict, threads: int, ctx: int, max_windows: int | None,
                     tie_margin: float) -> dict:
    import_from_repo()
    import engine
    from engine.measure.perplexity import perplexity

    t0 = time.perf_counter()
    llm = engine.load(str(model), threads=threads)
    ours = {"load_seconds": time.perf_counter() - t0}
    ours["tokenize"] = [llm.tokenizer.encode(c["text"]) for c in ref["tokenize"]]
    ours["decode"] = [llm.tokenizer.decode(c["ids"]) for c in ref["tokenize"]]
    ours["prompt_ids"] = {p["name"]: llm.tokenizer.encode(p["prompt_text"])
                          for p in ref["greedy"]["prompts"] if "prompt_text" in p}
    ours["greedy"], ours["teacher_forced"] = [], []
    for p in ref["greedy"]["prompts"]:
        resp = llm.generate(p["prompt_ids"], max_tokens=ref["greedy"]["n_tokens"], temperature=0.0)
        ours["greedy"].append(list(map(int, resp.tokens)))
        ours["teacher_forced"].append(teacher_forced_check(llm.logits, p, tie_margin))
    tokens = llm.tokenizer.encode(PPL_TEXT.read_text(encoding="utf-8"))
    ours["ppl_tokens_equal"] = tokens == ref["perplexity"]["tokens"]
    t0 = time.perf_counter()
    result = perplexity(llm, tokens, ctx, max_windows)
    ours["ppl_seconds"] = time.perf_counter() - t0
    ours["ppl"], ours["ppl_windows"] = result.ppl, result.windows
    return ours


def cli_perplexity(model: Path, threads: int, ctx: int, max_windows: int | None) -> float | None:
    """The same perplexity through `pocketinfer perplexity --json`; None (and a note) if it fails."""
    cmd = [sys.executable, "-m", "engine", "perplexity", "-m", str(model), "-f", str(PPL_TEXT),
           "--ctx", str(ctx), "-t", str(threads), "--json"]
    if max_windows is not None:
        cmd += ["--windows", str(max_windows)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"  (pocketinfer perplexity CLI failed: {proc.stderr.strip().splitlines()[-1:]})")
        return None
    return float(json.loads(proc.stdout)["ppl"])


# ---------------------------------------------------------------------------------------------
# checks and report


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def llamacpp_gap(prompt: dict, k: int, token: int) -> float | None:
    """llama.cpp's logit lead of its own step-k token over `token`; None when `token` is not in its top 5."""
    ids, logits = prompt["top_ids"][k], prompt["top_logits"][k]
    return logits[0] - logits[ids.index(token)] if token in ids else None


def greedy_check(prompt: dict, got: list[int], tie_margin: float) -> tuple[int, str | None]:
    """Where free-running greedy tokens first leave llama.cpp's, and why that is wrong (None if it's not).

    Leaving is accepted only at a near-tie: llama.cpp's own token leads ours by less than tie_margin.
    """
    n = len(prompt["tokens"])
    k = first_divergence(prompt["tokens"], got)
    if k >= n:
        return n, None
    if k >= len(got):
        return k, f"only {len(got)} of {n} tokens generated"
    gap = llamacpp_gap(prompt, k, got[k])
    if gap is not None and gap < tie_margin:
        return k, None
    lead = "not in its top 5" if gap is None else f"{gap:.3f} logits behind"
    return k, f"step {k}: llama.cpp {prompt['tokens'][k]}, ours {got[k]} ({lead})"


def teacher_forced_check(logits_fn, prompt: dict, tie_margin: float) -> tuple[int, list[str]]:
    """Feed the prompt plus llama.cpp's tokens; at every step our argmax must be llama.cpp's token,
    unless the two are within tie_margin in llama.cpp's logits. Checks all steps, even past a tie.
    Returns the number of steps with the same argmax, and the wrong steps."""
    n0 = len(prompt["prompt_ids"])
    logits = np.asarray(logits_fn(prompt["prompt_ids"] + prompt["tokens"]))[n0 - 1:-1]
    equal, problems = 0, []
    for k, row in enumerate(logits):
        ours, theirs = int(np.argmax(row)), prompt["tokens"][k]
        gap = llamacpp_gap(prompt, k, ours)
        equal += ours == theirs
        if ours != theirs and (gap is None or gap >= tie_margin):
            lead = "not in its top 5" if gap is None else f"{gap:.3f} logits behind"
            problems.append(f"step {k}: llama.cpp {theirs}, ours {ours} ({lead})")
    return equal, problems


def window_ppl(ref_perplexity: dict, windows: int) -> float:
    """llama.cpp's perplexity over its first `windows` windows (each scores ctx-1 tokens)."""
    return float(np.exp(np.mean(ref_perplexity["window_mean_nll"][:windows])))


def report(ref: dict, ours: dict, tie_margin: float, ppl_tol: float, max_windows: int | None,
           cli_ppl: float | None) -> bool:
    ok = True
    print("\n== tokenization (model default BOS, special tokens recognized)")
    for case, got, dec in zip(ref["tokenize"], ours["tokenize"], ours["decode"]):
        same = got == case["ids_default"]
        ok &= same
        rt = "" if dec == case["text"] else "  decode(ids) != text"
        print(f"  {'ok  ' if same else 'DIFF'} {len(case['ids_default']):3d} ids  {case['text'][:50]!r}{rt}")
        if not same:
            print(f"       llama.cpp {case['ids_default']}\n       ours      {got}")
    for name, ids in ours["prompt_ids"].items():
        p = next(p for p in ref["greedy"]["prompts"] if p["name"] == name)
        if ids != p["prompt_ids"]:
            ok = False
            print(f"  DIFF prompt {name!r}: ours {ids} vs llama.cpp {p['prompt_ids']}")

    n = ref["greedy"]["n_tokens"]
    print(f"\n== greedy, {n} tokens from identical prompt ids (near-tie: llama.cpp's lead < {tie_margin})")
    for p, got, forced in zip(ref["greedy"]["prompts"], ours["greedy"], ours["teacher_forced"]):
        k, problem = greedy_check(p, got, tie_margin)
        forced_equal, forced = forced
        ok &= problem is None and not forced
        if k >= n:
            verdict = "ok  "
        else:
            verdict = "tie " if problem is None else "DIFF"
        print(f"  {verdict} {p['name']:10s} equal for {k}/{n} steps", end="")
        if k < n and problem is None:
            gap = llamacpp_gap(p, k, got[k])
            print(f"; then a near-tie (llama.cpp {p['tokens'][k]} leads ours {got[k]} by {gap:.3f})", end="")
        print(f"; teacher-forced argmax equal at {forced_equal}/{n} steps, {len(forced)} wrong")
        for line in ([problem] if problem else []) + forced:
            print(f"       {line}")

    ppl = ref["perplexity"]
    w, our_ppl = ours["ppl_windows"], ours["ppl"]
    ref_ppl = window_ppl(ppl, w)
    rel = our_ppl / ref_ppl - 1.0
    ok &= abs(rel) <= ppl_tol and ours["ppl_tokens_equal"]
    print(f"\n== perplexity, ctx {ppl['ctx']}, {w} of {ppl['n_windows']} windows, tokens 1..ctx-1 scored")
    print(f"  text tokenization equal: {ours['ppl_tokens_equal']} ({ppl['n_text_tokens']} tokens)")
    print(f"  llama.cpp   {ref_ppl:.4f}   (llama-perplexity's own convention, all windows: "
          f"{ppl['llamacpp_tool_ppl']:.4f})")
    print(f"  pocketinfer {our_ppl:.4f}   relative difference {rel:+.3%} (tolerance {ppl_tol:.1%}); "
          f"{ours['ppl_seconds']:.1f} s")
    if cli_ppl is not None:
        print(f"  pocketinfer perplexity CLI: {cli_ppl:.4f}")
    print("\n" + ("MATCH" if ok else "MISMATCH"))
    return ok


def print_llamacpp(ref: dict) -> None:
    info = ref["model_info"]
    print(f"llama-cpp-python {info['llama_cpp_python_version']}, add_bos={info['add_bos']}, "
          f"pre={info['tokenizer.ggml.pre']}")
    for p in ref["greedy"]["prompts"]:
        gaps = [lg[0] - lg[1] for lg in p["top_logits"]]
        print(f"  greedy {p['name']:10s} smallest top-2 gap {min(gaps):.3f}  {p['text'][:60]!r}")
    ppl = ref["perplexity"]
    print(f"  perplexity ctx {ppl['ctx']} x {ppl['n_windows']} windows: {ppl['ppl']:.4f} "
          f"(llama-perplexity convention {ppl['llamacpp_tool_ppl']:.4f}) in {ppl['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description="Compare pocketinfer with llama.cpp on one GGUF model.")
    ap.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path or registry alias")
    ap.add_argument("--llamacpp-venv", type=Path,
                    default=Path(os.environ.get("POCKETINFER_LLAMACPP_VENV", DEFAULT_VENV)))
    ap.add_argument("--install", action="store_true", help="create/update the llama.cpp venv first")
    ap.add_argument("--llamacpp-version", help="pin llama-cpp-python for --install")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-windows", type=int, help="perplexity on the first N windows only")
    ap.add_argument("--llamacpp-only", action="store_true", help="skip pocketinfer's side")
    ap.add_argument("--from-fixture", action="store_true",
                    help="take llama.cpp's side from the golden file instead of running it")
    ap.add_argument("--write-fixture", action="store_true", help=f"write {FIXTURE.relative_to(REPO)}")
    ap.add_argument("--cli", action="store_true", help="also run `pocketinfer perplexity --json`")
    ap.add_argument("--tie-margin", type=float, default=TIE_MARGIN,
                    help="a greedy divergence where llama.cpp's top-2 logit gap is below this is a near-tie")
    ap.add_argument("--ppl-tol", type=float, default=PPL_TOL, help="relative perplexity tolerance")
    args = ap.parse_args(argv)

    if args.install:
        install_venv(args.llamacpp_venv, args.llamacpp_version)
    model = resolve_model(args.model)
    print(f"model {model}")
    if args.from_fixture:
        ref = json.loads(FIXTURE.read_text(encoding="utf-8"))
        print(f"llama.cpp side from {FIXTURE.relative_to(REPO)} ({ref['generated']['date']})")
    else:
        t0 = time.perf_counter()
        ref = run_llamacpp(args.llamacpp_venv, model, build_request(args.threads, args.ctx, args.max_windows))
        print(f"llama.cpp side: {time.perf_counter() - t0:.1f} s")
        if args.write_fixture:
            write_fixture(ref, args.model, model, argv)
    print_llamacpp(ref)
    if args.llamacpp_only:
        return 0
    ours = pocketinfer_side(model, ref, args.threads, args.ctx, args.max_windows, args.tie_margin)
    print(f"pocketinfer: load {ours['load_seconds']:.1f} s")
    cli_ppl = cli_perplexity(model, args.threads, args.ctx, args.max_windows) if args.cli else None
    return 0 if report(ref, ours, args.tie_margin, args.ppl_tol, args.max_windows, cli_ppl) else 1


if __name__ == "__main__":
    sys.exit(main())
