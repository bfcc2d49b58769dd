"""The command line as a user drives it (subprocesses against stories260K)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow      # every test starts `python -m engine` processes
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, stdin=None, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300, cwd=str(ROOT))


@pytest.fixture(scope="module")
def golden(stories_dir):
    return json.loads((stories_dir / "golden_greedy.json").read_text())


def test_generate_streams_greedy_text(stories_dir, golden):
    r = cli("generate", "-m", str(stories_dir), "-p", "Once upon a time", "--temp", "0", "-n", "25")
    assert r.returncode == 0, r.stderr
    assert golden["text"].startswith("Once upon a time" + r.stdout.rstrip("\n"))


def test_generate_json_and_stdin_prompt(stories_dir):
    r = cli("generate", "-m", str(stories_dir), "-p", "-", "--temp", "0", "-n", "12", "--json", "--verbose",
            stdin="Once upon a time")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(out["tokens"]) == 12 and out["finish_reason"] == "length"
    for key in ("text", "prompt_tps", "generation_tps", "ttft_s", "peak_rss_mb", "prompt_tokens"):
        assert key in out
    assert "tok/s" in r.stderr  # --verbose statistics go to stderr


def test_generate_stop_string_and_seed(stories_dir):
    r = cli("generate", "-m", str(stories_dir), "-p", "Once upon a time", "--temp", "0", "-n", "60",
            "--stop", "Lily", "--json")
    out = json.loads(r.stdout)
    assert out["finish_reason"] == "stop" and "Lily" not in out["text"]
    a = cli("generate", "-m", str(stories_dir), "-p", "Once", "--seed", "7", "-n", "20", "--json")
    b = cli("generate", "-m", str(stories_dir), "-p", "Once", "--seed", "7", "-n", "20", "--json")
    assert json.loads(a.stdout)["tokens"] == json.loads(b.stdout)["tokens"]


def test_chat_one_shot(stories_dir):
    r = cli("chat", "-m", str(stories_dir), "-p", "Tell me a story", "--temp", "0", "-n", "10")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_chat_repl_commands(stories_dir):
    script = "/help\nhello there\n/reset\n/nonsense\nagain\n/bye\n"
    r = cli("chat", "-m", str(stories_dir), "--temp", "0", "-n", "5", "--system", "be brief", stdin=script)
    assert r.returncode == 0, r.stderr
    assert "/reset" in r.stderr and "conversation cleared" in r.stderr and "unknown command /nonsense" in r.stderr
    assert r.stdout.count(">>> ") >= 4


def test_chat_repl_ends_on_eof(stories_dir):
    r = cli("chat", "-m", str(stories_dir), "-n", "3", stdin="hi\n")
    assert r.returncode == 0, r.stderr


def test_perplexity_json(stories_dir, tmp_path):
    f = tmp_path / "story.txt"
    f.write_text(json.loads((stories_dir / "golden_greedy.json").read_text())["text"] * 3)
    r = cli("perplexity", "-m", str(stories_dir), "-f", str(f), "--ctx", "64", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["windows"] >= 3 and out["scored_tokens"] == out["windows"] * 63
    assert 1.0 < out["ppl"] < 20.0   # the model's own greedy text is very predictable to it


def test_help_and_no_command():
    assert cli("--help").returncode == 0
    r = cli()
    assert r.returncode == 2 and "pull" in r.stderr


def test_pull_list():
    r = cli("pull", "--list")
    assert r.returncode == 0 and "smollm2-135m-instruct" in r.stdout
