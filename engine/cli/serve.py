"""`pocketinfer serve [-m MODEL] [--host 127.0.0.1] [--port 8080] [--api-key KEY] [--parallel N]`: the
OpenAI-compatible HTTP server (engine/server/app.py), bound to localhost unless told otherwise."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

from engine.cli.common import add_model_args, load_model


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server (pip install 'pocketinfer[server]')")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--api-key", default=os.environ.get("POCKETINFER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $POCKETINFER_API_KEY, else no key)")
    p.add_argument("--parallel", type=int, default=2,
                   help="conversations served at once, each with its own KV cache; more requests wait (default 2)")
    p.set_defaults(func=run)


def model_id(source: str) -> str:
    """The name clients use: a registry alias as given, else the file or directory name."""
    return Path(source).name if os.sep in source or Path(source).exists() else source


def run(args) -> int:
    try:
        import uvicorn

        from engine.server.app import Model, create_app
    except ImportError as e:
        raise ValueError(f"pocketinfer serve needs the server extra ({e.name} is missing): "
                         "pip install 'pocketinfer[server]'") from None
    if args.parallel < 1:
        raise ValueError(f"--parallel must be at least 1, got {args.parallel}")
    model = Model(model_id(args.model), lambda: load_model(args), slots=args.parallel)
    server = uvicorn.Server(uvicorn.Config(create_app(model, args.api_key), host=args.host, port=args.port,
                                           log_level="warning"))

    def report_load():
        model.ready.wait()
        if model.error:
            print(f"pocketinfer: error: {model.error}", file=sys.stderr)
            server.should_exit = True
            return
        while not server.started and not server.should_exit:     # the socket listens from here on
            time.sleep(0.05)
        print(f"serving {model.id} on http://{args.host}:{args.port}/v1 ({args.parallel} at once)", file=sys.stderr)

    threading.Thread(target=report_load, daemon=True).start()
    server.run()
    return 1 if model.error else 0
