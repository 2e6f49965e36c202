"""The bridge from the engine thread to asyncio, and engine events -> OpenAI response objects/chunks."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from ..engine.engine import Engine, EngineDead
from ..engine.request import Delta, Done, Error, Event, Request, SamplingParams, TokenLogprob
from ..pipeline.tokenizer import Tokenizer


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class GenerationError(Exception):
    def __init__(self, message: str, code: str = "server_error"):
        super().__init__(message)
        self.message, self.code = message, code


@dataclass
class Accounting:
    """Server-side request counts: every accepted request ends exactly once as completed, errored
    or aborted. `outstanding` counts sequences accepted and not yet ended (admission control)."""

    accepted: int = 0
    completed: int = 0
    errored: int = 0
    aborted: int = 0
    rejected: int = 0
    outstanding: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class EngineStream:
    """One request submitted to the engine (at construction, so a dead engine is an error before
    any response byte), iterated as its events until every choice is done.

    NOTE: aclose() before the end (client gone, task cancelled) aborts the request in the engine,
    which frees its cache slot within a step."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 accounting: Accounting | None = None):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self.engine, self.request_id, self.n = engine, request_id, params.n
        self.acct = accounting or Accounting()

        def emit(ev: Event) -> None:  # engine thread
            try:
                loop.call_soon_threadsafe(self._queue.put_nowait, ev)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        try:
            engine.add_request(Request(request_id, prompt_ids, params, emit))
        except EngineDead:
            raise GenerationError("the engine is not running", "engine_unavailable") from None
        self._remaining, self._ended = params.n, False
        self.acct.accepted += 1
        self.acct.outstanding += self.n

    def _end(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            self.acct.outstanding -= self.n
            setattr(self.acct, outcome, getattr(self.acct, outcome) + 1)

    def __aiter__(self):
        return self

    async def __anext__(self) -> Event:
        if self._ended or not self._remaining:
            self._end("completed")
            raise StopAsyncIteration
        ev = await self._queue.get()
        if isinstance(ev, Error):
            self._end("errored")
            raise GenerationError(ev.message, ev.code)
        if isinstance(ev, Done):
            self._remaining -= 1
        return ev

    async def aclose(self) -> None:
        if not self._ended:
            if self._remaining:
                self.engine.abort(self.request_id)
                self._end("aborted")
            else:
                self._end("completed")


def generate(engine: Engine, prompt_ids: list[int], params: SamplingParams, request_id: str,
             accounting: Accounting | None = None) -> EngineStream:
    return EngineStream(engine, prompt_ids, params, request_id, accounting)


@dataclass
class Choice:
    """Accumulates one choice's output for a non-streaming response or a log record."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    extra: Optional[dict] = None

    def add(self, ev: Event) -> None:
        if isinstance(ev, Delta):
            self.text += ev.text
            self.token_ids += ev.token_ids
            self.logprobs += ev.logprobs or []
        elif isinstance(ev, Done):
            self.finish_reason = "length" if ev.finish_reason == "length" else "stop"
            self.stop_reason = ev.stop_reason
            self.completion_tokens, self.prompt_tokens = ev.completion_tokens, ev.prompt_tokens
            self.extra = ev.extra


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


# ---- logprobs in OpenAI's two shapes ------------------------------------------------------------
def chat_logprobs(tok: Tokenizer, lps: list[TokenLogprob]) -> dict:
    def entry(tid: int, lp: float) -> dict:
        b = tok.token_bytes(tid)
        return {"token": b.decode("utf-8", "replace"), "logprob": lp, "bytes": list(b)}

    return {"content": [{**entry(t.token_id, t.logprob), "top_logprobs": [entry(i, v) for i, v in t.top]} for t in lps]}


def completion_logprobs(tok: Tokenizer, lps: list[TokenLogprob], text_start: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    pos = text_start
    for t in lps:
        s = tok.token_bytes(t.token_id).decode("utf-8", "replace")
        tokens.append(s)
        token_lps.append(t.logprob)
        top: dict[str, float] = {}
        for i, v in t.top:  # NOTE: two tokens can share a text (byte fragments); keep the likelier
            top.setdefault(tok.token_bytes(i).decode("utf-8", "replace"), v)
        tops.append(top)
        offsets.append(pos)
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_completion(rid: str, created: int, model: str, choices: list[Choice], tok: Tokenizer, logprobs: bool,
                    prompt_tokens: int, extra=lambda c: {}) -> dict:
    """A non-streaming chat.completion body (the server's and the Python API's)."""
    from .. import __version__

    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": f"mistralrs-py-{__version__}",
        "choices": [{
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(tok, c.logprobs) if logprobs else None,
            "finish_reason": c.finish_reason,
            **extra(c),
        } for c in choices],
        "usage": usage(prompt_tokens, sum(c.completion_tokens for c in choices)),
    }


# ---- chunks -------------------------------------------------------------------------------------
def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
    return {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def completion_chunk(rid: str, created: int, model: str, index: int, text: str, finish_reason=None, logprobs=None) -> dict:
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
    }


def now() -> int:
    return int(time.time())
