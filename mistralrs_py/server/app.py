"""The Starlette app: OpenAI-compatible routes over one engine. The lifespan starts and stops it."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional

from pydantic import ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, RedirectResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import __version__
from ..engine.engine import Engine
from ..engine.request import Delta, Done, SamplingParams
from ..pipeline.base import Pipeline
from ..pipeline.tokenizer import ChatTemplateError
from . import protocol as P
from .metrics import HTTPMetricsMiddleware, Metrics, NoMetrics
from .streaming import (Accounting, Choice, chat_completion, GenerationError, chat_chunk, chat_logprobs, completion_chunk, completion_logprobs,
                        generate, new_id, now, usage)

log = logging.getLogger("mistralrs.server")
UI_DIR = Path(__file__).with_name("ui")


@dataclass
class ServerConfig:
    served_model_name: str
    truncate_sequence: bool = False
    repeat_last_n: int = 64
    log_file: Optional[str] = None
    metrics: bool = True  # GET /metrics (Prometheus); --no-metrics turns it off
    ui: bool = True  # the chat page at /ui; --no-ui turns it off
    max_seqs: int = 16
    max_waiting: int = 256  # sequences that may wait for a slot; more get 503 + Retry-After
    max_body_bytes: int = 2 * 1024 * 1024
    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()
    shutdown_timeout: float = 10.0  # SIGTERM: in-flight requests may finish for this long


class RequestLog:
    """Appends one JSON line per request/response. NOTE: JSON-encoding means request text can never
    forge a log line (newlines inside strings are escaped)."""

    def __init__(self, path: Optional[str]):
        self.path = path
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        if not self.path:
            return
        line = json.dumps({"time": time.time(), **record}, ensure_ascii=False)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class Server:
    def __init__(self, engine: Engine, pipeline: Pipeline, cfg: ServerConfig):
        self.engine, self.pipe, self.cfg = engine, pipeline, cfg
        self.tok = pipeline.tokenizer
        self.reqlog = RequestLog(cfg.log_file)
        self.metrics = Metrics(engine, cfg.served_model_name) if cfg.metrics else NoMetrics()
        self.acct = Accounting()
        self.shutting_down = False

    def admit(self, sequences: int) -> None:
        """NOTE: a bounded queue: past --max-waiting, answer 503 at once (with Retry-After) rather
        than let requests pile up behind a busy engine."""
        if self.shutting_down:
            raise P.InvalidRequest("the server is shutting down", None, 503, "server_error", "shutting_down")
        if not self.engine.alive:
            raise P.InvalidRequest("the engine is not running", None, 503, "server_error", "engine_unavailable")
        # NOTE: counted in sequences (n > 1 takes n slots); an idle server admits any one request.
        if self.acct.outstanding and self.acct.outstanding + sequences > self.cfg.max_seqs + self.cfg.max_waiting:
            self.acct.rejected += 1
            raise P.InvalidRequest("the server is overloaded: too many requests are waiting; retry shortly",
                                   None, 503, "server_error", "server_overloaded", headers={"Retry-After": "1"})

    def submit(self, ids: list[int], params: SamplingParams, rid: str):
        return self.metrics.track(generate(self.engine, ids, params, rid, self.acct), len(ids), params.n)

    # ---- request preparation ---------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in (self.cfg.served_model_name, "default"):
            raise P.InvalidRequest(f"The model `{name}` does not exist. This server serves `{self.cfg.served_model_name}`.",
                                   "model", 404, "not_found_error", "model_not_found")

    def fit_context(self, ids: list[int], max_tokens: Optional[int]) -> list[int]:
        return P.fit_context(ids, max_tokens, self.engine.max_len, self.cfg.truncate_sequence)

    def sampling(self, req: P.SamplingFields, logprobs: bool, top: int) -> SamplingParams:
        return req.to_sampling_params(repeat_last_n=self.cfg.repeat_last_n, vocab_size=self.tok.vocab_size,
                                      logprobs=logprobs, top_logprobs=top)

    # ---- routes ------------------------------------------------------------------------------------
    async def chat(self, request: Request):
        body = await read_json(request)
        req = validate(P.ChatCompletionRequest, body)
        self.check_model(req.model)
        messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            ids = self.tok.encode_chat(messages, add_generation_prompt=req.add_generation_prompt,
                                       **(req.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise P.InvalidRequest(str(e), "messages") from None
        ids = self.fit_context(ids, req.wanted_max_tokens())
        params = self.sampling(req, req.logprobs, req.top_logprobs or 0)
        rid, created = new_id("chatcmpl"), now()
        self.admit(params.n)
        events = self.submit(ids, params, rid)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self.sse(self.chat_stream(events, rid, created, ids, params, include_usage, req), body, "chat")
        choices = await collect(request, events, params.n)
        resp = chat_completion(rid, created, self.cfg.served_model_name, choices, self.tok, params.logprobs, len(ids),
                               lambda c: extras(c, req))
        self.reqlog.write({"endpoint": "/v1/chat/completions", "request": body, "response": resp})
        return JSONResponse(resp)

    async def chat_stream(self, events, rid, created, ids, params, include_usage, req) -> AsyncIterator[dict]:
        model = self.cfg.served_model_name
        out = {i: Choice(i) for i in range(params.n)}
        for i in range(params.n):
            yield chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""})
        async for ev in events:
            out[ev.index].add(ev)
            if isinstance(ev, Delta) and (ev.text or ev.logprobs):
                lp = chat_logprobs(self.tok, ev.logprobs or []) if params.logprobs else None
                yield chat_chunk(rid, created, model, ev.index, {"content": ev.text}, None, lp)
            elif isinstance(ev, Done):
                chunk = chat_chunk(rid, created, model, ev.index, {}, out[ev.index].finish_reason)
                chunk["choices"][0].update(extras(out[ev.index], req))
                yield chunk
        if include_usage:
            yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
                   "usage": usage(len(ids), sum(c.completion_tokens for c in out.values()))}

    async def completions(self, request: Request):
        body = await read_json(request)
        req = validate(P.CompletionRequest, body)
        self.check_model(req.model)
        if req.suffix:
            raise P.InvalidRequest("suffix is not supported", "suffix")
        if req.echo and req.logprobs is not None:
            # NOTE: OpenAI would also return the prompt tokens' logprobs; rather than a silently
            # partial answer, say so (prefill keeps only the last row's logits today).
            raise P.InvalidRequest("echo together with logprobs is not supported yet; use one or the other", "echo")
        prompts = []
        for p in req.prompts():
            if isinstance(p, str):
                ids = self.tok.encode(p)
            else:
                bad = [t for t in p if not 0 <= t < self.tok.vocab_size]
                if bad:
                    raise P.InvalidRequest(f"prompt token id {bad[0]} is outside the vocabulary", "prompt")
                ids = list(p)
            prompts.append(self.fit_context(ids, req.max_tokens))
        top = req.logprobs or 0
        params = self.sampling(req, req.logprobs is not None, top)
        rid, created = new_id("cmpl"), now()
        n = params.n
        echo = [self.tok.decode(ids) if req.echo else "" for ids in prompts]
        self.admit(n * len(prompts))
        streams = [self.submit(ids, params, f"{rid}-{k}")
                   for k, ids in enumerate(prompts)]
        events = merge(streams, n)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return self.sse(self.completion_stream(events, rid, created, prompts, params, echo, include_usage, req), body, "completions")
        choices = await collect(request, events, n * len(prompts))
        resp = {
            "id": rid, "object": "text_completion", "created": created, "model": self.cfg.served_model_name,
            "system_fingerprint": f"mistralrs-py-{__version__}",
            "choices": [{
                "index": c.index,
                "text": echo[c.index // n] + c.text,
                "logprobs": completion_logprobs(self.tok, c.logprobs, len(echo[c.index // n])) if params.logprobs else None,
                "finish_reason": c.finish_reason,
                **extras(c, req),
            } for c in choices],
            "usage": usage(sum(len(p) for p in prompts) * 1, sum(c.completion_tokens for c in choices)),
        }
        self.reqlog.write({"endpoint": "/v1/completions", "request": body, "response": resp})
        return JSONResponse(resp)

    async def completion_stream(self, events, rid, created, prompts, params, echo, include_usage, req):
        model, n = self.cfg.served_model_name, params.n
        out: dict[int, Choice] = {}
        offsets = {i: len(echo[i // n]) for i in range(n * len(prompts))}
        for i in range(n * len(prompts)):
            if echo[i // n]:
                yield completion_chunk(rid, created, model, i, echo[i // n])
        async for ev in events:
            c = out.setdefault(ev.index, Choice(ev.index))
            c.add(ev)
            if isinstance(ev, Delta) and (ev.text or ev.logprobs):
                lp = completion_logprobs(self.tok, ev.logprobs or [], offsets[ev.index]) if params.logprobs else None
                offsets[ev.index] += len(ev.text)
                yield completion_chunk(rid, created, model, ev.index, ev.text, None, lp)
            elif isinstance(ev, Done):
                chunk = completion_chunk(rid, created, model, ev.index, "", c.finish_reason)
                chunk["choices"][0].update(extras(c, req))
                yield chunk
        if include_usage:
            yield {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [],
                   "usage": usage(sum(len(p) for p in prompts), sum(c.completion_tokens for c in out.values()))}

    def sse(self, chunks: AsyncIterator[dict], body: dict, endpoint: str) -> EventSourceResponse:
        reqlog = self.reqlog

        async def frames():
            texts: dict[int, str] = {}
            status = "completed"
            try:
                async for chunk in chunks:
                    for ch in chunk.get("choices", []):
                        texts[ch["index"]] = texts.get(ch["index"], "") + (ch.get("text") or (ch.get("delta") or {}).get("content") or "")
                    yield {"data": json.dumps(chunk, ensure_ascii=False)}
            except GenerationError as e:
                status = "error"
                yield {"data": json.dumps(P.error_body(e.message, "server_error", None, e.code))}
            except asyncio.CancelledError:
                status = "aborted"
                raise
            finally:
                reqlog.write({"endpoint": f"/v1/{endpoint}", "request": body, "stream": True, "status": status,
                              "response": {"choices": [{"index": i, "text": t} for i, t in sorted(texts.items())]}})
            yield {"data": "[DONE]"}

        # NOTE: on shutdown, streams keep going for the grace period: by then the engine has ended
        # them with an error event (see launch.GracefulServer), so clients see a clean end.
        return EventSourceResponse(frames(), sep="\n", ping=15, shutdown_grace_period=self.cfg.shutdown_timeout + 2)

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{
            "id": self.cfg.served_model_name, "object": "model", "created": now(), "owned_by": "mistralrs-py",
            "max_model_len": self.engine.max_len}]})

    async def health(self, request: Request):
        if not self.engine.alive:
            return JSONResponse(P.error_body("the engine is not running", "server_error", None, "engine_unavailable"), 503)
        if self.shutting_down:
            return JSONResponse(P.error_body("the server is shutting down", "server_error", None, "shutting_down"), 503)
        return JSONResponse({"status": "ok", **self.engine.snapshot(), "requests": self.acct.as_dict()})

    async def version(self, request: Request):
        return JSONResponse({"version": __version__})

    async def tokenize(self, request: Request):
        req = validate(P.TokenizeRequest, await read_json(request))
        self.check_model(req.model)
        if req.messages is not None:
            msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
            try:
                ids = self.tok.encode_chat(msgs, add_generation_prompt=req.add_generation_prompt)
            except ChatTemplateError as e:
                raise P.InvalidRequest(str(e), "messages") from None
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": self.engine.max_len, "tokens": ids})

    async def detokenize(self, request: Request):
        req = validate(P.DetokenizeRequest, await read_json(request))
        self.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise P.InvalidRequest(f"token id {bad[0]} is outside the vocabulary", "tokens")
        return JSONResponse({"prompt": self.tok.decode(req.tokens, skip_special_tokens=False)})

    async def openapi(self, request: Request):
        return JSONResponse(openapi_document())


# ---- helpers -------------------------------------------------------------------------------------
def extras(choice: Choice, req: P.SamplingFields) -> dict:
    """Extension fields of a finished choice that the request asked for."""
    if req.return_xlora_scalings and choice.extra and "xlora_scalings" in choice.extra:
        return {"xlora_scalings": choice.extra["xlora_scalings"]}
    return {}


async def read_json(request: Request) -> dict:
    """The body as a JSON object. NOTE: the size limit is checked on Content-Length and again while
    reading, so an oversized body is refused without being buffered whole."""
    limit = request.app.state.server.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = P.InvalidRequest(f"request body is larger than {limit} bytes", None, 413, "invalid_request_error",
                               "request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    raw = b"".join(chunks)
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise P.InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise P.InvalidRequest("request body must be a JSON object")
    return body


def validate(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        raise P.InvalidRequest(f"{loc or 'body'}: {err['msg']}", loc or None) from None


def _is_union_tag(part) -> bool:
    """pydantic puts the member type of a union into error locations ('str', 'list[int]', ...)."""
    if not isinstance(part, str):
        return False
    return part in ("str", "int", "float", "bool", "none") or part.startswith(
        ("list[", "dict[", "tuple[", "function-", "constrained-", "tagged-union"))


async def collect(request: Request, events: AsyncIterator, n: int) -> list[Choice]:
    """Gathers a non-streaming answer; NOTE: a client that disconnects meanwhile aborts it."""
    choices: dict[int, Choice] = {}

    async def consume():
        async for ev in events:
            choices.setdefault(ev.index, Choice(ev.index)).add(ev)

    task = asyncio.ensure_future(consume())
    try:
        while not task.done():
            # NOTE: every 0.1 s: a small model finishes a long answer in well under a second, and
            # a gone client's slot should be freed before that
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await request.is_disconnected():
                task.cancel()
        await task
    except GenerationError as e:
        raise P.InvalidRequest(e.message, None, 503 if e.code == "engine_unavailable" else 500, "server_error", e.code) from None
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await events.aclose()
    return [choices[i] for i in sorted(choices)]


async def merge(streams: list[AsyncIterator], n: int) -> AsyncIterator:
    """Interleaves the events of several prompts' requests, renumbering choices prompt-major."""
    if len(streams) == 1:
        async for ev in streams[0]:
            yield ev
        return
    queue: asyncio.Queue = asyncio.Queue()
    sentinel = object()

    async def pump(k: int, s):
        try:
            async for ev in s:
                ev.index = k * n + ev.index
                await queue.put(ev)
        except BaseException as e:  # noqa: BLE001 - forwarded to the consumer
            await queue.put(e)
        finally:
            await queue.put(sentinel)

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is sentinel:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            with contextlib.suppress(BaseException):
                await s.aclose()


def openapi_document() -> dict:
    from pydantic.json_schema import models_json_schema

    models = [P.ChatCompletionRequest, P.CompletionRequest, P.TokenizeRequest, P.DetokenizeRequest]
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template="#/components/schemas/{model}")

    def op(name: str, summary: str) -> dict:
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}},
            "responses": {"200": {"description": "OK"}, "400": {"description": "Invalid request (OpenAI error JSON)"}}}}

    return {
        "openapi": "3.1.0",
        "info": {"title": "mistralrs-py", "version": __version__},
        "paths": {
            "/v1/chat/completions": op("ChatCompletionRequest", "Chat completion (OpenAI)"),
            "/v1/completions": op("CompletionRequest", "Text completion (OpenAI)"),
            "/tokenize": op("TokenizeRequest", "Tokenize a prompt or messages"),
            "/detokenize": op("DetokenizeRequest", "Detokenize token ids"),
            "/v1/models": {"get": {"summary": "Served models", "responses": {"200": {"description": "OK"}}}},
            "/health": {"get": {"summary": "Engine health", "responses": {"200": {"description": "OK"}, "503": {"description": "Engine down"}}}},
            "/version": {"get": {"summary": "Server version", "responses": {"200": {"description": "OK"}}}},
        },
        "components": {"schemas": schemas.get("$defs", {})},
    }


class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on the API routes and /metrics; /health, /version and the UI's
    static files stay open. NOTE: compared in constant time; the key is never logged."""

    PROTECTED = ("/v1/", "/metrics", "/tokenize", "/detokenize")

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or not scope["path"].startswith(self.PROTECTED):
            return await self.app(scope, receive, send)
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            return await self.app(scope, receive, send)
        body = P.error_body("Incorrect or missing API key: send it as `Authorization: Bearer KEY`.",
                            "authentication_error", None, "invalid_api_key")
        resp = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


async def to_ui(request: Request):
    return RedirectResponse("ui/")  # NOTE: relative, so it also works behind a path prefix


def create_app(engine: Engine, pipeline: Pipeline, cfg: ServerConfig) -> Starlette:
    srv = Server(engine, pipeline, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if engine._thread is None:
            engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    async def invalid(request, exc: P.InvalidRequest):
        return JSONResponse(P.error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)

    async def http_error(request, exc: HTTPException):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
        return JSONResponse(P.error_body(str(exc.detail), kind), exc.status_code, headers=getattr(exc, "headers", None))

    async def server_error(request, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(P.error_body("internal server error", "server_error"), 500)

    routes = [
        Route("/v1/chat/completions", srv.chat, methods=["POST"]),
        Route("/v1/completions", srv.completions, methods=["POST"]),
        Route("/v1/models", srv.models, methods=["GET"]),
        Route("/health", srv.health, methods=["GET"]),
        Route("/version", srv.version, methods=["GET"]),
        Route("/tokenize", srv.tokenize, methods=["POST"]),
        Route("/detokenize", srv.detokenize, methods=["POST"]),
        Route("/openapi.json", srv.openapi, methods=["GET"]),
    ]
    middleware = []
    if cfg.allowed_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["*"],
                                     allow_headers=["*"]))
    if cfg.api_key:
        middleware.append(Middleware(APIKeyMiddleware, key=cfg.api_key))
    if isinstance(srv.metrics, Metrics):
        routes.append(Route("/metrics", srv.metrics.endpoint, methods=["GET"]))
        middleware.append(Middleware(HTTPMetricsMiddleware, metrics=srv.metrics))
    if cfg.ui:
        # NOTE: plain files shipped in the package (no build step, no CDN); `/` leads there, as in
        # llama.cpp's server, and the page calls the API with relative URLs.
        routes.append(Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"))
        routes.append(Route("/", to_ui, methods=["GET"]))
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware,
                    exception_handlers={P.InvalidRequest: invalid, HTTPException: http_error, Exception: server_error})
    app.state.server = srv
    return app
