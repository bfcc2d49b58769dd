"""`pocketinfer chat [-m MODEL] [-p PROMPT] [--system TEXT]`: an interactive, streaming chat REPL.

Ctrl-C stops the current answer (the partial answer stays in the history); Ctrl-D or /bye leaves. When the
conversation outgrows the context, the oldest exchanges are dropped (never the system prompt) down to half
the context, so that the next turns reuse the cached prefix (engine/text/conversation.py).
"""

from __future__ import annotations

import sys

from engine.cli.common import add_model_args, add_sampling_args, load_model, print_stats, sampling_kwargs
from engine.errors import ContextLengthError, PocketInferError
from engine.text.conversation import answer_room, fit_conversation, prompt_ids

HELP = """commands:
  /reset   forget the conversation (keeps the system prompt)
  /bye     leave (Ctrl-D works too)
  /help    this text
Ctrl-C stops the current answer."""


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="chat with a model (interactive, or one answer with -p)")
    add_model_args(p)
    p.add_argument("-p", "--prompt", default=None, help="answer this one message and exit ('-' reads stdin)")
    p.add_argument("--system", default=None, help="system prompt")
    add_sampling_args(p, max_tokens=None)
    p.set_defaults(func=run)


def _answer(llm, messages, args) -> str:
    """Stream one assistant answer to stdout; returns its text (partial if interrupted)."""
    parts = []
    last = None
    stream = llm.chat(messages, stream=True, **sampling_kwargs(args))
    try:
        for chunk in stream:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            parts.append(chunk.text)
            last = chunk
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    if args.verbose and last is not None and last.finish_reason:
        print_stats(last.stats, last.finish_reason)
    return "".join(parts)


def _fit(llm, messages: list[dict], args) -> list[dict]:
    """The history, fitted before a turn so that the answer has room (conversation.answer_room)."""
    n_ctx = llm.n_ctx
    room = answer_room(n_ctx, args.max_tokens)

    def count(msgs: list[dict]) -> int:
        return len(prompt_ids(llm.tokenizer, msgs))

    if count(messages) + room <= n_ctx:
        return messages
    try:
        kept, dropped = fit_conversation(messages, count, n_ctx // 2)
    except ContextLengthError:      # the system prompt and the new message fill more than half: use the rest
        kept, dropped = fit_conversation(messages, count, n_ctx - room)
    print(f"(the conversation outgrew the context of {n_ctx} tokens: dropped its {dropped} oldest messages, "
          "kept the system prompt)", file=sys.stderr)
    return kept


def run(args) -> int:
    llm = load_model(args)
    base = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        _answer(llm, base + [{"role": "user", "content": prompt}], args)
        return 0
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    messages = list(base)
    print(f"chatting with {llm.source} — /help for commands, /bye to leave", file=sys.stderr)
    while True:
        try:
            line = input(">>> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        except KeyboardInterrupt:  # Ctrl-C at the prompt clears the line, as in a shell
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/bye", "/exit", "/quit"):
            return 0
        if text == "/help":
            print(HELP, file=sys.stderr)
            continue
        if text == "/reset":
            messages = list(base)
            llm.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if text.startswith("/"):
            print(f"unknown command {text.split()[0]}; /help lists the commands", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        try:
            messages = _fit(llm, messages, args)
            reply = _answer(llm, messages, args)
        except PocketInferError as e:  # e.g. a message longer than the context: keep the REPL alive
            messages.pop()
            print(f"pocketinfer: error: {e} (/reset starts a new conversation)", file=sys.stderr)
            continue
        messages.append({"role": "assistant", "content": reply})
