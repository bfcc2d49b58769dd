"""Side-by-side speed of pocketinfer and its peers on one GGUF model: decode and prefill tok/s, time to
first token and peak memory, with the ratios pocketinfer / peer.

Peers: llama.cpp through llama-cpp-python (tools/peer_llamacpp.py, run by the python of its own venv);
with --transformers, Hugging Face transformers on torch fp32 (tools/peer_transformers.py, run by this
python); with --ortgenai, ONNX Runtime GenAI on the int4 ONNX model its own builder makes of the GGUF
(tools/peer_ortgenai.py, run by the python of its own venv; built once before the rounds and cached).
Every measurement is a fresh process: `python -m engine bench --json` for pocketinfer and the peer
scripts for the others, all on the same model file with the same threads,
the same prompt ids (engine.measure.bench.PARAGRAPH repeated; each side prints a digest of its ids) and the
same token counts. Rounds alternate the sides (A B A B ...); the tables show the median over rounds.

    python tools/bench_peers.py                                  # default model, 2 threads, 3 rounds
    python tools/bench_peers.py --prompt-tokens 32 --gen-tokens 16 --rounds 1   # a quick check
    python tools/bench_peers.py --transformers --write           # add HF transformers, update BENCHMARKS.md
    python tools/bench_peers.py --install-llamacpp               # create the llama.cpp venv (builds, minutes)
    python tools/bench_peers.py --ortgenai --install-ortgenai    # create the ORT GenAI venv, add that peer
    git worktree add ../before REV && python tools/bench_peers.py --no-llamacpp --baseline ../before
                                                                 # this checkout against commit REV
    python tools/bench_peers.py --prefill int8,f32               # also pocketinfer with its f32 prefill

The llama.cpp venv is --llamacpp-venv, else $POCKETINFER_LLAMACPP_VENV, else .venv-llamacpp in the
repo; the ORT GenAI venv is --ortgenai-venv, else $POCKETINFER_ORTGENAI_VENV, else .venv-ortgenai.
Run it on an otherwise idle machine: on a busy one, multi-threaded decode waits for
descheduled threads and every figure (pocketinfer's and the peers') falls apart.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOOLS = REPO / "tools"
BENCH_MD = REPO / "BENCHMARKS.md"
DEFAULT_MODEL = "smollm2-135m-instruct"
SKIP_EXIT = 3   # a peer's "cannot run here" (tools/peer_transformers.py, tools/peer_ortgenai.py)
ORTGENAI = "ORT GenAI"
# The ORT GenAI venv: torch is pinned and installed alone first so that nothing after it pulls another
# torch; transformers (with gguf) turns the GGUF into the Hugging Face checkpoint the model builder reads,
# and the builder needs torch, onnx and onnx-ir besides onnxruntime-genai itself.
ORTGENAI_TORCH = "torch==2.13.0"
ORTGENAI_PACKAGES = ["transformers", "gguf", "onnx", "onnx-ir", "onnxruntime-genai", "numpy"]

BASE = "pocketinfer"
# (JSON key, label, scale, decimals)
METRICS = [
    ("decode_tps", "decode tok/s", 1.0, 1),
    ("prefill_tps", "prefill tok/s", 1.0, 1),
    ("ttft_s", "TTFT ms", 1000.0, 1),
    ("peak_rss_mb", "peak RSS MiB", 1.0, 0),
    ("rss_loaded_mb", "RSS after load MiB", 1.0, 0),
]

HEADER = """# Benchmarks

pocketinfer beside its peers, written by `python tools/bench_peers.py --write` (one section per model,
thread count and token counts; a new run replaces its section). Each side runs in its own process on
the same GGUF file, with the same threads, the same prompt token ids and the same token counts, after an
untimed warm-up; rounds alternate the sides and the tables give the median (min–max) over rounds. The
protocol is in `engine/measure/bench.py`: prefill is one evaluation of the whole prompt, TTFT is prefill plus
picking the first token, decode is the remaining tokens one at a time, greedy, end-of-sequence ignored.
Peak RSS is the process's high-water mark, loading included; "RSS after load" is what stays resident.

These numbers come from a shared, noisy machine. Read the ratios pocketinfer / peer, measured side by
side in the same minutes, rather than the absolute figures.
"""


# ---------------------------------------------------------------------------------------------
# pure helpers (tested in tests/test_bench.py)


def median_range(values: list[float]) -> tuple[float, float, float]:
    """(median, min, max)."""
    if not values:
        raise ValueError("no values")
    return statistics.median(values), min(values), max(values)


def summarize(results: dict[str, list[dict]]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per side and metric, (median, min, max) over the rounds' results."""
    return {side: {key: median_range([r[key] for r in rounds]) for key, *_ in METRICS if all(key in r for r in rounds)}
            for side, rounds in results.items() if rounds}


def ratios(summary: dict, base: str = BASE) -> dict[str, dict[str, float]]:
    """pocketinfer / peer of the medians, per peer and metric (nan where the peer's median is 0)."""
    out = {}
    for side, metrics in summary.items():
        if side == base:
            continue
        out[side] = {key: (summary[base][key][0] / m[0] if m[0] else float("nan"))
                     for key, m in metrics.items() if key in summary[base]}
    return out


def _cell(m: tuple[float, float, float], scale: float, decimals: int) -> str:
    med, lo, hi = (v * scale for v in m)
    def f(v):
        return f"{v:.{decimals}f}"

    return f(med) if lo == hi else f"{f(med)} ({f(lo)}–{f(hi)})"


def markdown_table(summary: dict, base: str = BASE) -> str:
    """One row per metric: pocketinfer, then each peer with the ratio pocketinfer / peer beside it."""
    peers = [s for s in summary if s != base]
    rat = ratios(summary, base)
    head = ["metric", base]
    for p in peers:
        head += [p, f"{base} / {p}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, scale, decimals in METRICS:
        if key not in summary.get(base, {}):
            continue
        row = [label, _cell(summary[base][key], scale, decimals)]
        for p in peers:
            if key in summary[p]:
                row += [_cell(summary[p][key], scale, decimals), f"{rat[p][key]:.2f}"]
            else:
                row += ["–", "–"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


RATIO_NOTE = ("Ratios are pocketinfer / peer: above 1 means pocketinfer is faster for tok/s; below 1 means it "
              "is faster for TTFT and smaller for RSS.")


def section_key(model: str, threads: int, prompt_tokens: int, gen_tokens: int) -> str:
    return f"{model} threads={threads} prompt={prompt_tokens} gen={gen_tokens}"


def render_section(key: str, title: str, facts: list[tuple[str, str]], table: str, notes: list[str]) -> str:
    lines = [f"<!-- bench-peers: {key} -->", f"## {title}", ""]
    lines += [f"- {name}: {value}" for name, value in facts]
    lines += ["", table, "", RATIO_NOTE]
    lines += [f"\n{n}" for n in notes]
    lines += ["<!-- /bench-peers -->"]
    return "\n".join(lines) + "\n"


def update_markdown(existing: str | None, key: str, section: str) -> str:
    """BENCHMARKS.md text with `section` in place of the old section of the same key, or appended
    (the header is written first when the file is new)."""
    text = existing if existing else HEADER
    start_marker, end_marker = f"<!-- bench-peers: {key} -->", "<!-- /bench-peers -->"
    start = text.find(start_marker)
    if start >= 0:
        end = text.find(end_marker, start)
        if end < 0:
            raise ValueError(f"BENCHMARKS.md: the section {key!r} has no closing {end_marker}")
        end += len(end_marker)
        if text[end:end + 1] == "\n":
            end += 1
        return text[:start] + section + text[end:]
    return text.rstrip("\n") + "\n\n" + section


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file beside `path` and rename it over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def format_text_table(summary: dict, base: str = BASE) -> str:
    """The comparison as plain text for the terminal."""
    peers = [s for s in summary if s != base]
    rat = ratios(summary, base)
    head = [""] + [base] + [x for p in peers for x in (p, "ratio")]
    rows = [head]
    for key, label, scale, decimals in METRICS:
        if key not in summary.get(base, {}):
            continue
        row = [label, f"{summary[base][key][0] * scale:.{decimals}f}"]
        for p in peers:
            ok = key in summary[p]
            row += [f"{summary[p][key][0] * scale:.{decimals}f}" if ok else "-", f"{rat[p][key]:.2f}" if ok else "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
                     for r in rows)


# ---------------------------------------------------------------------------------------------
# machine and environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info() -> str:
    logical = os.cpu_count() or 0
    try:
        import psutil
        physical = psutil.cpu_count(logical=False) or logical
        mem = f", {psutil.virtual_memory().total / 2**30:.1f} GiB RAM"
    except ImportError:
        physical, mem = logical, ""
    try:
        load = ", load average {:.2f} at start".format(os.getloadavg()[0])
    except OSError:
        load = ""
    return (f"{cpu_model()}, {physical} cores ({logical} logical){mem}, {platform.system()} "
            f"{platform.release()}{load}")


def git_revision(repo: Path = REPO) -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                             text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"
    return (rev or "unknown") + (" + uncommitted changes" if dirty else "")


# ---------------------------------------------------------------------------------------------
# the sides


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install_llamacpp(venv: Path) -> None:
    """Build llama-cpp-python in `venv` with $CMAKE_ARGS, then print the CPU features its ggml uses."""
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--upgrade"]
    if os.environ.get("CMAKE_ARGS"):
        pip += ["--no-cache-dir", "--force-reinstall"]     # pip's wheel cache would return a wheel built without them
    subprocess.run([*pip, "llama-cpp-python"], check=True)
    probe = "import llama_cpp; print(llama_cpp.llama_print_system_info().decode())"
    info = subprocess.run([str(venv_python(venv)), "-c", probe], capture_output=True, text=True,
                          check=True).stdout.strip()
    print(f"llama.cpp system info: {info}", file=sys.stderr)
    if "AMX_INT8 = 1" in info:
        print("llama.cpp uses AMX here; its AMX kernels segfaulted on a KVM guest (BENCHMARKS.md, 2026-12-02): if "
              "it crashes, rebuild with CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON "
              "-DGGML_AVX512_VNNI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF\"", file=sys.stderr)


def install_ortgenai(venv: Path) -> None:
    if not venv_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv_python(venv)), "-m", "pip", "install", "--upgrade"]
    subprocess.run([*pip, ORTGENAI_TORCH], check=True)
    subprocess.run([*pip, ORTGENAI_TORCH, *ORTGENAI_PACKAGES], check=True)


def build_ortgenai(venv: Path, model: Path) -> str | None:
    """Build (or find in the cache) ORT GenAI's ONNX model of `model` before the rounds, with the
    builder's progress on this terminal. Returns why the peer must be skipped, or None."""
    cmd = [str(venv_python(venv)), str(TOOLS / "peer_ortgenai.py"), "build", "--model", str(model)]
    proc = subprocess.run(cmd, cwd=REPO, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
    if proc.returncode == SKIP_EXIT:
        lines = proc.stdout.strip().splitlines()
        return lines[-1] if lines else f"{ORTGENAI} could not build its model"
    if proc.returncode != 0:
        raise SystemExit(f"{ORTGENAI} model build failed (exit {proc.returncode}): {shlex.join(cmd)}")
    return None


def resolve_model(source: str) -> Path:
    """A GGUF path as given, or a registry alias resolved (pulled on first use) by pocketinfer."""
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))
    from engine.formats import registry

    path = registry.resolve(source)
    if not path.is_file():
        raise SystemExit(f"{source} resolved to {path}, which is not a GGUF file: the peers need one")
    return path.resolve()


def side_commands(args, model: Path, text_file: Path) -> dict[str, tuple[list[str], Path]]:
    """name -> (command, the pocketinfer checkout it imports from)."""
    counts = ["--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens),
              "--repeats", str(args.repeats)]
    ours = [sys.executable, "-m", "engine", "bench", "-m", str(model), "-t", str(args.threads), *counts, "--json"]
    engines = args.prefill.split(",") if args.prefill else []
    cmds = {BASE: (ours + [f"--prefill={e}" for e in engines[:1]], REPO)}
    for e in engines[1:]:
        cmds[f"{BASE} --prefill {e}"] = (ours + [f"--prefill={e}"], REPO)
    if args.baseline:
        cmds[f"{BASE}@{git_revision(args.baseline)}"] = (ours, args.baseline.resolve())
    peer = ["--model", str(model), "--text-file", str(text_file), "--threads", str(args.threads), *counts]
    if not args.no_llamacpp:
        cmds["llama.cpp"] = ([str(venv_python(args.llamacpp_venv)), str(TOOLS / "peer_llamacpp.py"), *peer], REPO)
    if args.transformers:
        cmds["transformers"] = ([sys.executable, str(TOOLS / "peer_transformers.py"), *peer], REPO)
    if args.ortgenai:
        cmds[ORTGENAI] = ([str(venv_python(args.ortgenai_venv)), str(TOOLS / "peer_ortgenai.py"), *peer], REPO)
    return cmds


class Skipped(Exception):
    pass


def run_side(name: str, cmd: list[str], root: Path) -> dict:
    """Run one side from the checkout `root`; another checkout than this one keeps its compiled kernels
    apart (numba's cache keys a kernel by its file's path and time, so two checkouts would recompile
    each other's)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)}
    if root != REPO:
        env["NUMBA_CACHE_DIR"] = str(root / ".numba-cache")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == SKIP_EXIT:
        raise Skipped(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"{name} skipped")
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise SystemExit(f"{name} failed (exit {proc.returncode}): {shlex.join(cmd)}\n{tail}")
    return json.loads(lines[-1])


def check_consistency(results: dict[str, list[dict]], args) -> list[str]:
    """Notes on anything that makes the sides not comparable, and whether greedy outputs agree."""
    notes = []
    base = results[BASE][0]
    for side, rounds in results.items():
        for r in rounds:
            if (r["prompt_tokens"], r["generated_tokens"], r["threads"]) != (
                    args.prompt_tokens, args.gen_tokens, args.threads):
                notes.append(f"Warning: {side} ran {r['prompt_tokens']} prompt / {r['generated_tokens']} generated "
                             f"tokens on {r['threads']} threads, not what was asked.")
                break
        if side == BASE:
            continue
        r = rounds[0]
        if r["prompt_digest"] != base["prompt_digest"]:
            notes.append(f"Warning: the tokenizer of {side} gave other prompt ids than pocketinfer's (same length).")
        same = "the same" if r["output_digest"] == base["output_digest"] else "not the same (near-ties differ)"
        notes.append(f"Greedy tokens of {side}: {same} as pocketinfer's.")
    return notes


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default=DEFAULT_MODEL, help="GGUF path or registry alias")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill", default=None, metavar="E[,E...]",
                    help="pocketinfer's prefill engine (int8, onnx, f32); more than one adds a side per further engine")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="timed runs inside each process (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="processes per side, alternating (default 3)")
    ap.add_argument("--llamacpp-venv", type=Path,
                    default=Path(os.environ.get("POCKETINFER_LLAMACPP_VENV") or REPO / ".venv-llamacpp"))
    ap.add_argument("--install-llamacpp", action="store_true", help="create/update the llama.cpp venv first")
    ap.add_argument("--no-llamacpp", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--transformers", action="store_true", help="also run HF transformers (torch fp32)")
    ap.add_argument("--ortgenai", action="store_true",
                    help="also run ONNX Runtime GenAI on its builder's int4 model (built once, then cached)")
    ap.add_argument("--ortgenai-venv", type=Path,
                    default=Path(os.environ.get("POCKETINFER_ORTGENAI_VENV") or REPO / ".venv-ortgenai"))
    ap.add_argument("--install-ortgenai", action="store_true",
                    help="create/update the ORT GenAI venv first (implies --ortgenai)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                    help="also run another pocketinfer checkout (e.g. `git worktree add DIR REV`) as a peer")
    ap.add_argument("--write", action="store_true", help=f"add or update this run's section in {BENCH_MD.name}")
    ap.add_argument("--json", action="store_true", help="end stdout with one JSON object of the results")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.repeats < 1 or args.threads < 1 or args.prompt_tokens < 1 or args.gen_tokens < 2:
        ap.error("need --rounds, --repeats, --threads, --prompt-tokens >= 1 and --gen-tokens >= 2")
    if args.install_llamacpp:
        install_llamacpp(args.llamacpp_venv)
    if not args.no_llamacpp and not venv_python(args.llamacpp_venv).exists():
        raise SystemExit(f"no llama.cpp venv at {args.llamacpp_venv}: run with --install-llamacpp, give "
                         "--llamacpp-venv (or $POCKETINFER_LLAMACPP_VENV), or pass --no-llamacpp")
    if args.install_ortgenai:
        install_ortgenai(args.ortgenai_venv)
        args.ortgenai = True
    if args.ortgenai and not venv_python(args.ortgenai_venv).exists():
        raise SystemExit(f"no ORT GenAI venv at {args.ortgenai_venv}: run with --install-ortgenai, or give "
                         "--ortgenai-venv (or $POCKETINFER_ORTGENAI_VENV)")

    model = resolve_model(args.model)
    machine = machine_info()
    from engine.measure.bench import PARAGRAPH
    # The children's peak RSS is theirs alone only while this process maps no libllvmlite: a page two
    # processes map cannot be paged out (engine/memory.py, engine/measure/bench.py).
    assert "llvmlite" not in sys.modules, "bench_peers imported the kernels"

    skipped: dict[str, str] = {}
    if args.ortgenai:
        why = build_ortgenai(args.ortgenai_venv, model)
        if why:
            skipped[ORTGENAI] = why
    with tempfile.TemporaryDirectory() as tmp:
        text_file = Path(tmp) / "paragraph.txt"
        text_file.write_text(PARAGRAPH, encoding="utf-8")
        cmds = side_commands(args, model, text_file)
        results: dict[str, list[dict]] = {name: [] for name in cmds}
        for rnd in range(args.rounds):
            for name, (cmd, root) in cmds.items():
                if name in skipped:
                    continue
                print(f"round {rnd + 1}/{args.rounds}: {name} ...", file=sys.stderr, flush=True)
                try:
                    r = run_side(name, cmd, root)
                except Skipped as e:
                    skipped[name] = str(e)
                    print(f"  {e}", file=sys.stderr)
                    continue
                results[name].append(r)
                print(f"  decode {r['decode_tps']:.1f} tok/s, prefill {r['prefill_tps']:.1f} tok/s, "
                      f"ttft {r['ttft_s'] * 1000:.1f} ms, peak rss {r['peak_rss_mb']:.0f} MiB", file=sys.stderr)
    results = {k: v for k, v in results.items() if v}
    summary = summarize(results)
    notes = check_consistency(results, args)
    notes += [f"{name} was skipped: {why}" for name, why in skipped.items()]
    engines = {name: rounds[0]["engine"] for name, rounds in results.items()}
    engines[BASE] = f"pocketinfer (commit {git_revision()})"
    if args.baseline:
        engines.update({name: f"pocketinfer (commit {name.split('@', 1)[1]})" for name in results if "@" in name})
    command = shlex.join(["python", "tools/bench_peers.py", *(sys.argv[1:] if argv is None else argv)])
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")

    print(f"{model.name}: {args.threads} threads, {args.prompt_tokens} prompt + {args.gen_tokens} generated "
          f"tokens, median of {args.rounds} alternating rounds x {args.repeats} repeats")
    print(format_text_table(summary))
    for n in notes:
        print(n)

    if args.write:
        key = section_key(model.name, args.threads, args.prompt_tokens, args.gen_tokens)
        facts = [("date", date), ("machine", machine), ("command", f"`{command}`"),
                 ("engines", "; ".join(engines.values())),
                 ("runs", f"{args.rounds} rounds alternating the sides, each a fresh process with "
                          f"{args.repeats} timed run(s) after a warm-up; median (min–max) over rounds"),
                 ("model", f"`{model.name}`, {model.stat().st_size:,} bytes")]
        title = (f"{model.name}: {args.threads} threads, {args.prompt_tokens} prompt + {args.gen_tokens} "
                 "generated tokens")
        section = render_section(key, title, facts, markdown_table(summary), notes)
        existing = BENCH_MD.read_text(encoding="utf-8") if BENCH_MD.exists() else None
        write_atomic(BENCH_MD, update_markdown(existing, key, section))
        print(f"updated {BENCH_MD.name}", file=sys.stderr)
    if args.json:
        print(json.dumps({"model": model.name, "threads": args.threads, "prompt_tokens": args.prompt_tokens,
                          "gen_tokens": args.gen_tokens, "rounds": args.rounds, "repeats": args.repeats,
                          "date": date, "machine": machine, "engines": engines,
                          "summary": {s: {k: list(v) for k, v in m.items()} for s, m in summary.items()},
                          "ratios": ratios(summary), "skipped": skipped, "notes": notes, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
