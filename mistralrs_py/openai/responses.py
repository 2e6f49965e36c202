"""Engine events -> OpenAI response objects and stream chunks, written once for every front end.

An assembler is fed a submission's events in order. It returns the chunks each event makes
(streaming) and keeps every choice's text, so that after the last event it can also build the whole
response (not streaming) or a log record. The loops that feed it are the front ends' (sync in the
Python API, async in the server): that part is the only one they write.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from .. import __version__
from ..engine.request import Delta, Done, Event, TokenLogprob
from ..pipeline.tokenizer import Tokenizer
from .logprob_formats import chat_logprobs, completion_logprobs, prompt_completion_logprobs, vllm_prompt_logprobs
from .tool_calls import CallStart, Content, ToolCallParser

FINGERPRINT = f"mistralrs-py-{__version__}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        # NOTE: prompt tokens whose keys came from the prefix cache instead of being computed
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class Choice:
    """One choice's output so far."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: Optional[str] = None
    stop_reason: object = None
    completion_tokens: int = 0
    cached_tokens: int = 0
    extra: Optional[dict] = None

    def add(self, ev: Event) -> None:
        if isinstance(ev, Delta):
            self.text += ev.text
            self.token_ids += ev.token_ids
            self.logprobs += ev.logprobs or []
        elif isinstance(ev, Done):
            self.finish_reason = "length" if ev.finish_reason == "length" else "stop"
            self.stop_reason = ev.stop_reason
            self.completion_tokens = ev.completion_tokens
            self.cached_tokens = ev.cached_tokens
            self.extra = ev.extra


# ---- assemblers ---------------------------------------------------------------------------------
class Assembler:
    """What chat and text completions share: ids, choices, usage, extension fields."""

    object_name = ""

    def __init__(
        self,
        rid: str,
        model: str,
        tok: Tokenizer,
        prompt_tokens: int,
        choices: int,
        *,
        logprobs: bool = False,
        include_usage: bool = False,
        xlora_scalings: bool = False,
    ):
        self.rid, self.created, self.model, self.tok = rid, now(), model, tok
        self.prompt_tokens, self.logprobs = prompt_tokens, logprobs
        self.include_usage, self.xlora_scalings = include_usage, xlora_scalings
        self.choices = [Choice(i) for i in range(choices)]

    def head(self) -> list[dict]:
        """Chunks before any event."""
        return []

    def feed(self, ev: Event) -> list[dict]:
        """Takes one event; returns the chunks it makes."""
        choice = self.choices[ev.index]
        choice.add(ev)
        if isinstance(ev, Delta) and (ev.text or ev.logprobs):
            return [self.delta_chunk(choice, ev)]
        if isinstance(ev, Done):
            chunk = self.chunk(choice.index, self.final_delta(), choice.finish_reason)
            chunk["choices"][0].update(self.extras(choice))
            return [chunk]
        return []

    def tail(self) -> list[dict]:
        """Chunks after the last event: the usage chunk when the request asked for it."""
        if not self.include_usage:
            return []
        return [
            {
                "id": self.rid,
                "object": self.object_name,
                "created": self.created,
                "model": self.model,
                "system_fingerprint": FINGERPRINT,
                "choices": [],
                "usage": self.usage(),
            }
        ]

    def usage(self) -> dict:
        # NOTE: the prompt is computed once for all choices (the first's blocks are shared): its count
        return usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices), self.choices[0].cached_tokens)

    def extras(self, choice: Choice) -> dict:
        """Extension fields of a finished choice that the request asked for."""
        if self.xlora_scalings and choice.extra and "xlora_scalings" in choice.extra:
            return {"xlora_scalings": choice.extra["xlora_scalings"]}
        return {}

    def texts(self) -> list[dict]:
        """Each choice's text so far (request logs of streams)."""
        return [{"index": c.index, "text": c.text} for c in self.choices]

    def chunk(self, index: int, body, finish_reason=None, logprobs=None) -> dict:
        raise NotImplementedError

    def delta_chunk(self, choice: Choice, ev: Delta) -> dict:
        raise NotImplementedError

    def final_delta(self):
        raise NotImplementedError

    def response(self) -> dict:
        raise NotImplementedError


class ChatAssembler(Assembler):
    """Chat completions. With tool-call parsers (one per choice, when the request has tools), each
    choice's text is split into content and `tool_calls` as it arrives."""

    object_name = "chat.completion.chunk"

    def __init__(
        self,
        *args,
        parsers: Optional[list[Optional[ToolCallParser]]] = None,
        prompt_ids: Optional[list[int]] = None,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.parsers = parsers if parsers and any(parsers) else None
        self.prompt_ids, self.plps = prompt_ids, None  # vLLM's prompt_logprobs, when asked for
        self.content = ["" for _ in self.choices]  # content, tool-call text taken out
        self.calls: list[list[dict]] = [[] for _ in self.choices]
        self.held_logprobs: list[list[TokenLogprob]] = [[] for _ in self.choices]

    def head(self) -> list[dict]:
        return [self.chunk(c.index, {"role": "assistant", "content": ""}) for c in self.choices]

    def feed(self, ev: Event) -> list[dict]:
        if isinstance(ev, Delta) and ev.prompt_logprobs is not None and self.prompt_ids is not None:
            self.plps = vllm_prompt_logprobs(self.tok, self.prompt_ids, ev.prompt_logprobs)
            # NOTE: streamed, they go out at once in a chunk of their own (vLLM's top-level field)
            chunk = self.chunk(ev.index, {})
            chunk["prompt_logprobs"] = self.plps
            return [chunk, *self.feed(dataclasses.replace(ev, prompt_logprobs=None))]
        if self.parsers is None or self.parsers[ev.index] is None:
            return super().feed(ev)
        choice = self.choices[ev.index]
        choice.add(ev)
        parser = self.parsers[ev.index]
        if isinstance(ev, Delta):
            self.held_logprobs[ev.index] += ev.logprobs or []
            return self._pieces(choice, parser.feed(ev.text))
        if isinstance(ev, Done):
            chunks = self._pieces(choice, parser.finish())
            if self.calls[choice.index] and choice.finish_reason == "stop":
                choice.finish_reason = "tool_calls"
            chunk = self.chunk(choice.index, {}, choice.finish_reason)
            chunk["choices"][0].update(self.extras(choice))
            return chunks + [chunk]
        return []

    def _pieces(self, choice: Choice, pieces: list) -> list[dict]:
        i = choice.index
        chunks = []
        for piece in pieces:
            if isinstance(piece, Content):
                if not piece.text:
                    continue
                self.content[i] += piece.text
                delta = {"content": piece.text}
            elif isinstance(piece, CallStart):
                self.calls[i].append(
                    {"id": piece.id, "type": "function", "function": {"name": piece.name, "arguments": ""}}
                )
                call = {"index": piece.index, "id": piece.id, "type": "function"}
                delta = {"tool_calls": [{**call, "function": {"name": piece.name, "arguments": ""}}]}
            else:  # Arguments
                self.calls[i][piece.index]["function"]["arguments"] += piece.text
                delta = {"tool_calls": [{"index": piece.index, "function": {"arguments": piece.text}}]}
            # NOTE: the tokens' logprobs go out with the first chunk their text makes
            held, self.held_logprobs[i] = self.held_logprobs[i], []
            lp = chat_logprobs(self.tok, held) if self.logprobs and held else None
            chunks.append(self.chunk(i, delta, None, lp))
        return chunks

    def message(self, c: Choice) -> dict:
        if self.parsers is None or self.parsers[c.index] is None:
            return {"role": "assistant", "content": c.text, "refusal": None}
        # NOTE: a call cut short by max_tokens stays, with the arguments written so far (as OpenAI
        # answers, and as the stream showed it): finish_reason "length" says they may not parse
        calls = self.calls[c.index]
        content = self.content[c.index]
        msg: dict = {"role": "assistant", "content": content if content or not calls else None, "refusal": None}
        if calls:
            msg["tool_calls"] = calls
        return msg

    def chunk(self, index: int, delta: dict, finish_reason=None, logprobs=None) -> dict:
        return {
            "id": self.rid,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    def delta_chunk(self, choice: Choice, ev: Delta) -> dict:
        lp = chat_logprobs(self.tok, ev.logprobs or []) if self.logprobs else None
        return self.chunk(choice.index, {"content": ev.text}, None, lp)

    def final_delta(self) -> dict:
        return {}

    def response(self) -> dict:
        return {
            "id": self.rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [
                {
                    "index": c.index,
                    "message": self.message(c),
                    "logprobs": chat_logprobs(self.tok, c.logprobs) if self.logprobs else None,
                    "finish_reason": c.finish_reason,
                    **self.extras(c),
                }
                for c in self.choices
            ],
            "usage": self.usage(),
            **({"prompt_logprobs": self.plps} if self.prompt_ids is not None else {}),
        }


class CompletionAssembler(Assembler):
    """Text completions: choice k * n + i is prompt k's choice i; `echo[k]` (the prompt's text, with
    echo) comes first in its choices' text and shifts their logprobs' text offsets. With
    `echo_logprobs` the prompt's own logprobs come first in `logprobs` (computed in the prefill,
    they arrive with choice k * n's first event: the other choices' events wait for them);
    `prompt_logprobs` (vLLM's field) reports them separately."""

    object_name = "text_completion"

    def __init__(
        self,
        *args,
        n: int = 1,
        echo: Optional[list[str]] = None,
        prompts: Optional[list[list[int]]] = None,
        echo_logprobs: bool = False,
        prompt_logprobs: Optional[int] = None,
        **kw,
    ):
        super().__init__(*args, **kw)
        self.n = n
        self.echo = echo or [""] * (len(self.choices) // n)
        self.offsets = [len(self.echo[c.index // n]) for c in self.choices]
        self.prompts, self.echo_logprobs, self.want_plps = prompts or [], echo_logprobs, prompt_logprobs is not None
        self.plps: dict[int, list] = {}  # prompt k -> its logprobs, once computed
        self.started = [False] * len(self.choices)  # a choice's first chunk went out
        self.held: list[list[Event]] = [[] for _ in self.choices]

    def head(self) -> list[dict]:
        if self.echo_logprobs or self.want_plps:
            return []  # NOTE: the echo goes out with the prompt's logprobs, once they are computed
        return [self.chunk(c.index, self.echo[c.index // self.n]) for c in self.choices if self.echo[c.index // self.n]]

    def feed(self, ev: Event) -> list[dict]:
        if not (self.echo_logprobs or self.want_plps):
            return super().feed(ev)
        k = ev.index // self.n
        if isinstance(ev, Delta) and ev.prompt_logprobs is not None:
            self.plps[k] = ev.prompt_logprobs
        if k not in self.plps:
            self.held[ev.index].append(ev)
            return []
        out = []
        for c in range(k * self.n, (k + 1) * self.n):  # NOTE: this choice and the ones that waited
            if c != ev.index and self.held[c]:
                out += self._release(c, [])
        return out + self._release(ev.index, [ev])

    def _release(self, c: int, events: list) -> list[dict]:
        events, self.held[c] = self.held[c] + events, []
        out = []
        if not self.started[c]:
            self.started[c] = True
            out.append(self._first_chunk(c))
        for ev in events:
            out += super().feed(ev)
        return out

    def _first_chunk(self, c: int) -> dict:
        k = c // self.n
        lp = prompt_completion_logprobs(self.tok, self.prompts[k], self.plps[k]) if self.echo_logprobs else None
        chunk = self.chunk(c, self.echo[k], None, lp)
        if self.want_plps:
            chunk["choices"][0]["prompt_logprobs"] = vllm_prompt_logprobs(self.tok, self.prompts[k], self.plps[k])
        return chunk

    def chunk(self, index: int, text: str, finish_reason=None, logprobs=None) -> dict:
        return {
            "id": self.rid,
            "object": self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}],
        }

    def delta_chunk(self, choice: Choice, ev: Delta) -> dict:
        lp = completion_logprobs(self.tok, ev.logprobs or [], self.offsets[choice.index]) if self.logprobs else None
        self.offsets[choice.index] += len(ev.text)
        return self.chunk(choice.index, ev.text, None, lp)

    def final_delta(self) -> str:
        return ""

    def texts(self) -> list[dict]:
        return [{"index": c.index, "text": self.echo[c.index // self.n] + c.text} for c in self.choices]

    def choice_logprobs(self, c: Choice) -> Optional[dict]:
        k = c.index // self.n
        if not self.logprobs:
            return None
        generated = completion_logprobs(self.tok, c.logprobs, len(self.echo[k]))
        if not self.echo_logprobs:
            return generated
        prompt = prompt_completion_logprobs(self.tok, self.prompts[k], self.plps.get(k) or [])
        return {key: prompt[key] + generated[key] for key in generated}

    def response(self) -> dict:
        choices = []
        for c in self.choices:
            k = c.index // self.n
            choice = {
                "index": c.index,
                "text": self.echo[k] + c.text,
                "logprobs": self.choice_logprobs(c),
                "finish_reason": c.finish_reason,
                **self.extras(c),
            }
            if self.want_plps:
                choice["prompt_logprobs"] = vllm_prompt_logprobs(self.tok, self.prompts[k], self.plps.get(k) or [])
            choices.append(choice)
        return {
            "id": self.rid,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
            "choices": choices,
            "usage": self.usage(),
        }
