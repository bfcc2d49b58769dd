"""ONNX Runtime GenAI's side of tools/bench_peers.py: the same model as the int4 ONNX model that ORT
GenAI's own model builder makes of it, measured with the `pocketinfer bench` protocol.

Runs under the python of its own venv (onnxruntime-genai, transformers, torch, onnx, onnx-ir, numpy,
gguf; `python tools/bench_peers.py --install-ortgenai` creates it) and never imports pocketinfer. The
measuring protocol and the JSON it prints are those of tools/peer_llamacpp.py (imported from there).

The model. ORT GenAI's builder reads Hugging Face checkpoints (its GGUF reader takes f16/f32 files
only), so `peer_ortgenai.py build --model M.gguf`:
1. loads the GGUF with transformers, dequantized to float32 (tools/peer_transformers.py's `load`), and
   writes it and its tokenizer as a Hugging Face directory (save_pretrained);
2. runs `python -m onnxruntime_genai.models.builder -i HF_DIR -o OUT -p int4 -e cpu
   --extra_options prune_lm_head=true hf_token=false`: the builder's default int4 for CPU (symmetric,
   blocks of 32, MatMulNBits at accuracy level 4, i.e. int8 activations), re-quantized from the
   dequantized GGUF weights; prune_lm_head makes prefill compute the last position's logits only, as
   the protocol asks of every side;
3. keeps the result in $POCKETINFER_HOME/ortgenai/<key> (POCKETINFER_HOME defaults to
   ~/.cache/pocketinfer), the key made of the GGUF's name, size and sha256 and the onnxruntime-genai
   version, so a second run does not rebuild. It is built in a temporary directory beside that one
   and renamed into place, so a cache entry is never half-written.
A measurement whose model is not in the cache runs `build` in a child process first, so the build's
memory does not count toward the measurement's ru_maxrss.

Threads: genai_config.json's model.decoder.session_options is where ORT GenAI takes the ONNX Runtime
session options from, and og.Config.overlay() patches that JSON in memory before og.Model creates the
session: `{"model": {"decoder": {"session_options": {"intra_op_num_threads": N,
"inter_op_num_threads": 1}}}}`. The cached model stays thread-neutral. "os_threads" in the JSON is
the process's thread count after loading (ONNX Runtime's intra-op pool is the calling thread and
N - 1 workers).

Prompt ids: PARAGRAPH tokenized without BOS by og.Tokenizer on the built model's tokenizer.json (which
transformers wrote from the GGUF's vocabulary); a leading BOS, if the tokenizer adds one, is dropped.
"prompt_digest" shows whether the ids equal pocketinfer's.

Measuring: reset() makes a new og.Generator (an empty KV cache, max_length prompt + generated tokens);
prefill(ids) is one append_tokens(ids), a single evaluation of the whole prompt, then get_logits();
step(tok) is append_tokens([tok]) then get_logits(). Greedy picking is numpy's argmax of those raw
logits (peer_llamacpp.measure), not ORT GenAI's search.

Exit status 3 with a one-line reason means "ORT GenAI can't run this here" (bench_peers skips it).

    python tools/peer_ortgenai.py build --model M.gguf          # build (or find) the ONNX model
    python tools/peer_ortgenai.py --model M.gguf --text-file paragraph.txt [--threads 2] ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")          # the GGUF is local: never reach the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

SKIP = 3
PRECISION = "int4"
BUILDER_OPTIONS = ["prune_lm_head=true", "hf_token=false"]
BUILD_INFO = "pocketinfer_build.json"   # written into each cache entry: how it was built, and how long it took
INSTALL_HINT = "python tools/bench_peers.py --install-ortgenai"


def skip(reason: str) -> int:
    print(f"ORT GenAI peer skipped: {reason}", file=sys.stderr)
    return SKIP


TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))
try:
    from peer_llamacpp import measure, parse_args, read_text, repeat_to, report, rss_mb
except ImportError as e:   # numpy missing: this is not the ORT GenAI venv
    sys.exit(skip(f"{e.name} is not installed ({INSTALL_HINT})"))


def cache_root() -> Path:
    home = os.environ.get("POCKETINFER_HOME")
    return (Path(home).expanduser() if home else Path.home() / ".cache" / "pocketinfer") / "ortgenai"


def file_sha256(path: Path) -> str:
    """Read in 1 MiB blocks, so hashing adds nothing to a measurement's peak RSS (hashlib.file_digest
    would do, but it is Python 3.11+ and the project supports 3.10)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_dir_for(gguf: Path, og_version: str) -> Path:
    """The cache entry of this GGUF's int4 ONNX model as built by this onnxruntime-genai version."""
    key = f"{gguf.stem}-{gguf.stat().st_size}-{file_sha256(gguf)[:16]}-og{og_version}-{PRECISION}"
    return cache_root() / key


def is_built(out: Path) -> bool:
    return (out / "genai_config.json").is_file() and (out / BUILD_INFO).is_file()


def build(gguf: Path, out: Path) -> dict:
    """Convert the GGUF to a Hugging Face directory, run ORT GenAI's builder on it and rename the result
    to `out`. Returns the build record (also written to out/BUILD_INFO)."""
    import torch
    import transformers

    from peer_transformers import load

    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        t0 = time.perf_counter()
        model, tokenizer, loader = load(str(gguf), torch)
        hf_dir = work / "hf"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        del model
        t1 = time.perf_counter()
        onnx_dir = work / "onnx"
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(onnx_dir),
               "-p", PRECISION, "-e", "cpu", "-c", str(work / "builder-cache"), "--extra_options", *BUILDER_OPTIONS]
        print(f"building: {' '.join(cmd)}", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
        if proc.returncode != 0:
            tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["no output"]
            raise RuntimeError(f"the model builder failed (exit {proc.returncode}): {tail[0]}")
        t2 = time.perf_counter()
        import onnxruntime_genai as og

        info = {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "onnxruntime_genai": og.__version__,
                "transformers": transformers.__version__, "torch": torch.__version__, "loader": loader,
                "builder_command": ["python", *cmd[1:]], "convert_s": round(t1 - t0, 1),
                "builder_s": round(t2 - t1, 1), "build_s": round(t2 - t0, 1)}
        (onnx_dir / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(onnx_dir, out)
        except OSError:
            if not is_built(out):      # another build that finished first is as good as this one
                raise
        return info
    finally:
        shutil.rmtree(work, ignore_errors=True)


def ensure_built(gguf: Path, og_version: str) -> Path:
    """The cached model directory, built first (in a child process) when missing."""
    out = cache_dir_for(gguf, og_version)
    if not is_built(out):
        proc = subprocess.run([sys.executable, __file__, "build", "--model", str(gguf)], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0 or not is_built(out):
            last = proc.stdout.strip().splitlines()[-1:]
            raise RuntimeError(last[0] if last else f"building the ONNX model failed (exit {proc.returncode})")
    return out


def build_skip(reason: str) -> int:
    print(reason)                   # stdout's last line: the model directory when built, else why not
    return skip(reason)


def build_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="peer_ortgenai.py build",
                                 description="build (or find) the int4 ONNX model of a GGUF in the cache")
    ap.add_argument("--model", required=True, help="GGUF file")
    args = ap.parse_args(argv)
    gguf = Path(args.model).resolve()
    if not gguf.is_file():
        ap.error(f"no such GGUF file: {args.model}")
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return build_skip(f"{e.name} is not installed ({INSTALL_HINT})")
    out = cache_dir_for(gguf, og.__version__)
    if not is_built(out):
        print(f"ORT GenAI: building the {PRECISION} ONNX model of {gguf.name} into {out} (once)", file=sys.stderr,
              flush=True)
        try:
            info = build(gguf, out)
        except Exception as e:  # an architecture the builder or transformers cannot take: say why, skip
            return build_skip(f"could not build an ONNX model of {gguf.name}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}")
        print(f"ORT GenAI: built in {info['build_s']:.0f} s (GGUF to HF {info['convert_s']:.0f} s, "
              f"builder {info['builder_s']:.0f} s)", file=sys.stderr)
    print(out)
    return 0


def os_threads() -> int:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))
    except (OSError, StopIteration):
        return 0


def prompt_ids(tokenizer, text: str, bos: int, n: int) -> list[int]:
    """PARAGRAPH's ids without BOS, repeated and cut to n (engine/measure/bench.py's rule)."""
    base = [int(i) for i in tokenizer.encode(text)]
    if base[:1] == [bos]:                   # a tokenizer that adds BOS on its own
        base = base[1:]
    return repeat_to(base, n)


def main() -> int:
    if sys.argv[1:2] == ["build"]:
        return build_main(sys.argv[2:])
    args = parse_args("ONNX Runtime GenAI (int4 CPU) side of tools/bench_peers.py")
    try:
        import numpy as np
        import onnxruntime_genai as og
    except ImportError as e:
        return skip(f"{e.name} is not installed ({INSTALL_HINT})")
    gguf = Path(args.model).resolve()
    if not gguf.is_file():
        raise SystemExit(f"no such GGUF file: {args.model}")
    try:
        model_dir = ensure_built(gguf, og.__version__)
    except RuntimeError as e:
        return skip(str(e))
    genai_config = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))
    bos = genai_config["model"].get("bos_token_id", -1)
    bos = bos[0] if isinstance(bos, list) else bos

    t0 = time.perf_counter()
    config = og.Config(str(model_dir))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": args.threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    tokenizer = og.Tokenizer(model)
    load_s = time.perf_counter() - t0
    rss_loaded = rss_mb()
    threads_after_load = os_threads()
    ids = prompt_ids(tokenizer, read_text(args.text_file), bos, args.prompt_tokens)
    max_length = args.prompt_tokens + args.gen_tokens
    state = {"gen": None}

    def reset() -> None:
        state["gen"] = None                     # free the old KV cache before allocating the new one
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=max_length, do_sample=False, batch_size=1)
        state["gen"] = og.Generator(model, params)

    def evaluate(toks: list[int]) -> np.ndarray:
        state["gen"].append_tokens(np.asarray(toks, dtype=np.int32))
        return np.asarray(state["gen"].get_logits()).reshape(-1)

    runs, tokens = measure(evaluate, lambda tok: evaluate([tok]), reset, ids, args.gen_tokens, args.repeats)
    info = json.loads((model_dir / BUILD_INFO).read_text(encoding="utf-8"))
    weight_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.name.startswith("model.onnx"))
    report(args, engine=f"ONNX Runtime GenAI {og.__version__} (its builder's int4 CPU model)",
           weight_bytes=weight_bytes, threads=args.threads, ids=ids, runs=runs, tokens=tokens,
           rss_loaded=rss_loaded, load_s=load_s, onnx_dir=str(model_dir), os_threads=threads_after_load,
           build_s=info.get("build_s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
