"""ASGI middleware of our own: the API key check, and CORS whose refusals are OpenAI error JSON
(the metrics middleware lives with the metrics)."""

from __future__ import annotations

import hmac

from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse

from ..openai.protocol import error_body


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
        body = error_body(
            "Incorrect or missing API key: send it as `Authorization: Bearer KEY`.",
            "authentication_error",
            None,
            "invalid_api_key",
        )
        resp = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)


class JSONCORSMiddleware(CORSMiddleware):
    """Starlette's CORS, but a refused preflight is a 400 with OpenAI's error JSON, not plain text."""

    def preflight_response(self, request_headers):
        resp = super().preflight_response(request_headers)
        if resp.status_code < 400:
            return resp
        why = resp.body.decode("utf-8", "replace")
        headers = {k: v for k, v in resp.headers.items() if k.lower() not in ("content-length", "content-type")}
        return JSONResponse(
            error_body(f"CORS preflight refused: {why}", "invalid_request_error", None, "cors_refused"),
            resp.status_code,
            headers=headers,
        )
