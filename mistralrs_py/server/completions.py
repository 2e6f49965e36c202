"""POST /v1/chat/completions, /v1/completions and /v1/responses: a JSON answer, or Server-Sent Events."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import AsyncIterator, Awaitable

from sse_starlette.sse import EventSourceResponse
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from ..engine.client import GenerationFailed
from ..engine.grammar import GRAMMAR_LIMIT
from ..openai.protocol import error_body
from ..openai.service import Generation
from .answers import json_answer
from .body import read_json


async def chat(request: Request):
    return await _generate(request, "chat/completions")


async def completions(request: Request):
    return await _generate(request, "completions")


async def responses(request: Request):
    return await _generate(request, "responses")


async def _generate(request: Request, endpoint: str):
    state = request.app.state.server
    body = await read_json(request)
    service = state.service
    prepare = {"chat/completions": service.chat, "completions": service.completion, "responses": service.responses}
    gen = await state.offload(prepare[endpoint], body)
    state.check_open()
    if gen.stream:
        return _sse(state, gen, gen.achunks(), body, endpoint)
    # NOTE: the answer is assembled, logged and encoded on the preparation threads: a large one (echo
    # with logprobs) takes seconds, which the event loop (other streams, /health) must not wait for
    record = {"endpoint": f"/v1/{endpoint}", "request": body}
    try:
        content = await _unless_disconnected(
            request, json_answer(gen, state.offload, lambda resp: state.reqlog.write({**record, "response": resp}))
        )
    except ClientDisconnect:
        state.reqlog.write({"endpoint": f"/v1/{endpoint}", "request": body, "status": "aborted"})
        raise
    return Response(content, media_type="application/json")


async def _unless_disconnected(request: Request, work: Awaitable[dict]) -> dict:
    """Runs a non-streaming answer; NOTE: a client that disconnects meanwhile cancels it, which
    aborts the request in the engine (and frees its cache slot), and raises ClientDisconnect: the
    app's handler writes one 499 line in the access log, where a cancelled task logged a traceback."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            # NOTE: every 0.1 s: a small model finishes a long answer in well under a second, and
            # a gone client's slot should be freed before that
            await asyncio.wait({task}, timeout=0.1)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                raise ClientDisconnect()
        return await task
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


def _sse(state, gen: Generation, chunks: AsyncIterator[dict], body: dict, endpoint: str) -> EventSourceResponse:
    # NOTE: the Responses API streams typed events (`event:` is the data's type) and ends without [DONE]
    typed = endpoint == "responses"

    async def frames():
        status = "completed"
        try:
            async for chunk in chunks:
                frame = {"data": json.dumps(chunk, ensure_ascii=False)}
                yield {"event": chunk["type"], **frame} if typed else frame
        except GenerationFailed as e:
            status = "error"
            if typed:
                err = gen.assembler.error(e.message, e.code)
                yield {"event": err["type"], "data": json.dumps(err)}
            else:
                kind = "invalid_request_error" if e.code == GRAMMAR_LIMIT else "server_error"
                yield {"data": json.dumps(error_body(e.message, kind, None, e.code))}
        except (asyncio.CancelledError, GeneratorExit):
            status = "aborted"
            raise
        finally:
            await chunks.aclose()  # NOTE: a stream left early aborts the request in the engine
            state.reqlog.write(
                {
                    "endpoint": f"/v1/{endpoint}",
                    "request": body,
                    "stream": True,
                    "status": status,
                    "response": {"choices": gen.assembler.texts()},
                }
            )
        if not typed:
            yield {"data": "[DONE]"}

    # NOTE: on shutdown, streams keep going for the grace period: by then the engine has ended
    # them with an error event (see launch.GracefulServer), so clients see a clean end.
    return EventSourceResponse(frames(), sep="\n", ping=15, shutdown_grace_period=state.cfg.shutdown_timeout + 3)
