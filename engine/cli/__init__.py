"""`pocketinfer` command line: dispatches to one module per subcommand (engine/cli/).

The library raises; this is the one place that reports: one line on stderr and a non-zero exit,
with the traceback only under --debug.
"""

from __future__ import annotations

import argparse
import sys

from engine.cli import bench, chat, eval_prune, eval_sparsity, generate, perplexity, plan, profile_device, prune, pull, serve

COMMANDS = (pull, generate, chat, serve, perplexity, bench, profile_device, plan, prune, eval_sparsity, eval_prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pocketinfer", description="Run Llama-family models on laptop and phone CPUs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `pocketinfer generate ... | head` closed the pipe: not an error
        return 0
    except Exception as e:  # the CLI's one reporting point: every error becomes one line
        if args.debug:
            raise
        from engine.errors import PocketInferError

        if isinstance(e, (PocketInferError, ValueError, OSError, TypeError)):
            msg = str(e)
        else:
            msg = f"internal error: {type(e).__name__}: {e} (run with --debug for the traceback)"
        print(f"pocketinfer: error: {msg.splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
