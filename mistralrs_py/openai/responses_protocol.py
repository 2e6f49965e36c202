"""OpenAI's Responses API (POST /v1/responses), stateless: its request type, what it refuses, and its
conversion into a chat completion request (the one path that renders, constrains and runs a chat).

    req = parse_request(body)      # validated; InvalidRequest for what is malformed or not supported
    chat = chat_body(req)          # a /v1/chat/completions body meaning the same
    renamed(e)                     # an InvalidRequest from the chat path, in this API's field names
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import Field

from . import protocol as P
from .output_protocol import OpenAIModel

STATELESS = "this server is stateless (it keeps no responses or conversations)"
# NOTE: sampling fields of the chat API that this API lacks; passed through to the chat path as given
EXTENSIONS = ("seed", "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
TEXT_PARTS = ("input_text", "output_text")
MEDIA_PARTS = ("input_image", "input_file", "input_audio")


class ContentPart(OpenAIModel):
    type: str  # input_text | output_text | refusal; media parts are refused
    text: Optional[str] = None
    refusal: Optional[str] = None


Content = Union[str, list[ContentPart], None]


class InputItem(OpenAIModel):
    """One item of `input`: a message ({role, content}, with or without type "message"), a
    function_call the model made earlier, or the function_call_output answering it."""

    type: Optional[str] = None
    role: Optional[Literal["user", "assistant", "system", "developer"]] = None
    content: Content = None
    call_id: Optional[str] = None
    name: Optional[str] = None
    arguments: Optional[str] = None
    output: Content = None


class ResponsesTool(OpenAIModel):
    """Responses' flat function tool; other tool types (web_search, file_search, ...) are refused."""

    type: str
    name: Optional[Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]] = None
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None


class ToolChoiceObject(OpenAIModel):
    type: str  # only "function" is supported
    name: Optional[str] = None


class TextFormat(OpenAIModel):
    type: Literal["text", "json_object", "json_schema"]
    name: Optional[Annotated[str, Field(max_length=64)]] = None
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None


class TextConfig(OpenAIModel):
    format: Optional[TextFormat] = None
    verbosity: Optional[Literal["low", "medium", "high"]] = None


class ReasoningConfig(OpenAIModel):
    effort: Optional[str] = None
    summary: Optional[str] = None


class ResponsesRequest(OpenAIModel):
    model: str = "default"
    input: Union[str, list[InputItem]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[Annotated[int, Field(ge=1)]] = None
    temperature: Optional[P.Probability] = None
    top_p: Optional[Annotated[float, Field(gt=0.0, le=1.0)]] = None
    tools: Optional[list[ResponsesTool]] = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceObject, None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[TextConfig] = None
    stream: bool = False
    store: Optional[bool] = None  # accepted; nothing is ever stored (responses say store: false)
    metadata: Optional[dict[str, str]] = None
    user: Optional[str] = None
    truncation: Optional[Literal["auto", "disabled"]] = None
    # refused when they ask for something (see refuse_unsupported)
    previous_response_id: Optional[str] = None
    conversation: Union[str, dict[str, Any], None] = None
    background: Optional[bool] = None
    reasoning: Optional[ReasoningConfig] = None
    prompt: Optional[dict[str, Any]] = None
    include: Optional[list[str]] = None
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=20)]] = None
    # extensions (the chat API's names; validated there)
    seed: Optional[P.Seed] = None
    top_k: Optional[Annotated[int, Field(ge=-1)]] = None
    min_p: Optional[Annotated[float, Field(ge=0.0, le=1.0)]] = None
    repetition_penalty: Optional[Annotated[float, Field(ge=0.01, le=10.0)]] = None
    presence_penalty: Optional[P.Penalty] = None
    frequency_penalty: Optional[P.Penalty] = None


def parse_request(body: dict) -> ResponsesRequest:
    req = P.parse(ResponsesRequest, body)
    refuse_unsupported(req)
    return req


def refuse_unsupported(req: ResponsesRequest) -> None:
    """What this server cannot do is a 400 naming it, never a silently different answer."""
    if req.previous_response_id is not None:
        raise P.InvalidRequest(
            f"previous_response_id is not supported: {STATELESS}; send the whole conversation as input "
            "(earlier output items included)",
            "previous_response_id",
        )
    if req.conversation is not None:
        raise P.InvalidRequest(
            f"conversation is not supported: {STATELESS}; send the whole conversation as input", "conversation"
        )
    if req.prompt is not None:
        raise P.InvalidRequest(
            "prompt (a stored prompt template) is not supported: send instructions and input instead", "prompt"
        )
    if req.background:
        raise P.InvalidRequest(
            f"background responses are not supported: {STATELESS}; wait for the answer or stream it", "background"
        )
    if req.reasoning is not None and req.reasoning.effort not in (None, "none"):
        raise P.InvalidRequest(
            f"reasoning effort {req.reasoning.effort!r} is not supported: this server's models do not reason "
            "(leave reasoning out, or give effort none)",
            "reasoning.effort",
        )
    if req.top_logprobs or any("logprobs" in x for x in req.include or ()):
        raise P.InvalidRequest(
            "logprobs are not supported on /v1/responses; use /v1/chat/completions with logprobs",
            "top_logprobs" if req.top_logprobs else "include",
        )
    for i, tool in enumerate(req.tools or ()):
        if tool.type != "function":
            raise P.InvalidRequest(
                f"tools.{i}: tool type {tool.type!r} is not supported: this server takes function tools only "
                "(your code runs them and sends their output back)",
                f"tools.{i}.type",
            )
        if tool.name is None:
            raise P.InvalidRequest(f"tools.{i}.name: a function tool needs a name", f"tools.{i}.name")
    choice = req.tool_choice
    if isinstance(choice, ToolChoiceObject):
        if choice.type != "function":
            raise P.InvalidRequest(
                f"tool_choice of type {choice.type!r} is not supported: give none, auto, required or "
                '{"type": "function", "name": ...}',
                "tool_choice",
            )
        if choice.name is None:
            raise P.InvalidRequest("tool_choice: a function tool choice needs the function's name", "tool_choice")
        if choice.name not in {t.name for t in req.tools or ()}:
            raise P.InvalidRequest(f"tool_choice names {choice.name!r}, which is not among the tools", "tool_choice")
    elif choice == "required" and not req.tools:
        raise P.InvalidRequest("tool_choice is required, but no tools are given", "tool_choice")
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema" and (fmt.name is None or fmt.schema_ is None):
        raise P.InvalidRequest("text.format: a json_schema format needs its name and schema", "text.format")


# ---- a Responses request -> a chat request -------------------------------------------------------------
def chat_body(req: ResponsesRequest) -> dict:
    body: dict = {"model": req.model, "messages": chat_messages(req), "stream": req.stream}
    for name in ("temperature", "top_p", "parallel_tool_calls", *EXTENSIONS):
        value = getattr(req, name)
        if value is not None:
            body[name] = value
    if req.max_output_tokens is not None:
        body["max_tokens"] = req.max_output_tokens
    if req.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    k: v
                    for k, v in (
                        ("name", t.name),
                        ("description", t.description),
                        ("parameters", t.parameters),
                        ("strict", t.strict),
                    )
                    if v is not None
                },
            }
            for t in req.tools
        ]
    if isinstance(req.tool_choice, ToolChoiceObject):
        body["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice.name}}
    elif req.tool_choice is not None:
        body["tool_choice"] = req.tool_choice
    fmt = req.text.format if req.text else None
    if fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict, "description": fmt.description}
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {k: v for k, v in schema.items() if v is not None},
        }
    elif fmt is not None:
        body["response_format"] = {"type": fmt.type}
    return body


def chat_messages(req: ResponsesRequest) -> list[dict]:
    """`instructions` and `input` as chat messages. Function calls join the assistant message just
    before them (the text and calls of one turn), or start one; their outputs become tool messages."""
    msgs: list[dict] = []
    if req.instructions is not None:
        msgs.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        msgs.append({"role": "user", "content": req.input})
        return msgs
    calls: set[str] = set()
    for i, item in enumerate(req.input):
        where = f"input.{i}"
        kind = item.type or "message"
        if kind == "message":
            if item.role is None:
                raise P.InvalidRequest(f"{where}: a message needs a role", f"{where}.role")
            msgs.append({"role": item.role, "content": _text(item.content, f"{where}.content")})
        elif kind == "function_call":
            for name in ("call_id", "name", "arguments"):
                if getattr(item, name) is None:
                    raise P.InvalidRequest(f"{where}: a function_call item needs its {name}", f"{where}.{name}")
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            calls.add(item.call_id)
            if msgs and msgs[-1]["role"] == "assistant":
                msgs[-1].setdefault("tool_calls", []).append(call)
            else:
                msgs.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.call_id is None or item.output is None:
                raise P.InvalidRequest(f"{where}: a function_call_output item needs its call_id and output", where)
            if item.call_id not in calls:
                raise P.InvalidRequest(
                    f"{where}: no function_call item with call_id {item.call_id!r} comes before this output; "
                    f"{STATELESS}: send the call too",
                    f"{where}.call_id",
                )
            msgs.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output, f"{where}.output")}
            )
        else:
            raise P.InvalidRequest(f"{where}: {_refused_item(kind)}", f"{where}.type")
    if not msgs:
        raise P.InvalidRequest("input: give at least one message (or instructions)", "input")
    return msgs


def _refused_item(kind: str) -> str:
    if kind == "item_reference":
        return f"item_reference is not supported: {STATELESS}; send the item itself"
    if kind == "reasoning":
        return "reasoning items are not supported: this server's models do not reason; leave them out"
    return (
        f"items of type {kind!r} are not supported (this server takes messages, function_call and "
        "function_call_output items)"
    )


def _text(content: Content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    out = []
    for j, part in enumerate(content):
        if part.type in TEXT_PARTS and part.text is not None:
            out.append(part.text)
        elif part.type == "refusal" and part.refusal is not None:
            out.append(part.refusal)
        elif part.type in MEDIA_PARTS:
            raise P.InvalidRequest(
                f"{where}.{j}: {part.type} parts are not supported: this server's models read text only",
                f"{where}.{j}.type",
            )
        elif part.type in (*TEXT_PARTS, "refusal"):
            field = "refusal" if part.type == "refusal" else "text"
            raise P.InvalidRequest(f"{where}.{j}: a {part.type} part needs its {field}", f"{where}.{j}.{field}")
        else:
            raise P.InvalidRequest(
                f"{where}.{j}: content parts of type {part.type!r} are not supported (input_text, output_text, "
                "refusal)",
                f"{where}.{j}.type",
            )
    return "".join(out)


# ---- errors from the chat path, in this API's names ------------------------------------------------------
RENAMES = (
    ("messages", "input"),
    ("response_format", "text.format"),
    ("max_completion_tokens", "max_output_tokens"),
    ("max_tokens", "max_output_tokens"),
)


def renamed(e: P.InvalidRequest) -> P.InvalidRequest:
    """Changes e in place (its type and status stay): chat field names become this API's."""
    # NOTE: a chat message's index is not an input item's (instructions, calls joined to a message)
    if e.param is not None and e.param.startswith("messages."):
        e.param = "messages"
    e.message = re.sub(r"^messages\.[0-9][^:]*:", "messages:", e.message)
    for old, new in RENAMES:
        if e.param is not None and (e.param == old or e.param.startswith(old + ".")):
            e.param = new + e.param[len(old) :]
        if e.message.startswith(old + ":") or e.message.startswith(old + "."):
            e.message = new + e.message[len(old) :]
    if e.code == "context_length_exceeded":
        e.message = e.message.replace("max_tokens", "max_output_tokens")
    e.args = (e.message,)
    return e
