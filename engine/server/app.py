"""The OpenAI-compatible HTTP API over one loaded model (`pocketinfer serve`), on starlette.

Endpoints: POST /v1/chat/completions and /v1/completions (stream=true as server-sent events in OpenAI's
chunk format, ending with `data: [DONE]`), GET /v1/models, GET /health. Errors are OpenAI's JSON shape,
{"error": {"message", "type", "param", "code"}}: 400 bad request, 401 wrong API key, 404 unknown model
or path, 503 while the model loads.

Concurrency: `slots` conversations (LLM.session) share the weights. A request takes the free slot whose
cache holds the longest prefix of its prompt, so a client continuing a conversation reuses its K/V;
slots generate at the same time, their forward passes interleaved token by token. When every slot is
busy, a request waits in line (its client sees nothing until its turn). A client that disconnects
mid-stream stops its generation after the token in flight, and its slot is free again.

A conversation longer than the context loses its oldest exchanges, never the system prompt
(engine/text/conversation.py); a single message longer than the context is a 400.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from engine.errors import ContextLengthError, PocketInferError
from engine.text.conversation import answer_room, fit_conversation, prompt_ids

SAMPLING = {"temperature": float, "top_p": float, "seed": int}


class APIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _bad_request(e: Exception) -> JSONResponse:
    """A request the library refused (ContextLengthError and other ValueErrors) as a 400."""
    code = "context_length_exceeded" if isinstance(e, ContextLengthError) else None
    return APIError(400, str(e), code=code).response()


class Model:
    """The model being served: loading in a thread (503 until then), then `slots` sessions over it."""

    def __init__(self, model_id: str, load, slots: int = 1):
        """load: a callable returning the LLM (engine.loader.load with the command's arguments)."""
        self.id = model_id
        self.llm = None
        self.error: str | None = None
        self.free: list = []
        self.limiter = anyio.CapacityLimiter(slots)
        self.ready = threading.Event()
        self._slots = slots
        threading.Thread(target=self._load, args=(load,), daemon=True, name="pocketinfer-load").start()

    def _load(self, load) -> None:
        try:
            llm = load()
        except (PocketInferError, OSError, ValueError, RuntimeError) as e:    # reported by /health and the CLI
            self.error = str(e).splitlines()[0] if str(e) else type(e).__name__
        else:
            self.free = [llm.session() for _ in range(self._slots)]
            self.llm = llm
        self.ready.set()

    def check(self, requested: str | None) -> None:
        if self.llm is None:
            why = (f"the model failed to load: {self.error}" if self.error
                   else "the model is still loading; retry shortly")
            raise APIError(503, why, "server_error", code="model_loading")
        if requested is not None and requested != self.id:
            raise APIError(404, f"the model {requested!r} does not exist; this server serves {self.id!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")

    def take(self, ids: list[int]):
        """The free session holding the longest prefix of ids (the caller holds a limiter token)."""
        best = max(range(len(self.free)), key=lambda i: self.free[i].cached_tokens(ids))
        return self.free.pop(best)


def _field(body: dict, name: str, kind, default=None):
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise APIError(400, f"field {name!r} must be {kind.__name__}, got {value!r}", param=name)
    return value


def _options(body: dict) -> dict:
    """The generation arguments of a request body, checked."""
    max_tokens = _field(body, "max_completion_tokens", int) or _field(body, "max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise APIError(400, f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise APIError(400, "field 'stop' must be a string or a list of strings", param="stop")
    if _field(body, "n", int, 1) != 1:
        raise APIError(400, "only n=1 is supported", param="n")
    opts = {k: _field(body, k, t) for k, t in SAMPLING.items() if body.get(k) is not None}
    return {"max_tokens": max_tokens, "stop": stop or None, **opts}


def _messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "field 'messages' must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):       # content parts: the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be an object with a string 'role' and text 'content'",
                           param=f"messages[{i}]")
        out.append({"role": m["role"], "content": content})
    return out


def _chat_ids(llm, messages: list[dict], max_tokens: int | None) -> list[int]:
    """The chat prompt's ids, the oldest exchanges dropped when the conversation outgrows the context."""
    ids = prompt_ids(llm.tokenizer, messages)
    limit = llm.n_ctx - answer_room(llm.n_ctx, max_tokens)
    if len(ids) <= limit:
        return ids
    messages, _ = fit_conversation(messages, lambda msgs: len(prompt_ids(llm.tokenizer, msgs)), limit)
    return prompt_ids(llm.tokenizer, messages)


def create_app(model: Model, api_key: str | None = None) -> Starlette:
    def check_key(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    async def run(request: Request, chat: bool):
        try:
            check_key(request)
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise APIError(400, "the request body must be a JSON object")
            model.check(body.get("model"))
            opts = _options(body)
            llm = model.llm
            if chat:
                ids = _chat_ids(llm, _messages(body), opts["max_tokens"])
            else:
                prompt = body.get("prompt")
                if not isinstance(prompt, str) or not prompt:
                    raise APIError(400, "field 'prompt' must be a non-empty string", param="prompt")
                ids = llm.tokenizer.encode(prompt)
            stream = bool(body.get("stream"))
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        except APIError as e:
            return e.response()
        except (ValueError, TypeError) as e:
            return _bad_request(e)
        return await _generate(model, ids, opts, chat, stream, include_usage)

    async def chat_completions(request: Request):
        return await run(request, chat=True)

    async def completions(request: Request):
        return await run(request, chat=False)

    async def models(request: Request):
        try:
            check_key(request)
        except APIError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [{"id": model.id, "object": "model", "created": 0,
                                                         "owned_by": "pocketinfer"}]})

    async def health(request: Request):
        if model.llm is None:
            return JSONResponse({"status": "error" if model.error else "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def no_route(request: Request, exc):
        return APIError(exc.status_code, f"no route {request.method} {request.url.path}", code="not_found").response()

    routes = [Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]), Route("/health", health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={404: no_route, 405: no_route})


class _Producer:
    """Runs one request's generation in its own thread and hands the chunks to the event loop through a
    queue, so that sending a token never delays computing the next. stop() ends it after the token in
    flight; `done` runs on the event loop once the generation has really ended (the slot is free again)."""

    END = object()

    def __init__(self, chunks, done):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(chunks, done), daemon=True, name="pocketinfer-gen")
        self.thread.start()

    def _run(self, chunks, done) -> None:
        last = self.END
        try:
            for chunk in chunks:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, chunk)
                if self.stopped.is_set():
                    break
        except Exception as e:      # noqa: BLE001 -- the thread's edge: the request re-raises it (400, 500 or a cut)
            last = e
        finally:
            chunks.close()
            self.loop.call_soon_threadsafe(self.queue.put_nowait, last)
            self.loop.call_soon_threadsafe(done)

    async def next(self):
        """The next chunk, None at the end; raises what the generation raised."""
        item = await self.queue.get()
        if item is self.END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def stop(self) -> None:
        self.stopped.set()


async def _generate(model: Model, ids: list[int], opts: dict, chat: bool, stream: bool, include_usage: bool):
    """Run one request on a slot: the whole answer as JSON, or its chunks as server-sent events."""
    limiter_token = object()
    await model.limiter.acquire_on_behalf_of(limiter_token)
    session = model.take(ids)

    def free_slot():
        model.free.append(session)
        model.limiter.release_on_behalf_of(limiter_token)

    producer = _Producer(session.stream(ids, **opts), free_slot)
    try:
        first = await producer.next()                       # errors before any byte is sent
    except ValueError as e:
        return _bad_request(e)
    except BaseException:
        producer.stop()
        raise
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    kind = "chat.completion" if chat else "text_completion"

    def usage(stats):
        return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
                "total_tokens": stats.prompt_tokens + stats.generated_tokens}

    if not stream:
        parts, last = [], first
        try:
            chunk = first
            while chunk is not None:
                parts.append(chunk.text)
                last = chunk
                chunk = await producer.next()
        finally:
            producer.stop()
        text = "".join(parts)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = last.finish_reason
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": model.id,
                             "choices": [choice], "usage": usage(last.stats)})

    def event(delta: dict | str, finish: str | None, stats=None) -> str:
        choice = ({"index": 0, "delta": delta} if chat else {"index": 0, "text": delta, "logprobs": None})
        choice["finish_reason"] = finish
        data = {"id": rid, "object": kind + ".chunk" if chat else kind, "created": created, "model": model.id,
                "choices": [choice]}
        if stats is not None:
            data["usage"] = usage(stats)
        return f"data: {json.dumps(data)}\n\n"

    async def events():
        try:
            if chat:
                yield event({"role": "assistant", "content": ""}, None)
            chunk = first
            while chunk is not None:
                if chunk.text:
                    yield event({"content": chunk.text} if chat else chunk.text, None)
                if chunk.finish_reason:
                    yield event({} if chat else "", chunk.finish_reason, chunk.stats if include_usage else None)
                chunk = await producer.next()
            yield "data: [DONE]\n\n"
        finally:
            producer.stop()       # also when the client went away: the generation stops after its token

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
