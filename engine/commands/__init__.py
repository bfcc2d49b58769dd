"""One module per CLI subcommand. Each exposes `register(subparsers)`, which adds its parser and sets
`func=run`, and `run(args) -> int` (the exit code). engine/cli.py dispatches and reports errors."""
