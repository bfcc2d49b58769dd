"""Reading a GGUF file's header, metadata and tensor table: pocketinfer's parser (engine/formats/gguf_file.py)
against gguf-py's GGUFReader, each in a fresh process, alternating A B A B; wall time and the memory the
parse added (peak RSS minus the RSS before it), medians over rounds. Both also fetch the vocabulary
strings, which the tokenizer needs.

    python tools/bench_gguf_reader.py [-m MODEL] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, resource, sys, time
import psutil
path, which = sys.argv[1], sys.argv[2]
before = psutil.Process().memory_info().rss
t0 = time.perf_counter()
if which == "pocketinfer":
    from engine.formats.gguf_file import GGUFFile
    g = GGUFFile(path)
    tokens = g.meta["tokenizer.ggml.tokens"]
else:
    from gguf import GGUFReader
    g = GGUFReader(path, "r")
    f = g.fields["tokenizer.ggml.tokens"]
    tokens = [bytes(f.parts[i]).decode() for i in f.data]
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"seconds": seconds, "added_mib": (peak - before) / 2**20, "tensors": len(g.tensors),
                  "tokens": len(tokens)}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct", help="GGUF path or registry alias")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from engine.formats import registry

    path = registry.resolve(args.model)
    runs: dict[str, list[dict]] = {"pocketinfer": [], "GGUFReader": []}
    for _ in range(args.rounds):
        for which in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), which], cwd=REPO, capture_output=True,
                                 text=True, check=True, env={"PYTHONPATH": str(REPO), "PATH": ""})
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{path.name}, {args.rounds} rounds alternating, medians (min-max):")
    for which, rs in runs.items():
        s, m = [r["seconds"] for r in rs], [r["added_mib"] for r in rs]
        print(f"  {which:12s} {statistics.median(s):.3f} s ({min(s):.3f}-{max(s):.3f}), "
              f"+{statistics.median(m):.0f} MiB ({min(m):.0f}-{max(m):.0f}); {rs[0]['tensors']} tensors, "
              f"{rs[0]['tokens']} token strings")
    return 0


if __name__ == "__main__":
    sys.exit(main())
