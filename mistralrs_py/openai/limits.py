"""How large an answer one request may ask for.

An answer's logprobs grow as (sequences) x (tokens with logprobs) x (alternatives + 1): echo with
`logprobs: 20` over a 2,215-token prompt with n=128 is about 6 million entries, a 168 MB response,
and costs no generation at all (max_tokens 0). So, as OpenAI bounds `n` and `logprobs`, a request
may ask for at most MAX_LOGPROB_ENTRIES logprob entries (each one token's logprob or one of its
alternatives: some 20 to 60 bytes of JSON, so at most a few tens of MB), counted before anything runs:

    n x prompts x (prompt tokens x (prompt alternatives + 1), when the prompt's logprobs are asked for
                   + max_tokens x (top_logprobs + 1), when the output's logprobs are asked for)

where max_tokens, when the request leaves it out, is the room the context leaves after the prompt.
Past that the request is refused with a 400 naming the parameter that weighs most.

An answer under the bound can still take seconds to assemble and encode: `json_answer` builds it on
a worker thread, in pieces, so the event loop (other streams, /health) never waits for it.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import TYPE_CHECKING, Awaitable, Callable, Iterator

from ..engine.request import Event, SamplingParams
from . import protocol as P

if TYPE_CHECKING:
    from .responses import Assembler
    from .service import Generation

MAX_LOGPROB_ENTRIES = 1_000_000


def logprob_entries(prompts: list[list[int]], params: SamplingParams, max_len: int) -> tuple[int, int]:
    """-> (the prompts' entries, the outputs' entries) an answer may hold, every choice counted."""
    prompt = output = 0
    for ids in prompts:
        if params.prompt_logprobs is not None:
            prompt += params.n * len(ids) * (params.prompt_logprobs + 1)
        if params.logprobs:
            room = max(max_len - len(ids), 0)
            generated = min(params.max_tokens, room) if params.max_tokens is not None else room
            output += params.n * generated * (params.top_logprobs + 1)
    return prompt, output


def check_answer_size(
    prompts: list[list[int]], params: SamplingParams, max_len: int, prompt_param: str, output_param: str
) -> None:
    """Refuses (InvalidRequest, 400) a request whose answer could hold more than MAX_LOGPROB_ENTRIES
    logprob entries; `prompt_param` and `output_param` are the request's names for the prompt's and
    the output's logprobs, the one that weighs most is named."""
    prompt, output = logprob_entries(prompts, params, max_len)
    total = prompt + output
    if total <= MAX_LOGPROB_ENTRIES:
        return
    param = prompt_param if prompt >= output else output_param
    raise P.InvalidRequest(
        f"this request asks for up to {total:,} logprob entries (n={params.n} x {len(prompts)} prompt(s) x "
        f"(prompt tokens x (prompt logprobs + 1) + max_tokens x (top logprobs + 1))); one answer may hold at "
        f"most {MAX_LOGPROB_ENTRIES:,}: lower {param}, n or max_tokens",
        param,
    )


def check_chat(req: P.ChatCompletionRequest, ids: list[int], params: SamplingParams, max_len: int) -> None:
    check_answer_size([ids], params, max_len, "prompt_logprobs", "top_logprobs" if req.top_logprobs else "logprobs")


def check_completion(req: P.CompletionRequest, prompts: list[list[int]], params: SamplingParams, max_len: int) -> None:
    # NOTE: echo with logprobs reports the prompt's logprobs under `logprobs`; vLLM's field under its
    # own name; with both, the engine computes the larger number of alternatives
    echoed = req.logprobs if req.echo and req.logprobs is not None else -1
    asked = req.prompt_logprobs if req.prompt_logprobs is not None else -1
    prompt_param = "prompt_logprobs" if asked > echoed else "logprobs"
    check_answer_size(prompts, params, max_len, prompt_param, "logprobs")


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
