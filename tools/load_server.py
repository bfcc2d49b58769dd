"""Load and speed of `pocketinfer serve`, on loopback only; it starts the server itself and stops it.

    python tools/load_server.py [-m MODEL] [--clients 1,4,16] [--requests 4] [--max-tokens 32] [--parallel 2]
    python tools/load_server.py --speed [-m MODEL] [--gen-tokens 128] [--rounds 2]

Load: N concurrent clients (threads) each send M streamed chat requests of at most --max-tokens tokens,
one after the other. Reported per N: requests/s, time to first token p50/p99, generated tokens/s over all
clients, errors (anything but a complete stream), and the server's RSS before and after.

Speed: decode tok/s of one client streaming --gen-tokens tokens through the server, against `pocketinfer
bench` on the same model and threads, alternating server, bench, server, bench (--rounds pairs); the
server's figure is (tokens - 1) / (last token's arrival - first token's arrival).
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
TOPICS = ("a dog", "the sea", "a small robot", "a red kite", "the moon", "a lost key", "a garden", "a storm")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: str, port: int, parallel: int, threads: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "-m", model, "--port", str(port),
                             "--parallel", str(parallel), "--threads", str(threads)], cwd=REPO,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    if not line.startswith("serving "):
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip() or 'no output'}")
    return proc


def stream_chat(port: int, content: str, max_tokens: int) -> dict:
    """One streamed chat request: {"ttft_s", "tokens", "first_s", "last_s"}, or {"error"}."""
    body = json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}})
    t0 = time.perf_counter()
    first = last = None
    tokens, done = 0, False
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=600)
        conn.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {r.read()[:200]!r}"}
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                now = time.perf_counter()
                first = first or now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        conn.close()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if not done or first is None:
        return {"error": "the stream ended without [DONE] or without text"}
    return {"ttft_s": first - t0, "tokens": tokens, "first_s": first, "last_s": last}


def load_round(port: int, clients: int, requests: int, max_tokens: int) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(k: int):
        for j in range(requests):
            topic = TOPICS[(k + j) % len(TOPICS)]
            r = stream_chat(port, f"Client {k} asks, time {j}: tell me a short story about {topic}.", max_tokens)
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    ttft = sorted(r["ttft_s"] for r in ok)
    return {"clients": clients, "requests": len(results), "errors": len(results) - len(ok),
            "first_error": next((r["error"] for r in results if "error" in r), None),
            "requests_per_s": len(ok) / wall, "ttft_p50_ms": 1000 * statistics.median(ttft) if ttft else None,
            "ttft_p99_ms": 1000 * ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else None,
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall}


def rss_mib(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def run_load(args) -> None:
    port = free_port()
    proc = start_server(args.model, port, args.parallel, args.threads)
    try:
        before = rss_mib(proc.pid)
        rows = []
        for n in args.clients:
            row = load_round(port, n, args.requests, args.max_tokens)
            row["rss_mib"] = rss_mib(proc.pid)
            rows.append(row)
            print(f"{n} clients: {row}", file=sys.stderr)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    if args.json:
        print(json.dumps({"rss_before_mib": before, "rounds": rows}))
        return
    print(f"server RSS before the load: {before:.0f} MiB; --parallel {args.parallel}, {args.requests} requests per "
          f"client, at most {args.max_tokens} tokens each, {args.threads} threads")
    print("| clients | requests | errors | requests/s | TTFT p50 ms | TTFT p99 ms | tokens/s | server RSS after MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
              f"{r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | {r['tokens_per_s']:.1f} | {r['rss_mib']:.0f} |")
    errors = [r["first_error"] for r in rows if r["errors"]]
    if errors:
        print(f"first error: {errors[0]}")


def bench_decode(model: str, threads: int, gen_tokens: int) -> float:
    out = subprocess.run([sys.executable, "-m", "engine", "bench", "-m", model, "-t", str(threads), "--prompt-tokens",
                          "32", "--gen-tokens", str(gen_tokens), "--json"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["decode_tps"])


def run_speed(args) -> None:
    port = free_port()
    server, bench = [], []
    proc = start_server(args.model, port, 1, args.threads)
    try:
        stream_chat(port, "warm up", 8)
        for _ in range(args.rounds):
            r = stream_chat(port, "Tell me a long story about a dog and a ball.", args.gen_tokens)
            if "error" in r:
                raise SystemExit(f"the server failed: {r['error']}")
            server.append((r["tokens"] - 1) / (r["last_s"] - r["first_s"]))
            idle = psutil.Process(proc.pid)
            idle.suspend()                  # the idle server should take no CPU; make sure bench has the cores
            try:
                bench.append(bench_decode(args.model, args.threads, args.gen_tokens))
            finally:
                idle.resume()
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    s, b = statistics.median(server), statistics.median(bench)
    def rounds(xs):
        return ", ".join(f"{x:.1f}" for x in xs)

    print(f"decode tok/s, one streaming client through the server: {s:.1f} (rounds {rounds(server)})")
    print(f"decode tok/s, pocketinfer bench: {b:.1f} (rounds {rounds(bench)})")
    print(f"server / bench: {s / b:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=lambda v: [int(x) for x in v.split(",")], default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=4, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--parallel", type=int, default=2, help="the server's --parallel")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--speed", action="store_true", help="decode through the server against pocketinfer bench")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    if args.speed:
        run_speed(args)
    else:
        run_load(args)


if __name__ == "__main__":
    main()
