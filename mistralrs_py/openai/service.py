"""OpenAI semantics over the engine client, shared by the server, the Python API and the terminal chat.

    service = OpenAIService(client, model_name="smollm2")
    gen = service.chat({"messages": [...], "temperature": 0})   # validated, rendered, fitted: or InvalidRequest
    gen.response()                          # a chat.completion dict (sync)
    for chunk in gen.chunks(): ...          # chat.completion.chunk dicts (sync)
    await gen.aresponse(); gen.achunks()    # the same in asyncio
    service.responses({"input": ...})       # Responses API: a Response dict; its typed events as chunks

Every request is refused here or nowhere: the same bad field gives the same InvalidRequest (a
ValueError) whichever front end it came through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import AsyncIterator, Iterator

from ..engine.client import EngineClient, RequestStream
from ..engine.grammar import GrammarError
from ..engine.request import SamplingParams
from ..pipeline.chat_template import ChatTemplateError
from . import limits
from . import protocol as P
from . import responses_protocol as RP
from .responses import Assembler, ChatAssembler, CompletionAssembler, new_id, now
from .responses_api import ResponsesAssembler
from .structured import TOOL_PARSERS, OutputPlan, plan_output

NO_TEMPLATE = (
    "this model has no chat template: give one with --chat-template FILE (Runner(chat_template=FILE) in "
    "Python), or use the completions API with a prompt you format yourself"
)


@dataclass
class Generation:
    """A validated request, ready to run: its prompts, engine parameters and response assembler.
    Nothing reaches the engine until one of the methods below runs it (each runs it once)."""

    client: EngineClient
    request: P.SamplingFields
    prompts: list[list[int]]
    params: SamplingParams
    assembler: Assembler

    @property
    def stream(self) -> bool:
        return self.request.stream

    def submit(self, loop: asyncio.AbstractEventLoop | None = None) -> RequestStream:
        return self.client.submit(self.prompts, self.params, self.assembler.rid, loop=loop)

    # ---- sync ------------------------------------------------------------------------------------
    def response(self) -> dict:
        """Runs to the end; the whole response (a KeyboardInterrupt meanwhile aborts the request)."""
        with contextlib.closing(self.submit()) as events:
            for ev in events:
                self.assembler.feed(ev)
        return self.assembler.response()

    def chunks(self) -> Iterator[dict]:
        """Submits now (a refusal raises here), then yields chunks as tokens arrive; leaving the
        loop early aborts the request."""
        events = self.submit()

        def gen() -> Iterator[dict]:
            with contextlib.closing(events):
                yield from self.assembler.head()
                for ev in events:
                    yield from self.assembler.feed(ev)
                yield from self.assembler.tail()

        return gen()

    # ---- async -----------------------------------------------------------------------------------
    async def aresponse(self) -> dict:
        events = self.submit(asyncio.get_running_loop())
        try:
            async for ev in events:
                self.assembler.feed(ev)
        finally:
            await events.aclose()
        return self.assembler.response()

    def achunks(self) -> AsyncIterator[dict]:
        """Must be called on the event loop that iterates the result; submits now."""
        events = self.submit(asyncio.get_running_loop())

        async def gen() -> AsyncIterator[dict]:
            try:
                for chunk in self.assembler.head():
                    yield chunk
                async for ev in events:
                    for chunk in self.assembler.feed(ev):
                        yield chunk
                for chunk in self.assembler.tail():
                    yield chunk
            finally:
                await events.aclose()

        return gen()


class OpenAIService:
    def __init__(
        self,
        client: EngineClient,
        *,
        model_name: str | None = None,
        truncate_sequence: bool = False,
        repeat_last_n: int = 64,
        tool_call_parser: str | None = None,
    ):
        if tool_call_parser is not None and tool_call_parser not in TOOL_PARSERS:
            raise ValueError(f"tool_call_parser {tool_call_parser!r} is not one of {', '.join(TOOL_PARSERS)}")
        self.client, self.tok = client, client.tokenizer
        self.model_name = model_name or client.name
        self.truncate_sequence, self.repeat_last_n = truncate_sequence, repeat_last_n
        self.tool_call_parser = tool_call_parser  # None: recognised from the chat template

    # ---- generation --------------------------------------------------------------------------------
    def chat(self, body: dict) -> Generation:
        req = P.parse(P.ChatCompletionRequest, body)
        self.check_model(req.model)
        self.check_fan_out(1, req.n)
        if req.wanted_max_tokens() == 0 and req.prompt_logprobs is None:
            raise P.InvalidRequest(
                "max_tokens must be at least 1 (0, the prompt alone, goes with prompt_logprobs)", "max_tokens"
            )
        plan = plan_output(req, self.tok, self.tool_call_parser)
        ids = self.encode_chat(req.messages, req.add_generation_prompt, req.chat_template_kwargs, plan.tools)
        if not ids:
            raise P.InvalidRequest("the chat template rendered these messages to no tokens", "messages")
        ids = self.fit(ids, req.wanted_max_tokens())
        params = self.sampling(req, req.logprobs, req.top_logprobs or 0, plan)
        limits.check_chat(req, ids, params, self.client.max_len)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        asm = ChatAssembler(
            new_id("chatcmpl"),
            self.model_name,
            self.tok,
            len(ids),
            params.n,
            logprobs=params.logprobs,
            include_usage=include_usage,
            xlora_scalings=req.return_xlora_scalings,
            parsers=[plan.parser() for _ in range(params.n)],
            prompt_ids=ids if req.prompt_logprobs is not None else None,
        )
        return Generation(self.client, req, [ids], params, asm)

    def responses(self, body: dict) -> Generation:
        """OpenAI's Responses API, stateless: the request becomes a chat request (one choice), its
        events a Response object or Responses' typed stream events."""
        req = RP.parse_request(body)
        try:
            gen = self.chat(RP.chat_body(req))
        except P.InvalidRequest as e:
            raise RP.renamed(e) from None
        gen.assembler = ResponsesAssembler(gen.assembler, req, self.model_name)
        return gen

    def completion(self, body: dict) -> Generation:
        req = P.parse(P.CompletionRequest, body)
        self.check_model(req.model)
        if req.suffix:
            raise P.InvalidRequest("suffix is not supported", "suffix")
        if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
            raise P.InvalidRequest(
                "max_tokens must be at least 1 (0, the prompt alone, goes with echo or prompt_logprobs)", "max_tokens"
            )
        texts = req.prompts()
        self.check_fan_out(len(texts), req.n)  # NOTE: before tokenizing what may be thousands of prompts
        prompts = []
        for p in texts:
            if isinstance(p, str):
                ids = self.tok.encode(p)
            else:
                self.check_ids(p, "prompt", "prompt token id")
                ids = list(p)
            if not ids:
                # NOTE: nothing to compute the first token from; a model with a BOS token starts there
                if self.tok.bos_id is None:
                    raise P.InvalidRequest(
                        "prompt encodes to no tokens (and this model has no BOS token to start "
                        "from); give at least one token of text",
                        "prompt",
                    )
                ids = [self.tok.bos_id]
            prompts.append(self.fit(ids, req.max_tokens))
        # NOTE: echo with logprobs returns the prompt's logprobs too (what evaluation harnesses read)
        echo_logprobs = req.echo and req.logprobs is not None
        wanted = [k for k in (req.logprobs if echo_logprobs else None, req.prompt_logprobs) if k is not None]
        params = self.sampling(
            req, req.logprobs is not None, req.logprobs or 0, plan_output(req, self.tok), max(wanted, default=None)
        )
        limits.check_completion(req, prompts, params, self.client.max_len)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        echo = [self.tok.decode(ids) if req.echo else "" for ids in prompts]
        asm = CompletionAssembler(
            new_id("cmpl"),
            self.model_name,
            self.tok,
            sum(len(p) for p in prompts),
            params.n * len(prompts),
            logprobs=params.logprobs,
            include_usage=include_usage,
            xlora_scalings=req.return_xlora_scalings,
            n=params.n,
            echo=echo,
            prompts=prompts,
            echo_logprobs=echo_logprobs,
            prompt_logprobs=req.prompt_logprobs,
        )
        return Generation(self.client, req, prompts, params, asm)

    # ---- the other routes --------------------------------------------------------------------------
    def tokenize(self, body: dict) -> dict:
        req = P.parse(P.TokenizeRequest, body)
        self.check_model(req.model)
        if req.messages is not None:
            ids = self.encode_chat(req.messages, req.add_generation_prompt, None)
        else:
            ids = self.tok.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return {"count": len(ids), "max_model_len": self.client.max_len, "tokens": ids}

    def detokenize(self, body: dict) -> dict:
        req = P.parse(P.DetokenizeRequest, body)
        self.check_model(req.model)
        self.check_ids(req.tokens, "tokens", "token id")
        return {"prompt": self.tok.decode(req.tokens, skip_special_tokens=False)}

    def models(self) -> dict:
        return {"object": "list", "data": [self.model()]}

    def model(self, name: str | None = None) -> dict:
        """GET /v1/models/{id}: the served model (404 for any other id)."""
        if name is not None:
            self.check_model(name)
        return {
            "id": self.model_name,
            "object": "model",
            "created": now(),
            "owned_by": "mistralrs-py",
            "max_model_len": self.client.max_len,
        }

    def tokenizer_info(self) -> dict:
        """GET /tokenizer_info (vLLM's): what a client needs to tokenize as the server does
        (lm-evaluation-harness's remote tokenizer reads it)."""
        tok = self.tok
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token,
            "eos_token": tok.eos_token,
            "pad_token": None,
            "chat_template": tok.chat_template,
            "model_max_length": self.client.max_len,
            "vocab_size": tok.vocab_size,
        }

    # ---- the steps ---------------------------------------------------------------------------------
    def check_model(self, name: str) -> None:
        if name not in (self.model_name, "default"):
            raise P.InvalidRequest(
                f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                "model",
                404,
                "not_found_error",
                "model_not_found",
            )

    def check_fan_out(self, prompts: int, n: int) -> None:
        """One request may not create more sequences than the server runs and queues together."""
        limit = self.client.max_request_sequences
        if limit is not None and prompts * n > limit:
            raise P.InvalidRequest(
                f"this request asks for {prompts * n} sequences ({prompts} prompt(s) x n={n}); "
                f"one request may ask for at most {limit} (--max-seqs + --max-waiting)",
                "n",
            )

    def check_ids(self, ids: list[int], param: str, what: str) -> None:
        bad = [t for t in ids if not 0 <= t < self.tok.vocab_size]
        if bad:
            raise P.InvalidRequest(f"{what} {bad[0]} is outside the vocabulary", param)

    def encode_chat(
        self,
        messages: list[P.ChatMessage],
        add_generation_prompt: bool,
        kwargs: dict | None,
        tools: list[dict] | None = None,
    ) -> list[int]:
        if not self.tok.chat_template:
            raise P.InvalidRequest(NO_TEMPLATE, "messages")
        extra = {"tools": tools} if tools else {}
        try:
            return self.tok.encode_chat(
                [template_message(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **(kwargs or {}),
                **extra,
            )
        except ChatTemplateError as e:
            raise P.InvalidRequest(str(e), "messages") from None

    def fit(self, ids: list[int], max_tokens: int | None) -> list[int]:
        return fit_context(ids, max_tokens, self.client.max_len, self.truncate_sequence)

    def sampling(
        self, req: P.SamplingFields, logprobs: bool, top: int, plan: OutputPlan, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        grammar = None
        if plan.grammar is not None:
            try:
                grammar = self.client.grammars.compile(plan.grammar)
            except GrammarError as e:
                raise P.InvalidRequest(f"{plan.param}: {e}", plan.param) from None
        return req.to_sampling_params(
            repeat_last_n=self.repeat_last_n,
            vocab_size=self.tok.vocab_size,
            logprobs=logprobs,
            top_logprobs=top,
            grammar=grammar,
            # NOTE: a tool-call marker that is a special token must reach the parser as text
            skip_special_tokens=False if plan.keep_special_tokens else None,
            prompt_logprobs=prompt_logprobs if prompt_logprobs is not None else req.prompt_logprobs,
        )


def fit_context(ids: list[int], max_tokens: int | None, limit: int, truncate: bool) -> list[int]:
    """The context rule. NOTE: --truncate-sequence (as mistral.rs): an over-long prompt loses tokens
    from the left so that max_tokens (or 10 tokens when absent) still fit; without it, an error."""
    room = max_tokens or 0
    if len(ids) + room <= limit and len(ids) < limit:
        return ids
    keep = limit - (max_tokens or 10)
    if truncate and keep > 0:
        return ids[-keep:]
    raise P.ContextTooLong(
        f"This model's maximum context length is {limit} tokens. However, you requested {len(ids) + room} tokens "
        f"({len(ids)} in the prompt, {room} in the completion). Reduce the prompt or max_tokens, "
        "or turn on --truncate-sequence (truncate_sequence=True in Python).",
        len(ids),
        limit,
    )


def template_message(m: P.ChatMessage) -> dict:
    """A message as chat templates take it: OpenAI's fields, with tool call arguments as objects
    (HF templates write them with `tojson`; a JSON string would be quoted twice), and text content
    ("" for an assistant turn that only calls tools: templates apply string filters to it)."""
    out: dict = {"role": m.role, "content": m.text()}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        calls = []
        for c in m.tool_calls:
            try:
                args = json.loads(c.function.arguments)
            except ValueError:
                args = c.function.arguments
            calls.append({"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": args}})
        out["tool_calls"] = calls
    return out
