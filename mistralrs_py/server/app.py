"""The Starlette app: OpenAI-compatible routes over one OpenAIService. HTTP only: what a request
means is decided in mistralrs_py/openai, how it runs in mistralrs_py/engine."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..engine.client import GenerationFailed
from ..engine.grammar import GRAMMAR_LIMIT
from ..openai.protocol import InvalidRequest, error_body
from ..openai.service import OpenAIService
from . import completions, info
from .metrics import HTTPMetricsMiddleware, Metrics
from .middleware import APIKeyMiddleware, JSONCORSMiddleware
from .request_log import RequestLog

log = logging.getLogger("mistralrs.server")
_access = logging.getLogger("uvicorn.access")
UI_DIR = Path(__file__).with_name("ui")
# NOTE: engine refusals that are the server's state, not the request's fault: 503 (retry later)
_UNAVAILABLE = {"engine_unavailable", "server_overloaded", "shutting_down"}


@dataclass
class ServerConfig:
    log_file: Optional[str] = None
    metrics: bool = True  # GET /metrics (Prometheus); --no-metrics turns it off
    ui: bool = True  # the chat page at /ui; --no-ui turns it off
    max_body_bytes: int = 2 * 1024 * 1024
    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()
    shutdown_timeout: float = 10.0  # SIGTERM: in-flight requests may finish for this long


class ServerState:
    """What the routes share (`request.app.state.server`)."""

    def __init__(self, service: OpenAIService, cfg: ServerConfig):
        self.service, self.cfg = service, cfg
        self.client = service.client
        self.reqlog = RequestLog(cfg.log_file)
        self.metrics = Metrics(self.client, service.model_name) if cfg.metrics else None
        if self.metrics is not None:
            self.client.observe = self.metrics.observer
        self.shutting_down = False
        # NOTE: parsing bodies, rendering templates and tokenizing are CPU work: done here, off the
        # event loop, so a 2 MB prompt does not stall /health and every stream; two threads (the
        # machine this is built for has two cores, and the engine thread needs one of them)
        self.prep = ThreadPoolExecutor(max_workers=2, thread_name_prefix="mistralrs-prep")

    async def offload(self, fn, *args):
        """fn(*args) on the preparation threads."""
        return await asyncio.get_running_loop().run_in_executor(self.prep, fn, *args)

    def check_open(self) -> None:
        if self.shutting_down:
            raise GenerationFailed("the server is shutting down", "shutting_down")


async def to_ui(request: Request):
    return RedirectResponse("ui/")  # NOTE: relative, so it also works behind a path prefix


async def _invalid(request, exc: InvalidRequest):
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), exc.status, headers=exc.headers)


async def _failed(request, exc: GenerationFailed):
    if exc.code == GRAMMAR_LIMIT:  # NOTE: the client's grammar met a limit while the answer was written
        return JSONResponse(error_body(exc.message, "invalid_request_error", None, exc.code), 400)
    status = 503 if exc.code in _UNAVAILABLE else 500
    headers = {"Retry-After": "1"} if exc.code == "server_overloaded" else None
    return JSONResponse(error_body(exc.message, "server_error", None, exc.code), status, headers=headers)


async def _http_error(request, exc: HTTPException):
    kind = {401: "authentication_error", 404: "not_found_error"}.get(exc.status_code, "invalid_request_error")
    return JSONResponse(error_body(str(exc.detail), kind), exc.status_code, headers=getattr(exc, "headers", None))


async def _gone(request, exc: ClientDisconnect):
    # NOTE: the client went while its body was being read (or its chunked encoding broke off, which
    # the HTTP parser answered with a 400), or before its answer was ready (the engine has aborted
    # it): nobody is left to answer. One line in uvicorn's access log, with 499 as nginx counts it
    # (uvicorn itself writes no line for a response that nobody receives).
    client = request.client
    where = f"{client.host}:{client.port}" if client else "-"
    version = request.scope.get("http_version", "1.1")
    _access.info('%s - "%s %s HTTP/%s" %d', where, request.method, request.url.path, version, 499)
    return Response(status_code=499)


async def _server_error(request, exc: Exception):
    log.exception("unhandled error")
    return JSONResponse(error_body("internal server error", "server_error"), 500)


def create_app(service: OpenAIService, cfg: ServerConfig) -> Starlette:
    state = ServerState(service, cfg)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await asyncio.to_thread(service.client.stop)
            state.prep.shutdown(wait=False, cancel_futures=True)

    routes = [
        Route("/v1/chat/completions", completions.chat, methods=["POST"]),
        Route("/v1/completions", completions.completions, methods=["POST"]),
        Route("/v1/responses", completions.responses, methods=["POST"]),
        Route("/v1/models", info.models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", info.model, methods=["GET"]),
        Route("/tokenizer_info", info.tokenizer_info, methods=["GET"]),
        Route("/health", info.health, methods=["GET"]),
        Route("/version", info.version, methods=["GET"]),
        Route("/tokenize", info.tokenize, methods=["POST"]),
        Route("/detokenize", info.detokenize, methods=["POST"]),
        Route("/openapi.json", info.openapi, methods=["GET"]),
    ]
    middleware = []
    if cfg.allowed_origins:
        middleware.append(
            Middleware(
                JSONCORSMiddleware, allow_origins=list(cfg.allowed_origins), allow_methods=["*"], allow_headers=["*"]
            )
        )
    if cfg.api_key:
        middleware.append(Middleware(APIKeyMiddleware, key=cfg.api_key))
    if state.metrics is not None:
        routes.append(Route("/metrics", state.metrics.endpoint, methods=["GET"]))
        middleware.append(Middleware(HTTPMetricsMiddleware, metrics=state.metrics))
    if cfg.ui:
        # NOTE: plain files shipped in the package (no build step, no CDN); `/` leads there, as in
        # llama.cpp's server, and the page calls the API with relative URLs.
        routes.append(Mount("/ui", StaticFiles(directory=UI_DIR, html=True), name="ui"))
        routes.append(Route("/", to_ui, methods=["GET"]))
    handlers = {
        InvalidRequest: _invalid,
        GenerationFailed: _failed,
        HTTPException: _http_error,
        ClientDisconnect: _gone,
        Exception: _server_error,
    }
    app = Starlette(routes=routes, lifespan=lifespan, middleware=middleware, exception_handlers=handlers)
    app.state.server = state
    return app
