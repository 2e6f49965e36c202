"""Reading a request body as JSON, within the size limit."""

from __future__ import annotations

import json

from starlette.requests import Request

from ..openai.protocol import InvalidRequest


async def read_json(request: Request) -> dict:
    """The body as a JSON object. NOTE: the size limit is checked on Content-Length and again while
    reading, so an oversized body is refused without being buffered whole."""
    limit = request.app.state.server.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = InvalidRequest(f"request body is larger than {limit} bytes", None, 413, "invalid_request_error",
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
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body
