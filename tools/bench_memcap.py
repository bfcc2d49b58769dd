"""pocketinfer's flash deploy against llama.cpp's mmap under the same memory cap: each side runs its
benchmark in a child process inside a Linux cgroup (v1 memory controller) whose limit is the cap, so the
kernel, not the program, decides what stays in memory. llama.cpp maps the GGUF file: under the cap its
weight pages are evicted and faulted back in from the disk as decode walks the model. pocketinfer reads
what its plan put on flash with O_DIRECT into its own buffers. Page-cache pages count against a cgroup
v1 memory limit, so neither side can hide reads in memory beyond the cap.

    sudo python tools/bench_memcap.py --deploy DEPLOY --cap-mb 150 [--cap-mb 120] \
        --llamacpp-venv /work/venv-llamacpp [--gen-tokens 64] [--prompt-tokens 32] [--threads 2]

Before each run the model files are dropped from the page cache (posix_fadvise DONTNEED), so both
sides start cold. Printed per cap and side: decode and prefill tok/s (the `pocketinfer bench` protocol,
tools/peer_llamacpp.py for llama.cpp), the cgroup's peak usage, how often the limit was hit, and
whether the child was killed. Needs root (cgroup creation) and /sys/fs/cgroup/memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CGROOT = Path("/sys/fs/cgroup/memory")


def drop_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_capped(cmd: list[str], cap_bytes: int, name: str) -> dict:
    cg = CGROOT / f"pocketinfer-memcap-{os.getpid()}-{name}"
    cg.mkdir()
    try:
        (cg / "memory.limit_in_bytes").write_text(str(cap_bytes))
        procs = str(cg / "cgroup.procs")

        def enter():   # runs in the child before exec: everything it maps or reads is charged to the cgroup
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=enter)
        peak = int((cg / "memory.max_usage_in_bytes").read_text())
        fails = int((cg / "memory.failcnt").read_text())
    finally:
        cg.rmdir()
    out = {"returncode": p.returncode, "cgroup_peak_mb": peak / 2**20, "limit_hits": fails}
    if p.returncode == 0:
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    else:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        out["error"] = "killed by the kernel (out of memory under the cap)" if p.returncode < 0 else tail
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deploy", type=Path, required=True, help="a pocketinfer deploy directory (pocketinfer plan)")
    ap.add_argument("--model", type=Path, default=None, help="GGUF for llama.cpp (default: the deploy's weights file)")
    ap.add_argument("--cap-mb", type=int, action="append", required=True)
    ap.add_argument("--llamacpp-venv", type=Path, default=Path(os.environ.get("POCKETINFER_LLAMACPP_VENV", REPO / ".venv-llamacpp")))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    if not (CGROOT / "memory.limit_in_bytes").exists() or os.geteuid() != 0:
        raise SystemExit(f"bench_memcap: needs root and the cgroup v1 memory controller at {CGROOT}; "
                         "neither side can be capped here")
    plan = json.loads((args.deploy / "plan.json").read_text())
    model = args.model or args.deploy / plan["files"]["weights"]
    flash_files = [args.deploy / plan["files"][k] for k in ("bundles",) if k in plan["files"]] + [model]
    py = args.llamacpp_venv / "bin" / "python"
    if not py.exists():
        raise SystemExit(f"bench_memcap: no llama.cpp venv at {args.llamacpp_venv}; see tools/bench_peers.py --install-llamacpp")
    from engine.measure.bench import PARAGRAPH

    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(PARAGRAPH)
        text = f.name
    common = ["--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "--gen-tokens", str(args.gen_tokens)]
    sides = {
        "pocketinfer": [sys.executable, "-m", "engine", "bench", "-m", str(args.deploy), "--repeats", "1", "--json"] + common,
        "llama.cpp (mmap)": [str(py), str(REPO / "tools" / "peer_llamacpp.py"), "--model", str(model), "--text-file", text] + common,
    }
    print(f"deploy {args.deploy} (budget {plan.get('budget_request')}: {plan['budget_bytes'] / 2**20:.1f} MiB of weights in "
          f"memory), llama.cpp on {model.name}; {args.prompt_tokens} prompt + {args.gen_tokens} generated tokens, "
          f"{args.threads} threads, cold page cache")
    print("| cap MiB | engine | decode tok/s | prefill tok/s | cgroup peak MiB | limit hits | note |")
    print("|---:|---|---:|---:|---:|---:|---|")
    try:
        for cap in args.cap_mb:
            for name, cmd in sides.items():
                for path in flash_files:
                    drop_cache(path)
                r = run_capped(cmd, cap << 20, name.split()[0])
                if "error" in r:
                    print(f"| {cap} | {name} | - | - | {r['cgroup_peak_mb']:.0f} | {r['limit_hits']} | {r['error']} |")
                else:
                    print(f"| {cap} | {name} | {r['decode_tps']:.1f} | {r['prefill_tps']:.1f} | {r['cgroup_peak_mb']:.0f} "
                          f"| {r['limit_hits']} | |", flush=True)
    finally:
        os.unlink(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
