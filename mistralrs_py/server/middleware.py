"""ASGI middleware of our own: the API key check (CORS and metrics middleware live beside their users)."""

from __future__ import annotations

import hmac

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
        body = error_body("Incorrect or missing API key: send it as `Authorization: Bearer KEY`.",
                          "authentication_error", None, "invalid_api_key")
        resp = JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})
        await resp(scope, receive, send)
