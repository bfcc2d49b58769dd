"""engine/server/app.py through the official `openai` client and raw HTTP: chat and completions, streamed
and not, the models list, every error code, and the faults a local server meets (a client leaving
mid-stream, a request while another streams, a huge max_tokens, a prompt over the context)."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

pytest.importorskip("starlette", reason="the server extra: pip install 'pocketinfer[server]'")
pytest.importorskip("uvicorn", reason="the server extra: pip install 'pocketinfer[server]'")
openai = pytest.importorskip("openai", reason="the test extra has the official client")

import uvicorn  # noqa: E402

from engine.server.app import Model, create_app  # noqa: E402

MODEL = "stories260K"


class Server:
    """A server on a free loopback port, in a thread."""

    def __init__(self, model: Model, api_key: str | None = None):
        self.model = model
        self.server = uvicorn.Server(uvicorn.Config(create_app(model, api_key), host="127.0.0.1", port=0,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, key: str = "none") -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        data = r.read()
        conn.close()
        return r.status, json.loads(data) if data else None

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(stories_dir):
    from engine.loader import load

    model = Model(MODEL, lambda: load(stories_dir, n_ctx=256), slots=2)
    assert model.ready.wait(120) and model.error is None
    s = Server(model)
    yield s
    s.stop()


def _free_slots(server, want=2, seconds=30):
    for _ in range(seconds * 100):
        if len(server.model.free) == want:
            return True
        time.sleep(0.01)
    return False


def test_chat_streamed_and_not(server):
    c = server.client()
    msgs = [{"role": "system", "content": "You tell stories."}, {"role": "user", "content": "A dog"}]
    r = c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.model == MODEL and text and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16 and r.usage.total_tokens == r.usage.prompt_tokens + 16
    chunks = list(c.chat.completions.create(model=MODEL, messages=msgs, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 16


def test_completions_and_models(server):
    c = server.client()
    r = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert r.object == "text_completion" and r.choices[0].text and r.usage.completion_tokens == 8
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True))
    assert streamed == r.choices[0].text
    assert [m.id for m in c.models.list().data] == [MODEL]
    assert server.raw("GET", "/health") == (200, {"status": "ok"})


@pytest.mark.parametrize("body, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (json.dumps({"model": MODEL}).encode(), "'messages' must be a non-empty list"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user"}]}).encode(), "messages[0] must be"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}).encode(),
     "max_tokens must be at least 1"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(),
     "'temperature' must be float"),
])
def test_bad_requests_are_400(server, body, message):
    status, err = server.raw("POST", "/v1/chat/completions", body)
    assert status == 400 and message in err["error"]["message"] and err["error"]["type"] == "invalid_request_error"


def test_unknown_model_path_and_prompt_over_the_context(server):
    c = server.client()
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        c.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    status, err = server.raw("GET", "/v1/nothing")
    assert status == 404 and err["error"]["code"] == "not_found"
    with pytest.raises(openai.BadRequestError, match="context"):
        c.completions.create(model=MODEL, prompt="word " * 400, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="context"):
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 400}])


def test_a_long_conversation_loses_its_oldest_turns(server):
    msgs = [{"role": "system", "content": "You tell stories."}]
    for i in range(12):
        msgs += [{"role": "user", "content": f"tell me about dog {i} and the red ball"},
                 {"role": "assistant", "content": "the dog ran to the park and played with the ball"}]
    msgs.append({"role": "user", "content": "and then?"})
    r = server.client().chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens + 8 <= 256 and r.choices[0].message.content


def test_a_huge_max_tokens_ends_at_the_context(server):
    r = server.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10**9,
                                           temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length") and r.usage.total_tokens <= 256


def test_a_client_leaving_mid_stream_stops_its_generation(server):
    prompt = "Far away, a small bird"                   # uninterrupted, 200 tokens (stories260K does not stop)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"model": MODEL, "prompt": prompt, "max_tokens": 200, "stream": True, "temperature": 1.0,
                       "seed": 1})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.readline().startswith(b"data: ")
    conn.close()                                        # gone after the first token
    assert _free_slots(server), "the slot was not freed"
    ids = server.model.llm.tokenizer.encode(prompt)
    (served,) = [s for s in server.model.free if s.cached_tokens(ids) == len(ids)]
    assert len(served._cache_ids) - len(ids) < 50, "the generation went on after its client left"
    r = server.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4, temperature=0)
    assert r.usage.completion_tokens == 4


def test_a_request_while_another_streams(server):
    c = server.client()
    stream = c.completions.create(model=MODEL, prompt="The cat", max_tokens=40, temperature=0, stream=True)
    first = next(iter(stream))
    alone = c.completions.create(model=MODEL, prompt="The dog", max_tokens=8, temperature=0)
    rest = "".join(ch.choices[0].text for ch in stream)
    together = first.choices[0].text + rest
    again = c.completions.create(model=MODEL, prompt="The cat", max_tokens=40, temperature=0)
    assert alone.usage.completion_tokens == 8 and together == again.choices[0].text
    assert _free_slots(server)


def test_api_key_and_loading(stories_dir):
    from engine.loader import load

    gate = threading.Event()
    model = Model(MODEL, lambda: gate.wait(60) and load(stories_dir, n_ctx=128), slots=1)
    s = Server(model, api_key="secret")
    try:
        assert s.raw("GET", "/health") == (503, {"status": "loading"})
        with pytest.raises(openai.InternalServerError, match="still loading"):
            s.client("secret").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        gate.set()
        assert model.ready.wait(120) and model.error is None
        with pytest.raises(openai.AuthenticationError, match="incorrect API key"):
            s.client("wrong").models.list()
        r = s.client("secret").chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                       max_tokens=4)
        assert r.usage.completion_tokens <= 4
    finally:
        s.stop()


@pytest.mark.slow
def test_the_serve_command(stories_dir):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "-m", str(stories_dir), "--port", str(port),
                             "--parallel", "1", "--ctx", "128"], cwd=root, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(root)})
    try:
        line = proc.stderr.readline()
        assert line.startswith(f"serving stories260K on http://127.0.0.1:{port}/v1"), line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        r = client.chat.completions.create(model="stories260K", messages=[{"role": "user", "content": "hi"}],
                                           max_tokens=4)
        assert r.usage.completion_tokens <= 4 and r.choices[0].message.role == "assistant"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "engine", "serve", "-m", "/nonexistent.gguf", "--port", str(port)],
                         cwd=root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(root)},
                         timeout=120)
    assert bad.returncode == 1 and "pocketinfer: error:" in bad.stderr and "nonexistent" in bad.stderr
