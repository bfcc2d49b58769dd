"""The llama.cpp half of tools/compare_llamacpp.py.

This script runs under the python of a separate venv that has llama-cpp-python installed. It never
imports pocketinfer, and pocketinfer never imports llama_cpp. It needs only the standard library,
numpy and jinja2, which llama-cpp-python already depends on.

    python tools/llamacpp_side.py --model M.gguf --request req.json [--out res.json]

The request is JSON (read from --request, or from stdin when it is "-"):

    {"threads": 2,
     "tokenize": ["text", ...],
     "greedy": {"n_tokens": 32,
                "prompts": [{"name": "...", "ids": [...]} | {"name": "...", "text": "..."}
                            | {"name": "...", "messages": [{"role": ..., "content": ...}]}]},
     "perplexity": {"text_file": "path", "ctx": 512, "max_windows": null}}

Every section is optional. The answer is JSON on stdout (or in --out). What it computes:

- tokenize: for each string, `tokenize(s, add_bos=False, special=True)` and the same with the
  model's default add_bos, and the detokenized text of the former.
- greedy: the prompt ids (given, or tokenized from text, or rendered with the GGUF chat template),
  then n_tokens argmax steps computed here from the raw logits, with no sampler, penalty or
  stop token. Each step also records the 5 best token ids and their logits, so that a later
  disagreement can be told apart from a numerical near-tie.
- perplexity: the text tokenized with the model's default add_bos and cut into non-overlapping
  windows of ctx tokens (a trailing partial window is dropped). Each window is evaluated from an
  empty cache. "ppl" is exp of the mean NLL of predicting tokens 1..ctx-1 of every window from the
  tokens before them. "llamacpp_tool_ppl" is what llama.cpp's own `perplexity` tool reports on
  the same windows: it puts BOS in place of each window's first token when the model adds BOS,
  and it scores only the second half of each window (tokens ctx/2+1..ctx-1).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

# ---------------------------------------------------------------------------------------------
# model


def open_model(path: str, threads: int, n_ctx: int):
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_batch=n_ctx,  # a whole perplexity window in one decode, like llama-perplexity
        n_ubatch=n_ctx,
        n_threads=threads,
        n_threads_batch=threads,
        logits_all=True,  # scores[i] holds the logits after token i, for every evaluated token
        seed=0,
        verbose=False,
    )
    return llm


def model_info(llm) -> dict:
    import llama_cpp

    meta = dict(llm.metadata)
    return {
        "llama_cpp_python_version": llama_cpp.__version__,
        "n_vocab": int(llm.n_vocab()),
        "bos_id": int(llm.token_bos()),
        "eos_id": int(llm.token_eos()),
        "add_bos": default_add_bos(llm),
        "general.name": meta.get("general.name"),
        "tokenizer.ggml.pre": meta.get("tokenizer.ggml.pre"),
    }


def default_add_bos(llm) -> bool:
    # tokenize() with add_bos=True adds BOS only when the model asks for it (llama_vocab_get_add_bos)
    probe = llm.tokenize(b"a", add_bos=True, special=False)
    return len(probe) > 0 and probe[0] == llm.token_bos() and len(probe) > len(
        llm.tokenize(b"a", add_bos=False, special=False)
    )


def logits_after(llm, ids: list[int]) -> np.ndarray:
    """Evaluate ids from an empty cache; returns float32 logits (len(ids), vocab)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# the three computations


def tokenize_all(llm, texts: list[str]) -> list[dict]:
    out = []
    for s in texts:
        ids = llm.tokenize(s.encode("utf-8"), add_bos=False, special=True)
        ids_default = llm.tokenize(s.encode("utf-8"), add_bos=True, special=True)
        back = llm.detokenize(ids, special=True).decode("utf-8", errors="replace")
        out.append({"text": s, "ids": list(map(int, ids)), "ids_default": list(map(int, ids_default)),
                    "detokenized": back})
    return out


def render_chat(llm, messages: list[dict]) -> str:
    """The GGUF's own chat template (tokenizer.chat_template), with the generation prompt."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise SystemExit("the model has no tokenizer.chat_template")

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    bos = llm.detokenize([llm.token_bos()], special=True).decode("utf-8", errors="replace")
    eos = llm.detokenize([llm.token_eos()], special=True).decode("utf-8", errors="replace")
    return env.from_string(template).render(messages=messages, add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)


def prompt_ids(llm, prompt: dict) -> tuple[list[int], str | None]:
    if "ids" in prompt:
        return list(map(int, prompt["ids"])), None
    text = prompt["text"] if "text" in prompt else render_chat(llm, prompt["messages"])
    # the text as pocketinfer's tokenizer.encode sees it: special tokens recognized, default BOS
    return list(map(int, llm.tokenize(text.encode("utf-8"), add_bos=True, special=True))), text


def greedy(llm, ids: list[int], n_tokens: int, top: int = 5) -> dict:
    """n_tokens argmax steps; at each step also the `top` best ids and their logits, best first."""
    llm.reset()
    llm.eval(ids)
    tokens, top_ids, top_logits = [], [], []
    for _ in range(n_tokens):
        row = np.asarray(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        best = int(np.argmax(row))
        order = np.argsort(-row, kind="stable")[:top]
        tokens.append(best)
        top_ids.append([int(i) for i in order])
        top_logits.append([round(float(row[i]), 4) for i in order])
        llm.eval([best])
    return {"tokens": tokens, "top_ids": top_ids, "top_logits": top_logits}


def nll_of_targets(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits[i])[targets[i]] for each row, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return lse - x[np.arange(len(targets)), targets]


def perplexity(llm, text: str, ctx: int, max_windows: int | None) -> dict:
    add_bos = default_add_bos(llm)
    bos = llm.token_bos()
    tokens = np.array(llm.tokenize(text.encode("utf-8"), add_bos=True, special=True), dtype=np.int64)
    # pocketinfer's convention (engine/measure/perplexity.py): a model that wants BOS gets it as the first
    # token of every window, in place of the stream's token there; the stream's own leading BOS is dropped
    stream = tokens[1:] if add_bos and len(tokens) and tokens[0] == bos else tokens
    n_windows = len(stream) // ctx
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise SystemExit(f"the text has {len(tokens)} tokens, fewer than one window of {ctx}")
    first = ctx // 2
    window_nll, tool_nll_sum, t0 = [], 0.0, time.perf_counter()
    for w in range(n_windows):
        window = stream[w * ctx:(w + 1) * ctx].copy()
        if add_bos:
            window[0] = bos
        logits = logits_after(llm, window.tolist())
        nll = nll_of_targets(logits[:-1], window[1:])
        window_nll.append(float(nll.mean()))
        # llama.cpp's perplexity tool scores the second half of the same windows
        tool_nll_sum += float(nll[first:].sum())
    seconds = time.perf_counter() - t0
    mean_nll = float(np.mean(window_nll))  # every window scores ctx-1 tokens: plain mean is exact
    tool_count = n_windows * (ctx - 1 - first)
    return {
        "ctx": ctx,
        "n_text_tokens": int(len(tokens)),
        "n_windows": n_windows,
        "window_mean_nll": window_nll,
        "mean_nll": mean_nll,
        "ppl": float(np.exp(mean_nll)),
        "llamacpp_tool_ppl": float(np.exp(tool_nll_sum / tool_count)),
        "seconds": seconds,
        "tokens": tokens.tolist(),
    }


# ---------------------------------------------------------------------------------------------
# main


def run(model: str, request: dict) -> dict:
    threads = int(request.get("threads", 2))
    ppl_req = request.get("perplexity")
    n_ctx = max(512, int(ppl_req.get("ctx", 512)) if ppl_req else 0)
    llm = open_model(model, threads, n_ctx)
    result = {"model_info": model_info(llm), "threads": threads}
    if request.get("tokenize") is not None:
        result["tokenize"] = tokenize_all(llm, request["tokenize"])
    if request.get("greedy"):
        n = int(request["greedy"].get("n_tokens", 32))
        rows = []
        for p in request["greedy"]["prompts"]:
            if "messages" in p and not llm.metadata.get("tokenizer.chat_template"):
                print(f"prompt {p.get('name')!r} skipped: the model has no tokenizer.chat_template", file=sys.stderr)
                continue
            ids, text = prompt_ids(llm, p)
            if len(ids) + n > n_ctx:
                raise SystemExit(f"prompt {p.get('name')!r}: {len(ids)} + {n} tokens exceed n_ctx {n_ctx}")
            row = {"name": p.get("name"), "prompt_ids": ids, **greedy(llm, ids, n)}
            row["text"] = llm.detokenize(row["tokens"], special=True).decode("utf-8", errors="replace")
            if text is not None:
                row["prompt_text"] = text
            rows.append(row)
        result["greedy"] = {"n_tokens": n, "prompts": rows}
    if ppl_req:
        with open(ppl_req["text_file"], encoding="utf-8") as f:
            text = f.read()
        result["perplexity"] = perplexity(llm, text, int(ppl_req.get("ctx", 512)), ppl_req.get("max_windows"))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="GGUF file")
    ap.add_argument("--request", default="-", help="request JSON file, or - for stdin")
    ap.add_argument("--out", default="-", help="result JSON file, or - for stdout")
    args = ap.parse_args(argv)
    if args.request == "-":
        request = json.load(sys.stdin)
    else:
        with open(args.request, encoding="utf-8") as f:
            request = json.load(f)
    result = run(args.model, request)
    text = json.dumps(result, ensure_ascii=False)
    if args.out == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
