"""The Python API: the engine in your own process, no HTTP.

    from mistralrs_py import Runner
    runner = Runner()                                   # the embedded SmolLM2-135M-Instruct
    runner.chat([{"role": "user", "content": "Hi!"}], max_tokens=32)["choices"][0]["message"]["content"]

Results and chunks have the shape of OpenAI's chat.completion / chat.completion.chunk /
text_completion objects, as dicts; sampling options take the server's names and checks (an invalid
one raises InvalidRequest, a ValueError, with the server's message). A Runner is thread-safe: calls
from several threads are batched together by the engine.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable, Iterator, Optional

from .engine.client import EngineClient, EngineOptions, GenerationFailed
from .openai.protocol import ContextTooLong, InvalidRequest
from .openai.service import OpenAIService
from .pipeline.base import ModelKind, ModelSpec

__all__ = ["Runner", "GenerationFailed", "ContextTooLong", "InvalidRequest"]


class Runner:
    """A loaded model and a running engine.

    `Runner(spec)` takes the ModelSpec the CLI builds; `Runner(model_id=..., kind="gguf-mistral",
    quantized_filename=..., ...)` builds one from ModelSpec's fields. Engine options mirror the
    CLI's global options (`--max-seqs`, `--scheduler`, `--prefill-chunk`, `--truncate-sequence`,
    `--kv-cache-mb`, `--compile`, `--no-prefix-cache` as prefix_caching=False)."""

    def __init__(
        self,
        spec: Optional[ModelSpec] = None,
        *,
        max_seqs: int = 4,
        scheduler: str = "continuous",
        prefill_chunk: int = 512,
        truncate_sequence: bool = False,
        tool_call_parser: Optional[str] = None,
        threads: Optional[int] = None,
        progress: bool = False,
        kv_cache_mb: Optional[float] = None,
        compile: bool = False,
        prefix_caching: bool = True,
        **spec_fields: Any,
    ):
        from .openai.structured import TOOL_PARSERS

        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser {tool_call_parser!r} is not one of {', '.join(TOOL_PARSERS)}")
        if spec is None:
            if "kind" in spec_fields:
                spec_fields["kind"] = ModelKind(spec_fields["kind"])
            spec = ModelSpec(**spec_fields)
        elif spec_fields:
            raise TypeError("give a ModelSpec or its fields, not both")
        options = EngineOptions(
            max_seqs=max_seqs,
            scheduler=scheduler,
            prefill_chunk=prefill_chunk,
            kv_cache_mb=kv_cache_mb,
            compile=compile,
            prefix_caching=prefix_caching,
            threads=threads,
        )
        if progress:
            from .terminal import progress_bar

            with progress_bar() as bar:
                client = EngineClient.start(spec, options, bar)
        else:
            client = EngineClient.start(spec, options)
        self._setup(client, spec.repeat_last_n, truncate_sequence, None, tool_call_parser)
        # NOTE: a Runner that owns its engine and is never closed stops it at interpreter exit (or
        # when collected): killing the daemon engine thread inside an OpenMP region made the C++
        # runtime abort noisily ("terminate called without an active exception")
        self._finalizer = weakref.finalize(self, client.stop)

    @classmethod
    def from_client(
        cls,
        client: EngineClient,
        *,
        repeat_last_n: int = 64,
        truncate_sequence: bool = False,
        model_name: Optional[str] = None,
        tool_call_parser: Optional[str] = None,
    ) -> "Runner":
        """Wraps an engine client that is already started (the terminal chat's); closing the Runner
        stops it."""
        self = cls.__new__(cls)
        self._setup(client, repeat_last_n, truncate_sequence, model_name, tool_call_parser)
        self._finalizer = weakref.finalize(self, client.stop)
        return self

    def _setup(
        self,
        client: EngineClient,
        repeat_last_n: int,
        truncate_sequence: bool,
        model_name: Optional[str],
        tool_call_parser: Optional[str] = None,
    ):
        self.client = client
        self.service = OpenAIService(
            client,
            model_name=model_name,
            truncate_sequence=truncate_sequence,
            repeat_last_n=repeat_last_n,
            tool_call_parser=tool_call_parser,
        )
        self.tokenizer = client.tokenizer
        self.model = self.service.model_name

    # ---- lifecycle -------------------------------------------------------------------------------
    def close(self) -> None:
        """Stops the engine thread; the Runner cannot generate afterwards."""
        self._finalizer()  # NOTE: runs client.stop once; exit will not run it again

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def max_model_len(self) -> int:
        return self.client.max_len

    # ---- generation ------------------------------------------------------------------------------
    def chat(self, messages: Iterable[dict], **sampling: Any) -> dict:
        """A chat.completion dict for `messages` ([{"role": ..., "content": ...}, ...])."""
        _no_stream(sampling)
        return self.service.chat({"messages": list(messages), **sampling}).response()

    def stream_chat(self, messages: Iterable[dict], **sampling: Any) -> Iterator[dict]:
        """chat.completion.chunk dicts as tokens arrive; the last one carries `usage`.

        Leaving the loop early (break, an exception, Ctrl-C) aborts the generation in the engine."""
        _no_stream(sampling)
        body = {"messages": list(messages), **sampling, "stream": True, "stream_options": {"include_usage": True}}
        return self.service.chat(body).chunks()

    def respond(self, input: Any, **fields: Any) -> dict:
        """A Responses API `response` dict for `input` (a string or a list of items), stateless as the
        server's /v1/responses; fields take that API's names (instructions, max_output_tokens, ...)."""
        _no_stream(fields)
        return self.service.responses({"input": input, **fields}).response()

    def complete(self, prompt: str, **sampling: Any) -> dict:
        """A text_completion dict for one string prompt (no chat template)."""
        _no_stream(sampling)
        if not isinstance(prompt, str):
            raise InvalidRequest("complete() takes one string prompt", "prompt")
        return self.service.completion({"prompt": prompt, **sampling}).response()


def _no_stream(sampling: dict) -> None:
    if "stream" in sampling:
        raise TypeError("chat() and complete() return whole answers and stream_chat() streams: none takes stream=")
