"""The one way into the engine: start-up, and a stream of events per submission, sync or async.

    client = EngineClient.start(spec, EngineOptions(max_seqs=4))
    for event in client.submit([prompt_ids], params, "req-1"):           # any thread
        ...
    async for event in client.submit([prompt_ids], params, "req-2", loop=asyncio.get_running_loop()):
        ...

The HTTP server, the Python API (`Runner`) and the terminal chat all go through here (the OpenAI
layer above turns messages into prompts and events into OpenAI objects). The client knows tokens,
not text formats.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import weakref
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Protocol

from ..pipeline.base import LoadError, ModelSpec, Pipeline
from .engine import Engine, EngineDead
from .grammar import GrammarCompiler
from .request import Done, Error, Event, Request, SamplingParams
from .worker import TorchThread


@dataclass
class EngineOptions:
    """The engine's side of the CLI's global options (and Runner's keyword arguments)."""

    max_seqs: int = 16
    scheduler: str = "continuous"
    prefill_chunk: int = 512
    kv_cache_mb: Optional[float] = None
    compile: bool = False
    cuda_graphs: bool = True
    prefix_caching: bool = True
    block_size: int = 16
    threads: Optional[int] = None
    # sequences that may wait for a slot beyond --max-seqs before submissions are refused (None: no limit)
    max_waiting: Optional[int] = None


class GenerationFailed(RuntimeError):
    """A submission the engine could not run or finish; `code` says why (OpenAI-style error code:
    engine_unavailable, server_overloaded, server_error)."""

    def __init__(self, message: str, code: str = "server_error"):
        super().__init__(message)
        self.message, self.code = message, code


class Observer(Protocol):
    """Watches one submission (the server's metrics): every event as it is consumed, then the end."""

    def event(self, ev: Event) -> None: ...

    def end(self, outcome: str) -> None: ...  # "completed" | "errored" | "aborted"


@dataclass
class Accounting:
    """Submissions by outcome: each one accepted ends exactly once as completed, errored or aborted.
    `outstanding` counts sequences accepted and not yet ended (admission control)."""

    accepted: int = 0
    completed: int = 0
    errored: int = 0
    aborted: int = 0
    rejected: int = 0
    outstanding: int = 0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class EngineClient:
    def __init__(self, pipeline: Pipeline, engine: Engine, *, max_waiting: Optional[int] = None):
        self.pipeline, self.engine = pipeline, engine
        self.tokenizer = pipeline.tokenizer
        # output grammars (response_format, tool choices) are compiled for this tokenizer
        self.grammars = GrammarCompiler(pipeline.tokenizer, pipeline.config.vocab_size)
        self.max_seqs = engine.scheduler.max_seqs
        self.max_waiting = max_waiting
        self.accounting = Accounting()
        self.observe: Optional[Callable[[int, int], Observer]] = None  # (prompt tokens, choices) -> observer
        self._lock = threading.Lock()
        self._streams: weakref.WeakSet[RequestStream] = weakref.WeakSet()  # not ended yet
        engine.start()

    @classmethod
    def start(
        cls,
        spec: ModelSpec,
        options: EngineOptions,
        progress=None,
        status: Optional[Callable[[str], ContextManager]] = None,
    ) -> "EngineClient":
        """Loads the model and starts its engine. `progress` (a rich Progress) shows the load;
        `status(text)` wraps a long phase (compiling). Raises LoadError with a one-line reason."""
        import torch

        from ..pipeline.base import load_pipeline
        from ..pipeline.chat_template import load_chat_template

        template = load_chat_template(spec.chat_template) if spec.chat_template else None  # NOTE: fails fast
        threads = options.threads
        if spec.tp_size > 1 and not threads:
            from .tensor_parallel import default_threads, local_world

            threads = default_threads(local_world(spec.tp_size))  # NOTE: the ranks on this machine share its cores
        if threads:
            torch.set_num_threads(threads)
        # NOTE: the model is loaded, the engine built and its loop run on one thread (see worker.py)
        worker = TorchThread(threads=threads)
        if spec.tp_size > 1:
            from .tensor_parallel import start

            pipeline = worker.call(start, spec, progress, options.threads)
        else:
            pipeline = worker.call(load_pipeline, spec, progress)
        if template is not None:
            pipeline.tokenizer.chat_template = template
        phase = (
            status("compiling decode steps with torch.compile (a few minutes the first time, about a minute later on)")
            if status and options.compile
            else contextlib.nullcontext()
        )
        try:
            with phase:
                engine = worker.call(
                    Engine,
                    pipeline,
                    max_seqs=options.max_seqs,
                    policy=options.scheduler,
                    prefill_chunk=options.prefill_chunk,
                    kv_cache_mb=options.kv_cache_mb,
                    cuda_graphs=options.cuda_graphs,
                    compile=options.compile,
                    prefix_caching=options.prefix_caching,
                    block_size=options.block_size,
                    worker=worker,
                )
        except RuntimeError as e:
            raise LoadError(
                f"could not allocate the KV cache: {e}; lower --max-seqs or --max-model-len, or set --kv-cache-mb"
            ) from None
        client = cls(pipeline, engine, max_waiting=options.max_waiting)
        group = getattr(pipeline, "group", None)
        if group is not None:
            group.on_failure(engine.fail)  # NOTE: a lost rank: the engine is dead, /health says 503
        # NOTE: the chat template's worker processes and the grammar compiler's token trie are made
        # now, beside the first requests' arrival, not inside the first request that needs them
        threading.Thread(target=_warm_up, args=(client,), daemon=True).start()
        return client

    # ---- what front ends read ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.pipeline.name

    @property
    def max_len(self) -> int:
        """The longest context served (prompt + output)."""
        return self.engine.max_len

    @property
    def alive(self) -> bool:
        return self.engine.alive

    @property
    def failure(self) -> Optional[str]:
        """Why a part the engine needs beyond this process failed for good (a tensor-parallel rank),
        or None."""
        group = getattr(self.pipeline, "group", None)
        return None if group is None else group.failure

    def on_failure(self, fn: Callable[[str], None]) -> None:
        """Calls fn(reason) (from another thread) if a part the engine needs beyond this process fails
        for good: a tensor-parallel rank. Nothing happens for a single-process engine."""
        group = getattr(self.pipeline, "group", None)
        if group is not None:
            group.on_failure(fn)

    @property
    def max_request_sequences(self) -> Optional[int]:
        """The most sequences (prompts x choices) one submission may create: what the engine runs
        plus what may wait (None: no limit)."""
        return None if self.max_waiting is None else self.max_seqs + self.max_waiting

    def snapshot(self) -> dict:
        return {**self.engine.snapshot(), "requests": self.accounting.as_dict()}

    def stop(self, timeout: float = 10.0) -> None:
        """Stops the engine: whatever it was running ends with an error event. NOTE: should the engine
        thread not end within `timeout` (a step that takes that long), every stream still open is
        ended from here, so no caller waits on an engine that will not answer."""
        self.engine.stop(timeout)
        for stream in list(self._streams):
            stream.fail("the server is shutting down")
        self.grammars.close()

    # ---- submissions -----------------------------------------------------------------------------
    def submit(
        self,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        *,
        loop: Optional[asyncio.AbstractEventLoop] = None,
    ) -> "RequestStream":
        """Queues one engine request per prompt (each with params.n choices) and returns their events
        as one stream. With `loop`, iterate it with `async for` on that loop; else with `for`."""
        sequences = len(prompts) * params.n
        with self._lock:
            acct = self.accounting
            # NOTE: a bounded queue: past --max-waiting, refuse at once rather than let requests pile
            # up behind a busy engine; counted in sequences. An idle engine admits any one request.
            if (
                self.max_waiting is not None
                and acct.outstanding
                and acct.outstanding + sequences > self.max_seqs + self.max_waiting
            ):
                acct.rejected += 1
                raise GenerationFailed(
                    "the server is overloaded: too many requests are waiting; retry shortly", "server_overloaded"
                )
            acct.accepted += 1
            acct.outstanding += sequences
        observer = self.observe(sum(len(p) for p in prompts), sequences) if self.observe else None
        try:
            return RequestStream(self, prompts, params, request_id, loop, observer)
        except BaseException:
            self._ended(sequences, "errored")
            raise

    def _ended(self, sequences: int, outcome: str) -> None:
        with self._lock:
            self.accounting.outstanding -= sequences
            setattr(self.accounting, outcome, getattr(self.accounting, outcome) + 1)


def _warm_up(client: EngineClient) -> None:
    if client.tokenizer.chat_template:
        with contextlib.suppress(Exception):
            client.tokenizer.render_chat([{"role": "user", "content": "hi"}])
    with contextlib.suppress(Exception):
        client.grammars.warm_up()


class RequestStream:
    """The events of one submission, choices numbered prompt-major (prompt k's choice i is
    k * n + i). Ends after every choice's Done; an Error event raises GenerationFailed.

    NOTE: closing it before the end (break, an exception, a gone client) aborts the engine requests,
    which frees their cache slots within a step."""

    def __init__(
        self,
        client: EngineClient,
        prompts: list[list[int]],
        params: SamplingParams,
        request_id: str,
        loop: Optional[asyncio.AbstractEventLoop],
        observer: Optional[Observer],
    ):
        self.client, self.n, self.observer = client, params.n, observer
        self.remaining = len(prompts) * params.n
        self.ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{k}" for k in range(len(prompts))]
        self._loop = loop
        self._queue: asyncio.Queue | queue.SimpleQueue = asyncio.Queue() if loop else queue.SimpleQueue()
        self._ended = False
        self._fail = self._emitter(0)
        client._streams.add(self)
        engine = client.engine
        try:
            for k, (rid, ids) in enumerate(zip(self.ids, prompts)):
                engine.add_request(Request(rid, ids, params, self._emitter(k * params.n)))
        except EngineDead:
            for rid in self.ids:
                engine.abort(rid)
            raise GenerationFailed("the engine is not running", "engine_unavailable") from None

    def _emitter(self, offset: int) -> Callable[[Event], None]:
        """The callback for one engine request (called on the engine thread; must not block)."""
        put = self._queue.put_nowait if self._loop else self._queue.put

        def emit(ev: Event) -> None:
            if offset and getattr(ev, "index", None) is not None:
                ev = dataclasses.replace(ev, index=ev.index + offset)
            if self._loop is None:
                put(ev)
                return
            try:
                self._loop.call_soon_threadsafe(put, ev)
            except RuntimeError:  # the event loop is closed: nobody is listening any more
                pass

        return emit

    def _take(self, ev: Event) -> Event:
        if isinstance(ev, Error):
            self._end("errored")
            raise GenerationFailed(ev.message, ev.code)
        if isinstance(ev, Done):
            self.remaining -= 1
        if self.observer is not None:
            self.observer.event(ev)
        if not self.remaining:
            self._end("completed")
        return ev

    def fail(self, message: str) -> None:
        """Ends the stream with an error event, from any thread (the next read raises it)."""
        if not self._ended:
            self._fail(Error(message, "server_error"))

    def _end(self, outcome: str) -> None:
        if self._ended:
            return
        self._ended = True
        self.client._streams.discard(self)
        if outcome != "completed":  # NOTE: the other prompts' requests stop too
            for rid in self.ids:
                self.client.engine.abort(rid)
        total = len(self.ids) * self.n
        self.client._ended(total, outcome)
        if self.observer is not None:
            self.observer.end(outcome)

    # ---- sync ------------------------------------------------------------------------------------
    def __iter__(self) -> "RequestStream":
        return self

    def __next__(self) -> Event:
        if self._ended or not self.remaining:
            self._end("completed")
            raise StopIteration
        while True:
            # NOTE: polled, so that Ctrl-C (raised only in the main thread) and a dead engine are
            # noticed within 0.1 s
            try:
                ev = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self.client.engine.alive:
                    self._end("errored")
                    raise GenerationFailed("the engine is not running", "engine_unavailable") from None
                continue
            except BaseException:
                self.close()
                raise
            return self._take(ev)

    def close(self) -> None:
        self._end("aborted" if self.remaining else "completed")

    def __enter__(self) -> "RequestStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        # NOTE: a stream dropped half-read (a generator abandoned without close) must not keep
        # generating into a queue nobody reads
        if not getattr(self, "_ended", True):
            with contextlib.suppress(Exception):
                self.close()

    # ---- async -----------------------------------------------------------------------------------
    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> Event:
        if self._ended or not self.remaining:
            self._end("completed")
            raise StopAsyncIteration
        # NOTE: a dying engine fails every sequence with an Error event, so this wait always ends
        try:
            ev = await self._queue.get()
        except BaseException:  # cancelled: the client is gone
            self.close()
            raise
        return self._take(ev)

    async def aclose(self) -> None:
        self.close()
