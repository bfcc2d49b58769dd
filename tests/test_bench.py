"""`pocketinfer bench` on stories260K, and tools/bench_peers.py's pure helpers (no peers needed).
Nothing here asserts a timing."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("prefill_tps", "decode_tps", "ttft_s", "peak_rss_mb", "prompt_tokens", "generated_tokens", "threads",
        "model", "weight_bytes", "file_bytes", "repeats")


def cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=str(ROOT))


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    return module


@pytest.fixture(scope="module")
def peers():
    return load_tool("bench_peers")


# ------------------------------------------------------------------------------------ the command


@pytest.mark.slow
def test_bench_json(stories_dir):
    r = cli("bench", "-m", str(stories_dir), "-t", "1", "--prompt-tokens", "9", "--gen-tokens", "5",
            "--repeats", "2", "--json")
    assert r.returncode == 0, r.stderr
    assert "decode tok/s" in r.stdout          # the readable table comes first
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for key in KEYS:
        assert key in out, key
    assert (out["prompt_tokens"], out["generated_tokens"], out["repeats"], out["threads"]) == (9, 5, 2, 1)
    assert len(out["runs"]) == 2 and out["model"] == "stories260K"
    assert out["prefill_tps"] > 0 and out["decode_tps"] > 0 and out["ttft_s"] > 0 and out["peak_rss_mb"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("args, words", [
    (["--gen-tokens", "0"], "--gen-tokens"),
    (["--prompt-tokens", "0"], "--prompt-tokens"),
    (["--repeats", "0"], "--repeats"),
    (["--prompt-tokens", "600", "--gen-tokens", "8"], "context"),   # stories260K holds 512
])
def test_bench_bad_arguments_give_one_line(stories_dir, args, words):
    r = cli("bench", "-m", str(stories_dir), *args)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pocketinfer: error:") and words in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_bench_library_counts_and_prompt(stories_dir):
    import engine
    from engine.measure import bench

    llm = engine.load(str(stories_dir), threads=1)
    for n in (1, 7, 300):
        ids = bench.prompt_ids(llm.tokenizer, n)
        assert len(ids) == n and ids == bench.prompt_ids(llm.tokenizer, n)
        assert llm.tokenizer.bos_token_id not in ids[:1]
    res = bench.bench(llm, 6, 4, 2)
    assert len(res.runs) == 2 and all(len(r.tokens) == 4 for r in res.runs)
    assert res.runs[0].tokens == res.runs[1].tokens      # greedy from an empty cache each time
    assert len(res.per_run()) == 2


def test_peer_protocol_matches_engine():
    from engine.measure import bench

    peer = load_tool("peer_llamacpp")
    ids = [5, 6, 7]
    assert peer.ids_digest(ids) == bench.ids_digest(ids)
    assert peer.repeat_to(ids, 7) == [5, 6, 7, 5, 6, 7, 5]
    assert (peer.WARMUP_PROMPT, peer.WARMUP_DECODE) == (bench.WARMUP_PROMPT, bench.WARMUP_DECODE)
    calls = {"prefill": [], "step": 0, "reset": 0}

    def prefill(toks):
        calls["prefill"].append(len(toks))
        return np.eye(10, dtype=np.float32)[3]

    def step(tok):
        calls["step"] += 1
        return np.eye(10, dtype=np.float32)[(tok + 1) % 10]

    def reset():
        calls["reset"] += 1

    runs, tokens = peer.measure(prefill, step, reset, list(range(20)), gen_tokens=5, repeats=2)
    assert tokens == [3, 4, 5, 6, 7] and len(runs) == 2
    assert calls == {"prefill": [8, 20, 20], "step": 2 + 2 * 4, "reset": 3}


# ------------------------------------------------------------------------------------ bench_peers helpers


def fake_results():
    def r(decode, prefill, ttft, rss):
        return {"decode_tps": decode, "prefill_tps": prefill, "ttft_s": ttft, "peak_rss_mb": rss,
                "rss_loaded_mb": rss - 10}
    return {
        "pocketinfer": [r(100, 300, 0.5, 280), r(90, 320, 0.4, 280), r(110, 310, 0.45, 280)],
        "llama.cpp": [r(80, 310, 0.41, 160), r(82, 290, 0.44, 162), r(78, 300, 0.42, 161)],
    }


def test_summary_and_ratios(peers):
    assert peers.median_range([3, 1, 2]) == (2, 1, 3)
    assert peers.median_range([4, 1]) == (2.5, 1, 4)
    with pytest.raises(ValueError):
        peers.median_range([])
    s = peers.summarize(fake_results())
    assert s["pocketinfer"]["decode_tps"] == (100, 90, 110)
    assert s["llama.cpp"]["ttft_s"] == (0.42, 0.41, 0.44)
    rat = peers.ratios(s)
    assert set(rat) == {"llama.cpp"}
    assert rat["llama.cpp"]["decode_tps"] == pytest.approx(100 / 80)
    assert rat["llama.cpp"]["prefill_tps"] == pytest.approx(310 / 300)
    assert rat["llama.cpp"]["peak_rss_mb"] == pytest.approx(280 / 161)


def test_markdown_table(peers):
    table = peers.markdown_table(peers.summarize(fake_results()))
    lines = table.splitlines()
    assert lines[0] == "| metric | pocketinfer | llama.cpp | pocketinfer / llama.cpp |"
    assert lines[1] == "|---|---|---|---|"
    decode = next(line for line in lines if line.startswith("| decode tok/s"))
    assert decode == "| decode tok/s | 100.0 (90.0–110.0) | 80.0 (78.0–82.0) | 1.25 |"
    ttft = next(line for line in lines if line.startswith("| TTFT ms"))
    assert "450.0 (400.0–500.0)" in ttft and ttft.endswith("| 1.07 |")
    assert len(lines) == 2 + len(peers.METRICS)
    text = peers.format_text_table(peers.summarize(fake_results()))
    assert "decode tok/s" in text and "1.25" in text


def test_benchmarks_md_writer(peers, tmp_path):
    table = peers.markdown_table(peers.summarize(fake_results()))
    key_a = peers.section_key("m.gguf", 2, 128, 128)
    key_b = peers.section_key("m.gguf", 1, 128, 128)
    sec_a1 = peers.render_section(key_a, "m.gguf: 2 threads", [("date", "day 1")], table, ["note 1"])
    sec_b = peers.render_section(key_b, "m.gguf: 1 thread", [("date", "day 1")], table, [])
    sec_a2 = peers.render_section(key_a, "m.gguf: 2 threads", [("date", "day 2")], table, [])

    text = peers.update_markdown(None, key_a, sec_a1)
    assert text.startswith(peers.HEADER) and "noisy" in peers.HEADER and "day 1" in text and "note 1" in text
    text = peers.update_markdown(text, key_b, sec_b)
    assert text.count("<!-- bench-peers:") == 2
    text = peers.update_markdown(text, key_a, sec_a2)          # replaced in place, the other kept
    assert text.count("<!-- bench-peers:") == 2 and "day 2" in text and "note 1" not in text
    assert text.index(key_a) < text.index(key_b)
    assert peers.update_markdown(text, key_a, sec_a2) == text  # idempotent

    path = tmp_path / "BENCHMARKS.md"
    peers.write_atomic(path, text)
    assert path.read_text(encoding="utf-8") == text
    peers.write_atomic(path, "new\n")
    assert path.read_text(encoding="utf-8") == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["BENCHMARKS.md"]   # no temporary file left behind


def test_machine_info(peers):
    info = peers.machine_info()
    assert "cores" in info and peers.cpu_model()
