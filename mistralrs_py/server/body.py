"""Reading a request body as JSON: the media type, the size limit and the parser's limits."""

from __future__ import annotations

import json
import math

from starlette.requests import Request

from ..openai.protocol import InvalidRequest

MAX_NUMBER_CHARS = 40  # no number in our API needs more (a 64-bit seed has 20 digits)


def _number(text: str):
    if len(text) > MAX_NUMBER_CHARS:
        raise InvalidRequest(f"request body has a number of {len(text)} characters; at most {MAX_NUMBER_CHARS}")
    if text.lstrip("-").isdigit():
        return int(text)
    value = float(text)
    if not math.isfinite(value):  # NOTE: 1e999 parses as infinity
        raise InvalidRequest(f"request body has a number out of range: {text}")
    return value


def _constant(name: str):
    raise InvalidRequest(f"request body is not valid JSON: {name} is not a JSON value")


async def read_json(request: Request) -> dict:
    """The body as a JSON object.

    NOTE: only `Content-Type: application/json`: a web page can POST text/plain or form bodies to a
    local server without a CORS preflight, so accepting them would let any page drive this one. The
    size limit is checked on Content-Length and again while reading, so an oversized body is refused
    without being buffered whole."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise InvalidRequest(
            f"send the body as JSON with `Content-Type: application/json` (got {media or 'none'!r})",
            None,
            415,
            "invalid_request_error",
            "unsupported_media_type",
        )
    limit = request.app.state.server.cfg.max_body_bytes
    declared = request.headers.get("content-length")
    too_big = InvalidRequest(
        f"request body is larger than {limit} bytes", None, 413, "invalid_request_error", "request_too_large"
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return await request.app.state.server.offload(parse_json, b"".join(chunks))


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw, parse_int=_number, parse_float=_number, parse_constant=_constant)
    except InvalidRequest:
        raise
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise InvalidRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise InvalidRequest("request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    return body
