"""engine/llm.py under threads: sessions over shared weights generate at once, interleaved token by token,
and give the tokens each gives alone; calls on one LLM are serialized."""

from __future__ import annotations

import threading

import pytest

PROMPTS = ("Once upon a time, there was a little dog", "The sun was hot and the girl wanted")


@pytest.fixture(scope="module")
def llm(stories_dir):
    from engine.loader import load

    return load(stories_dir, n_ctx=256)


def _alone(llm, prompt):
    return llm.session().generate(prompt, max_tokens=24, temperature=0).tokens


def test_sessions_interleaved_token_by_token_give_their_own_tokens(llm):
    expected = [_alone(llm, p) for p in PROMPTS]
    sessions = [llm.session() for _ in PROMPTS]
    cond, state = threading.Condition(), {"turn": 0, "done": [False, False]}
    got, order, errors = [[], []], [], []       # order: whose forward pass produced each chunk

    def run(k):
        stream = sessions[k].stream(PROMPTS[k], max_tokens=24, temperature=0)
        try:
            while True:
                with cond:              # strict alternation while both generate
                    assert cond.wait_for(lambda: state["turn"] == k or state["done"][1 - k], timeout=120)
                chunk = next(stream, None)
                with cond:
                    if chunk is None:
                        state["done"][k] = True
                    else:
                        order.append(k)
                        if chunk.token is not None:
                            got[k].append(chunk.token)
                    state["turn"] = 1 - k
                    cond.notify_all()
                if chunk is None:
                    return
        except Exception as e:          # noqa: BLE001 -- reported by the main thread
            errors.append(e)
            with cond:
                state["done"][k] = True
                cond.notify_all()

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and not any(t.is_alive() for t in threads)
    assert order[:16] == [0, 1] * 8             # both conversations were mid-generation at once
    assert got == expected


def test_two_threads_on_one_llm_are_served_one_after_the_other(llm):
    expected = [_alone(llm, p) for p in PROMPTS]
    shared = llm.session()
    got, errors = {}, []
    start = threading.Barrier(2)

    def run(k):
        try:
            start.wait(timeout=60)
            got[k] = shared.generate(PROMPTS[k], max_tokens=24, temperature=0).tokens
        except Exception as e:          # noqa: BLE001 -- reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and [got[0], got[1]] == expected


def test_a_second_call_from_the_streaming_thread_is_an_error(llm):
    s = llm.session()
    stream = s.stream(PROMPTS[0], max_tokens=8, temperature=0)
    next(stream)
    with pytest.raises(RuntimeError, match="already generating in this thread"):
        s.generate(PROMPTS[1], max_tokens=4)
    stream.close()                       # closing the stream frees the conversation
    assert s.generate(PROMPTS[1], max_tokens=4, temperature=0).tokens
