"""engine/text/conversation.py and the chat REPL past the context: the oldest exchanges go, the system
prompt stays, and the turns after a drop reuse the cached prefix."""

from __future__ import annotations

import builtins

import pytest

from engine.cli import build_parser
from engine.errors import ContextLengthError
from engine.text.conversation import fit_conversation


def _words(messages):
    return sum(len(m["content"].split()) for m in messages)


def _conversation(turns: int) -> list[dict]:
    out = [{"role": "system", "content": "be brief"}]
    for i in range(turns):
        out += [{"role": "user", "content": f"question {i} " * 3}, {"role": "assistant", "content": f"answer {i} " * 3}]
    return out + [{"role": "user", "content": "last one"}]


def test_a_conversation_that_fits_is_kept_whole():
    msgs = _conversation(3)
    assert fit_conversation(msgs, _words, 1000) == (msgs, 0)


def test_the_oldest_exchanges_go_and_the_system_prompt_stays():
    msgs = _conversation(5)              # 2 + 5 * 12 + 2 words
    kept, dropped = fit_conversation(msgs, _words, 30)
    assert kept[0] == msgs[0] and kept[-1] == msgs[-1]
    assert kept[1:] == msgs[1 + dropped:] and dropped % 2 == 0     # whole exchanges, user first
    assert kept[1]["role"] == "user" and _words(kept) <= 30 < _words([msgs[0]] + msgs[dropped - 1:])


def test_a_last_message_over_the_limit_is_an_error():
    msgs = [{"role": "system", "content": "be brief " * 10}, {"role": "user", "content": "long " * 50}]   # 70 words
    with pytest.raises(ContextLengthError, match="70 tokens, over the 40"):
        fit_conversation(msgs, _words, 40)


def test_the_repl_keeps_answering_past_the_context(stories_dir, monkeypatch, capsys):
    from engine.cli import chat
    from engine.loader import load

    llm = load(stories_dir, n_ctx=400)
    seen = []                                          # (messages, the answer's last stats) per turn
    real_chat = llm.chat

    def recording_chat(messages, stream=False, **kw):
        def chunks():
            last = None
            for c in real_chat(messages, stream=True, **kw):
                last = c
                yield c
            seen.append(([dict(m) for m in messages], last.stats))
        return chunks()

    monkeypatch.setattr(llm, "chat", recording_chat)
    monkeypatch.setattr(chat, "load_model", lambda args: llm)
    lines = iter([f"tell me about the little dog number {i}" for i in range(14)])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", typed)
    args = build_parser().parse_args(["chat", "-m", str(stories_dir), "--system", "You are a storyteller.",
                                      "-n", "12", "--temp", "0"])
    assert chat.run(args) == 0
    err = capsys.readouterr().err
    assert "error" not in err and "dropped" in err
    assert len(seen) == 14                                          # every line got an answer
    assert all(m[0] == {"role": "system", "content": "You are a storyteller."} for m, _ in seen)
    drops = [i for i in range(1, len(seen)) if len(seen[i][0]) <= len(seen[i - 1][0])]
    assert drops, "the conversation never outgrew the context"
    system_tokens = len(llm.tokenizer.encode(llm.tokenizer.apply_chat_template(seen[0][0][:1],
                                                                              add_generation_prompt=False)))
    after = [i + 1 for i in drops if i + 1 < len(seen) and i + 1 not in drops]
    assert after and all(seen[i][1].cached_tokens > system_tokens + 10 for i in after)   # the kept turns reused
