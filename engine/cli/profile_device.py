"""`pocketinfer profile-device [-o FILE] [--path DIR] [--json]`: measure this machine for the planner.

Writes the profile (default: $POCKETINFER_HOME/device/<host>.json, where `pocketinfer plan` finds it)
and prints a readable summary; --json prints the profile as one JSON object instead. Progress goes to
stderr. The planner lives in planner/; this command only calls it (the runtime never imports it).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("profile-device", help="measure this machine's cores, memory, storage and kernels "
                              "for the planner (under 60 s)")
    p.add_argument("-o", "--output", default=None,
                   help="where to write the profile (default: $POCKETINFER_HOME/device/<host>.json)")
    p.add_argument("--path", default=None,
                   help="directory on the filesystem that will hold the model (default: the model cache)")
    p.add_argument("-t", "--threads", type=int, default=None, help="compute threads (default: physical cores)")
    p.add_argument("--json", action="store_true", help="print the profile as one JSON object")
    p.set_defaults(func=run)


def run(args) -> int:
    from engine.formats.registry import cache_dir
    from planner import device
    from planner.device_probe import profile_device

    path = Path(args.path).expanduser() if args.path else cache_dir() / "models"
    out = Path(args.output).expanduser() if args.output else device.default_path()
    prof = profile_device(path, args.threads, progress=lambda stage: print(f"measuring {stage}...", file=sys.stderr,
                                                                            flush=True))
    device.save_profile(prof, out)
    if args.json:
        print(json.dumps(prof.to_dict(), sort_keys=True))
    else:
        print(device.format_summary(prof))
        print(f"written to {out}")
    return 0
