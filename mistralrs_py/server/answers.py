"""A non-streamed answer, assembled and JSON-encoded off the event loop: with echo and logprobs one
can hold a million entries and take seconds, which other streams and /health must not wait for
(openai/limits.py bounds how large it may be).

    content = await json_answer(gen, state.offload, log)   # bytes, as JSONResponse would send them
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

from ..engine.request import Event

if TYPE_CHECKING:
    from ..openai.responses import Assembler
    from ..openai.service import Generation


async def json_answer(gen: "Generation", offload: Callable[..., Awaitable], log: Callable[[dict], None]) -> bytes:
    """Generation.aresponse() as JSON bytes (what starlette's JSONResponse would send), with only the
    waiting on the event loop: the events are kept as they arrive, then `offload` (a worker thread)
    feeds them to the assembler, builds the answer, hands it to `log` and encodes it.
    NOTE: feeding is costly too (with echo, each choice's first chunk formats the prompt's logprobs);
    the assembler is touched by one thread at a time (the loop is done with it before the worker);
    the answer's objects are freed on the worker too (millions of them take a while)."""
    events = gen.submit(asyncio.get_running_loop())
    got: list[Event] = []
    try:
        async for ev in events:
            got.append(ev)
    finally:
        await events.aclose()
    return await offload(_build, gen.assembler, got, log)


def _build(assembler: "Assembler", events: list[Event], log: Callable[[dict], None]) -> bytes:
    for ev in events:
        assembler.feed(ev)
    answer = assembler.response()
    log(answer)
    return "".join(encode(answer)).encode("utf-8")


_dumps = functools.partial(json.dumps, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def encode(o, depth: int = 0) -> Iterator[str]:
    """The pieces of json.dumps(o) with JSONResponse's options. NOTE: the C encoder holds the GIL for
    a whole call, so one call over a large answer stops the event loop's thread as surely as running
    on it: the outer containers are walked here, and what lies deeper is encoded in slices of at
    most 256 list items, each a few milliseconds at most."""
    if depth < 4 and isinstance(o, dict):
        yield "{"
        for i, (k, v) in enumerate(o.items()):
            yield f"{',' if i else ''}{_dumps({k: 0})[1:-3]}:"  # NOTE: json's own key text (1 -> "1")
            yield from encode(v, depth + 1)
        yield "}"
    elif depth < 4 and isinstance(o, list):
        yield "["
        for i, v in enumerate(o):
            if i:
                yield ","
            yield from encode(v, depth + 1)
        yield "]"
    elif isinstance(o, list) and len(o) > 256:
        yield "["
        for i in range(0, len(o), 256):
            yield f"{',' if i else ''}{_dumps(o[i : i + 256])[1:-1]}"
        yield "]"
    else:
        yield _dumps(o)
