"""OpenAI wire types (pydantic), their validation errors, and their conversion to engine types.

Requests are validated strictly (no "5" -> 5 coercion); unknown fields are ignored, as OpenAI does.
`parse()` is the one validation path (HTTP, Runner and the terminal chat give the same messages);
`to_sampling_params()` is the one place where OpenAI names become engine names.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..engine.request import SamplingParams
from .output_protocol import (
    NamedToolChoice,
    OpenAIModel,
    ResponseFormat,
    StructuredOutputs,
    Tool,
    ToolCall,
)

MAX_STOP = 4
MAX_DEPTH = 64  # JSON nesting a request may have (ours need a handful of levels; tool schemas ~20)
# NOTE: a seed is a 64-bit integer, signed or not (the engine seeds choice i with (seed + i) mod 2**64)
Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
# NOTE: below this a temperature is greedy decoding: dividing logits by 1e-45 overflows float32
# (vLLM treats temperatures under 1e-5 the same way)
GREEDY_BELOW = 1e-5
# NOTE: names the chat template is rendered with; chat_template_kwargs may not replace them
TEMPLATE_ARGUMENTS = frozenset(
    {
        "messages",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "raise_exception",
        "strftime_now",
        "range",
        "namespace",
        "tools",
        "documents",
    }
)
_SURROGATE = re.compile("[\ud800-\udfff]")


class TextPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ContentPart(OpenAIModel):
    """A part of a message's content that is not text (image_url, input_audio, file...)."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[Union[TextPart, ContentPart]], None] = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, v):
        for part in v if isinstance(v, list) else ():
            if not isinstance(part, TextPart):
                raise ValueError(f"this model reads text only: a {part.type!r} content part cannot be given to it")
        return v

    name: Optional[str] = None
    tool_calls: Optional[list[ToolCall]] = None  # an assistant's calls, earlier in the conversation
    tool_call_id: Optional[str] = None  # a tool message: the call it answers

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(OpenAIModel):
    include_usage: bool = False


Probability = Annotated[float, Field(ge=0.0, le=2.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints, OpenAI's plus the usual extensions (vLLM/llama.cpp names)."""

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data):
        # NOTE: OpenAI's schema lets a client send `null` for an optional field (n, stream, echo, the
        # penalties...), meaning "the default"; the SDKs and LangChain do
        if isinstance(data, dict):
            fields = cls.model_fields
            data = {k: v for k, v in data.items() if not (v is None and k in fields and fields[k].default is not None)}
        return data

    model: str = "default"
    temperature: Optional[Probability] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    n: Annotated[int, Field(ge=1, le=128)] = 1
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = None  # 0: the prompt alone (echo, prompt_logprobs)
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Optional[dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]]] = None
    seed: Optional[Seed] = None
    user: Optional[str] = None
    # extensions
    top_k: Optional[Annotated[int, Field(ge=-1)]] = None
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    # NOTE: from 0.01: dividing a logit by a vanishing penalty overflows
    repetition_penalty: Optional[Annotated[float, Field(ge=0.01, le=10.0)]] = None
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    return_xlora_scalings: bool = False  # X-LoRA models: mean scalings per adapter in each choice
    prompt_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None  # vLLM's: the prompt's own logprobs
    # output constraints: OpenAI's response_format, vLLM's structured_outputs (and its older guided_*
    # names), llama.cpp's grammar (GBNF) and json_schema
    response_format: Optional[ResponseFormat] = None
    structured_outputs: Optional[StructuredOutputs] = None
    guided_json: Union[dict[str, Any], str, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[Annotated[list[str], Field(min_length=1)]] = None
    guided_grammar: Optional[str] = None
    grammar: Optional[str] = None
    json_schema: Optional[dict[str, Any]] = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty")
        return v

    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_tokens

    def to_sampling_params(
        self,
        *,
        repeat_last_n: int,
        vocab_size: int,
        logprobs: bool,
        top_logprobs: int,
        grammar=None,
        skip_special_tokens: Optional[bool] = None,
        prompt_logprobs: Optional[int] = None,
    ) -> SamplingParams:
        bias = None
        if self.logit_bias:
            bias = {}
            for k, v in self.logit_bias.items():
                # NOTE: int() would also take "+5", " 5", "5_0" and non-ASCII digits ("٥")
                if not (k.isascii() and k.isdigit()):
                    raise InvalidRequest(f"logit_bias keys must be token ids (decimal digits), got {k!r}", "logit_bias")
                tid = int(k)
                if not 0 <= tid < vocab_size:
                    raise InvalidRequest(
                        f"logit_bias token id {tid} is outside the vocabulary (0..{vocab_size - 1})", "logit_bias"
                    )
                bias[tid] = float(v)
        for t in self.stop_token_ids or ():
            if not 0 <= t < vocab_size:
                raise InvalidRequest(f"stop_token_ids: {t} is outside the vocabulary", "stop_token_ids")
        return SamplingParams(
            temperature=1.0
            if self.temperature is None
            else 0.0
            if self.temperature < GREEDY_BELOW
            else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=max(0, self.top_k or 0),
            min_p=float(self.min_p or 0.0),
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty or 1.0),
            repeat_last_n=repeat_last_n,
            logit_bias=bias,
            seed=self.seed,
            max_tokens=self.wanted_max_tokens(),
            stop=self.stops(),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            n=self.n,
            skip_special_tokens=self.skip_special_tokens if skip_special_tokens is None else skip_special_tokens,
            grammar=grammar,
            prompt_logprobs=prompt_logprobs,
        )


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    logprobs: bool = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    add_generation_prompt: bool = True
    chat_template_kwargs: Optional[dict[str, Any]] = None
    tools: Optional[list[Tool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = None
    # NOTE: OpenAI's deprecated names for tools; refused with a pointer rather than ignored
    functions: Optional[Any] = None
    function_call: Optional[Any] = None

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_kwargs(cls, v):
        taken = sorted(k for k in v or () if k in TEMPLATE_ARGUMENTS or k.startswith("_"))
        if taken:
            raise ValueError(f"may not set {', '.join(taken)} (the server passes those to the template itself)")
        return v

    def wanted_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.functions is not None or self.function_call is not None:
            raise ValueError("functions and function_call are deprecated and not supported: use tools and tool_choice")
        names = [t.function.name for t in self.tools or ()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two tools may not have one name ({', '.join(twice)})")
        if isinstance(self.tool_choice, NamedToolChoice) or self.tool_choice == "required":
            if not self.tools:
                raise ValueError("tool_choice names a tool or requires one, but no tools are given")
        if isinstance(self.tool_choice, NamedToolChoice):
            names = {t.function.name for t in self.tools or ()}
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names {self.tool_choice.function.name!r}, which is not among the tools")
        return self


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = 16  # OpenAI's default for completions
    logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    echo: bool = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and any(isinstance(p, list) and not p for p in v):
            raise ValueError("token prompts must not be empty")
        return v

    def prompts(self) -> list[Union[str, list[int]]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class TokenizeRequest(OpenAIModel):
    model: str = "default"
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_of(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(OpenAIModel):
    model: str = "default"
    tokens: list[int]


class InvalidRequest(ValueError):
    """A request that is refused; the server answers it with OpenAI's error JSON and `status`, the
    Python API raises it (a ValueError), the terminal chat prints it: the same message everywhere."""

    def __init__(
        self,
        message: str,
        param: Optional[str] = None,
        status: int = 400,
        type: str = "invalid_request_error",
        code: Optional[str] = None,
        headers: Optional[dict] = None,
    ):
        super().__init__(message)
        self.message, self.param, self.status, self.type, self.code = message, param, status, type, code
        self.headers = headers


class ContextTooLong(InvalidRequest):
    """The prompt (plus max_tokens) does not fit the served context."""

    def __init__(self, message: str, prompt_tokens: int, limit: int):
        super().__init__(message, "messages", code="context_length_exceeded")
        self.prompt_tokens, self.limit = prompt_tokens, limit


M = TypeVar("M", bound=BaseModel)


def parse(model: type[M], body: dict) -> M:
    """Validates a request body; the first problem becomes an InvalidRequest naming its field."""
    check_body(body)
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        loc = ".".join(str(x) for x in err["loc"] if not _is_union_tag(x))
        raise InvalidRequest(f"{loc or 'body'}: {err['msg']}", loc or None) from None


def check_body(body: Any) -> None:
    """What every request body must be before its fields are read: at most MAX_DEPTH levels deep,
    and text that is valid Unicode (JSON's \\ud800 escapes can make lone surrogates, which no
    tokenizer or UTF-8 file takes). Iterative, so no nesting can exhaust the stack."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidRequest(f"body: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, str):
            if _SURROGATE.search(value):
                raise InvalidRequest("body: text is not valid Unicode (it holds a lone surrogate such as \\ud800)")
        elif isinstance(value, dict):
            stack.extend((k, depth) for k in value)
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, (list, tuple)):
            stack.extend((v, depth + 1) for v in value)


def _is_union_tag(part) -> bool:
    """pydantic puts the member type of a union into error locations ('str', 'list[int]', ...)."""
    if not isinstance(part, str):
        return False
    return part in ("str", "int", "float", "bool", "none") or part.startswith(
        ("list[", "dict[", "tuple[", "function-", "constrained-", "tagged-union")
    )


def error_body(
    message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
