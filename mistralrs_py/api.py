"""The Python API: the engine in your own process, no HTTP.

    from mistralrs_py import Runner
    runner = Runner()                                   # the embedded SmolLM2-135M-Instruct
    runner.chat([{"role": "user", "content": "Hi!"}], max_tokens=32)["choices"][0]["message"]["content"]

Results and chunks have the shape of OpenAI's chat.completion / chat.completion.chunk /
text_completion objects, as dicts; sampling options take the server's names and checks. A Runner is
thread-safe: calls from several threads are batched together by the engine.
"""

from __future__ import annotations

import contextlib
import queue
import weakref
from typing import Any, Iterable, Iterator, Optional

from pydantic import ValidationError

from . import __version__
from .engine.engine import Engine, EngineDead
from .engine.request import Delta, Done, Error, Event, Request, SamplingParams
from .engine.worker import TorchThread
from .pipeline.base import ModelKind, ModelSpec, Pipeline, load_pipeline
from .pipeline.tokenizer import ChatTemplateError, load_chat_template
from .server import protocol as P
from .server.streaming import Choice, chat_chunk, chat_completion, chat_logprobs, completion_logprobs, new_id, now, usage

class GenerationFailed(RuntimeError):
    """The engine failed a request (forward error, engine stopped)."""


class ContextTooLong(ValueError):
    """The prompt (plus max_tokens) does not fit the model's context."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message)
        self.prompt_tokens, self.limit = prompt_tokens, limit


class Runner:
    """A loaded model and a running engine.

    `Runner(spec)` takes the ModelSpec the CLI builds; `Runner(model_id=..., kind="gguf-mistral",
    quantized_filename=..., ...)` builds one from ModelSpec's fields. Engine options mirror the
    CLI's global options (`--max-seqs`, `--scheduler`, `--prefill-chunk`, `--truncate-sequence`,
    `--kv-cache-mb`, `--compile`)."""

    def __init__(self, spec: Optional[ModelSpec] = None, *, max_seqs: int = 4, scheduler: str = "continuous",
                 prefill_chunk: int = 512, truncate_sequence: bool = False, threads: Optional[int] = None,
                 progress: bool = False, kv_cache_mb: Optional[float] = None, compile: bool = False,
                 **spec_fields: Any):
        if spec is None:
            if "kind" in spec_fields:
                spec_fields["kind"] = ModelKind(spec_fields["kind"])
            spec = ModelSpec(**spec_fields)
        elif spec_fields:
            raise TypeError("give a ModelSpec or its fields, not both")
        if threads:
            import torch

            torch.set_num_threads(threads)
        # NOTE: loading and the engine loop share one thread (see engine/worker.py)
        worker = TorchThread(threads=threads)
        template = load_chat_template(spec.chat_template) if spec.chat_template else None
        if progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True) as bar:
                pipeline = worker.call(load_pipeline, spec, bar)
        else:
            pipeline = worker.call(load_pipeline, spec)
        if template is not None:
            pipeline.tokenizer.chat_template = template
        engine = worker.call(Engine, pipeline, max_seqs=max_seqs, policy=scheduler, prefill_chunk=prefill_chunk,
                             kv_cache_mb=kv_cache_mb, compile=compile, worker=worker)
        engine.start()
        self._setup(pipeline, engine, spec.repeat_last_n, truncate_sequence)
        # NOTE: a Runner that owns its engine and is never closed stops it at interpreter exit (or
        # when collected): killing the daemon engine thread inside an OpenMP region made the C++
        # runtime abort noisily ("terminate called without an active exception")
        self._finalizer = weakref.finalize(self, engine.stop)

    @classmethod
    def from_engine(cls, pipeline: Pipeline, engine: Engine, *, repeat_last_n: int = 64,
                    truncate_sequence: bool = False) -> "Runner":
        """Wraps an engine that is already built (the CLI's interactive mode); starts it if needed."""
        self = cls.__new__(cls)
        if engine._thread is None:
            engine.start()
        self._setup(pipeline, engine, repeat_last_n, truncate_sequence)
        return self

    def _setup(self, pipeline: Pipeline, engine: Engine, repeat_last_n: int, truncate_sequence: bool) -> None:
        self.pipeline, self.engine = pipeline, engine
        self.tokenizer = pipeline.tokenizer
        self.model = pipeline.name
        self.repeat_last_n, self.truncate_sequence = repeat_last_n, truncate_sequence
        self._finalizer = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the engine thread; the Runner cannot generate afterwards."""
        if self._finalizer is not None:
            self._finalizer()  # NOTE: runs engine.stop once; exit will not run it again
        else:
            self.engine.stop()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_model_len(self) -> int:
        return self.engine.max_len

    # ---- chat ----------------------------------------------------------------------------------------
    def chat(self, messages: Iterable[dict], **sampling: Any) -> dict:
        """A chat.completion dict for `messages` ([{"role": ..., "content": ...}, ...])."""
        ids, params, req = self._prepare_chat(messages, sampling)
        rid = new_id("chatcmpl")
        choices = self._collect(ids, params, rid)
        return chat_completion(rid, now(), self.model, choices, self.tokenizer, params.logprobs, len(ids))

    def stream_chat(self, messages: Iterable[dict], **sampling: Any) -> Iterator[dict]:
        """chat.completion.chunk dicts as tokens arrive; the last one carries `usage`.

        Leaving the loop early (break, an exception, Ctrl-C) aborts the generation in the engine."""
        ids, params, req = self._prepare_chat(messages, sampling)
        return self._chat_chunks(ids, params, new_id("chatcmpl"))

    def _chat_chunks(self, ids: list[int], params: SamplingParams, rid: str) -> Iterator[dict]:
        created, model = now(), self.model
        for i in range(params.n):
            yield chat_chunk(rid, created, model, i, {"role": "assistant", "content": ""})
        completion = 0
        with contextlib.closing(self._events(ids, params, rid)) as events:
            for ev in events:
                if isinstance(ev, Delta) and (ev.text or ev.logprobs):
                    lp = chat_logprobs(self.tokenizer, ev.logprobs or []) if params.logprobs else None
                    yield chat_chunk(rid, created, model, ev.index, {"content": ev.text}, None, lp)
                elif isinstance(ev, Done):
                    completion += ev.completion_tokens
                    reason = "length" if ev.finish_reason == "length" else "stop"
                    yield chat_chunk(rid, created, model, ev.index, {}, reason)
        yield {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
               "usage": usage(len(ids), completion)}

    # ---- plain completion ----------------------------------------------------------------------------
    def complete(self, prompt: str, **sampling: Any) -> dict:
        """A text_completion dict for one string prompt (no chat template)."""
        req = parse_request(P.CompletionRequest, {"prompt": prompt, **sampling})
        if not isinstance(req.prompt, str):
            raise ValueError("complete() takes one string prompt")
        ids = self._fit(self.tokenizer.encode(prompt), req.max_tokens)
        top = req.logprobs or 0
        params = self._params(req, req.logprobs is not None, top)
        rid = new_id("cmpl")
        choices = self._collect(ids, params, rid)
        return {
            "id": rid, "object": "text_completion", "created": now(), "model": self.model,
            "system_fingerprint": f"mistralrs-py-{__version__}",
            "choices": [{
                "index": c.index, "text": c.text,
                "logprobs": completion_logprobs(self.tokenizer, c.logprobs, 0) if params.logprobs else None,
                "finish_reason": c.finish_reason,
            } for c in choices],
            "usage": usage(len(ids), sum(c.completion_tokens for c in choices)),
        }

    # ---- shared ------------------------------------------------------------------------------------
    def _prepare_chat(self, messages: Iterable[dict], sampling: dict) -> tuple[list[int], SamplingParams, Any]:
        if "stream" in sampling:
            raise TypeError("use stream_chat() for streaming; chat() does not take stream=")
        req = parse_request(P.ChatCompletionRequest, {"messages": list(messages), **sampling})
        if not self.tokenizer.chat_template:
            raise ValueError("this model has no chat template: pass Runner(..., chat_template=FILE) (the CLI's "
                             "--chat-template FILE), or use complete() with a prompt you format yourself")
        rendered = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in req.messages]
        try:
            ids = self.tokenizer.encode_chat(rendered, add_generation_prompt=req.add_generation_prompt,
                                             **(req.chat_template_kwargs or {}))
        except ChatTemplateError as e:
            raise ValueError(str(e)) from None
        ids = self._fit(ids, req.wanted_max_tokens())
        return ids, self._params(req, req.logprobs, req.top_logprobs or 0), req

    def _params(self, req: P.SamplingFields, logprobs: bool, top: int) -> SamplingParams:
        try:
            return req.to_sampling_params(repeat_last_n=self.repeat_last_n, vocab_size=self.tokenizer.vocab_size,
                                          logprobs=logprobs, top_logprobs=top)
        except P.InvalidRequest as e:
            raise ValueError(e.message) from None

    def _fit(self, ids: list[int], max_tokens: Optional[int]) -> list[int]:
        """The server's context rule (protocol.fit_context), raised as ContextTooLong."""
        try:
            return P.fit_context(ids, max_tokens, self.engine.max_len, self.truncate_sequence)
        except P.InvalidRequest as e:
            raise ContextTooLong(e.message, len(ids), self.engine.max_len) from None

    def _collect(self, ids: list[int], params: SamplingParams, rid: str) -> list[Choice]:
        choices: dict[int, Choice] = {}
        with contextlib.closing(self._events(ids, params, rid)) as events:  # NOTE: Ctrl-C here aborts the request
            for ev in events:
                choices.setdefault(ev.index, Choice(ev.index)).add(ev)
        return [choices[i] for i in sorted(choices)]

    def _events(self, ids: list[int], params: SamplingParams, rid: str) -> Iterator[Event]:
        """The engine's events for one request, on the calling thread.

        NOTE: the queue is polled with a timeout so that Ctrl-C (KeyboardInterrupt, raised only in
        the main thread) and a dead engine are noticed within 0.1 s; leaving early aborts the
        request, which frees its cache slot within one engine step."""
        inbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        try:
            self.engine.add_request(Request(rid, ids, params, inbox.put))
        except EngineDead:
            raise GenerationFailed("the engine is not running (the Runner was closed?)") from None
        remaining, finished = params.n, False
        try:
            while remaining:
                try:
                    ev = inbox.get(timeout=0.1)
                except queue.Empty:
                    if not self.engine.alive:
                        finished = True
                        raise GenerationFailed("the engine is not running") from None
                    continue
                if isinstance(ev, Error):
                    finished = True
                    raise GenerationFailed(ev.message)
                if isinstance(ev, Done):
                    remaining -= 1
                yield ev
            finished = True
        finally:
            if not finished:
                self.engine.abort(rid)


def parse_request(model, body: dict):
    """Validates a request body as the server does; the first problem becomes a ValueError."""
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(x) for x in err["loc"] if not str(x).startswith(("function-", "list[", "str", "int")))
        raise ValueError(f"{loc or 'arguments'}: {err['msg']}") from None
