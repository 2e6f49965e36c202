"""Structured outputs and tool calls through the official openai SDK, against real server processes
on the embedded model, with a Hermes-style and a Llama 3.1-style chat template written for the tests.
Every answer is checked with jsonschema (an independent validator), not with our own code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import client, running_server

TEMPLATES = Path(__file__).parent / "templates"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "unit", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "The weather forecast for a city", "parameters": WEATHER},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time now",
            "parameters": {"type": "object", "properties": {}},
        },
    },
]
ASK = [{"role": "user", "content": "What will the weather be in Paris for the next 3 days?"}]


class Address(BaseModel):
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    score: float = Field(ge=0, le=1)
    role: Literal["admin", "user", "guest"]
    nickname: Optional[str] = Field(max_length=12)
    address: Address
    tags: list[Literal["a", "b", "c"]] = Field(max_length=3)


@pytest.fixture(scope="module", params=["hermes", "llama31"])
def server(request):
    with running_server(
        ["--max-seqs", "4", "--chat-template", str(TEMPLATES / f"{request.param}.jinja")], ["gguf-mistral"]
    ) as srv:
        yield client(srv.url), request.param, srv.url


def test_parse_with_a_pydantic_model_returns_the_object(server):
    c, _, _ = server
    done = c.chat.completions.parse(
        model="default",
        messages=[{"role": "user", "content": "Make up a person."}],
        response_format=Person,
        temperature=0.7,
        seed=1,
        max_tokens=300,
    )
    person = done.choices[0].message.parsed
    assert isinstance(person, Person) and done.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(done.choices[0].message.content), Person.model_json_schema())


def test_nested_json_schema_holds_streamed_and_with_n_choices(server):
    c, _, _ = server
    # NOTE: the strict form the SDK sends (additionalProperties false, every field required): a plain
    # pydantic schema allows extra properties, and JSON Schema's rule is that they are then allowed
    schema = openai.pydantic_function_tool(Person)["function"]["parameters"]
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    texts = ["", ""]
    for chunk in c.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "A person, please."}],
        response_format=fmt,
        n=2,
        temperature=1.0,
        seed=7,
        max_tokens=300,
        stream=True,
    ):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
    for t in texts:
        jsonschema.validate(json.loads(t), schema)
    plain = c.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "Give me a JSON object with the keys name and age of a person."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
        logprobs=True,
    )
    assert plain.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(plain.choices[0].message.content), dict)
    assert len(plain.choices[0].logprobs.content) == plain.usage.completion_tokens


def check_calls(calls, names):
    assert calls
    by_name = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for call in calls:
        assert call.type == "function" and call.id and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), by_name[call.function.name])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_and_stream_the_same(server, choice):
    c, _, _ = server
    kw = dict(
        model="default",
        messages=ASK,
        tools=TOOLS,
        tool_choice=choice,
        temperature=0,
        max_tokens=200,
        parallel_tool_calls=False,
    )
    whole = c.chat.completions.create(**kw)
    msg = whole.choices[0]
    assert msg.finish_reason == "tool_calls" and msg.message.content is None
    names = {"get_weather"} if isinstance(choice, dict) else {"get_weather", "get_time"}
    check_calls(msg.message.tool_calls, names)
    # streamed: id, type and name first, the arguments in pieces; reassembled, the same call
    calls: dict[int, dict] = {}
    pieces = 0
    finish = None
    for chunk in c.chat.completions.create(**kw, stream=True):
        ch = chunk.choices[0]
        finish = ch.finish_reason or finish
        for d in ch.delta.tool_calls or ():
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name
                calls[d.index] = {"name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and not d.function.name
                calls[d.index]["arguments"] += d.function.arguments
                pieces += 1
    assert finish == "tool_calls" and pieces > 1
    assert [(x["name"], json.loads(x["arguments"])) for x in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in msg.message.tool_calls
    ]


def test_a_forced_call_cut_short_by_max_tokens_keeps_what_was_written(server):
    """As OpenAI answers: the call stays in the message with the arguments written so far, and
    finish_reason "length" says they may not parse; streamed, the call is cut short the same way."""
    c, _, _ = server
    kw = dict(
        model="default",
        messages=ASK,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=24,
    )
    whole = c.chat.completions.create(**kw)
    ch = whole.choices[0]
    assert ch.finish_reason == "length" and whole.usage.completion_tokens == 24
    assert ch.message.content is None
    [call] = ch.message.tool_calls
    assert call.id and call.function.name == "get_weather" and call.function.arguments
    with pytest.raises(json.JSONDecodeError):
        json.loads(call.function.arguments)  # cut short: 24 tokens do not close the object
    # NOTE: streamed, the same kind of answer (not compared text for text: this second request reads
    # the prompt from the prefix cache, and a last-bit difference may pick other whitespace)
    streamed, names, finish = "", [], None
    for chunk in c.chat.completions.create(**kw, stream=True):
        if chunk.choices:
            finish = chunk.choices[0].finish_reason or finish
            assert not chunk.choices[0].delta.content
            for d in chunk.choices[0].delta.tool_calls or ():
                assert d.index == 0
                names += [d.function.name] if d.function.name else []
                streamed += d.function.arguments or ""
    assert finish == "length" and names == ["get_weather"] and streamed.startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(streamed)


def test_a_follow_up_turn_with_the_tool_result(server):
    c, _, _ = server
    first = c.chat.completions.create(
        model="default",
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        temperature=0,
        max_tokens=200,
        parallel_tool_calls=False,
    )
    call = first.choices[0].message.tool_calls[0]
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"forecast": "sunny", "high": 24})},
    ]
    second = c.chat.completions.create(model="default", messages=history, tools=TOOLS, temperature=0, max_tokens=40)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # the call and its result reached the prompt
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 15
    none = c.chat.completions.create(
        model="default", messages=ASK, tools=TOOLS, tool_choice="none", max_tokens=20, temperature=0
    )
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def test_unsupported_schemas_and_conflicts_are_400s(server):
    c, _, _ = server
    bad = [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}},
                }
            },
            "not",
        ),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "nope"),
        ({"functions": [{"name": "f"}]}, "tools"),
        ({"extra_body": {"structured_outputs": {"regex": "a", "whitespace_pattern": " "}}}, "whitespace_pattern"),
    ]
    for extra, word in bad:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="default", messages=ASK, max_tokens=5, **extra)
        assert word in e.value.body["message"], e.value.body


def test_completions_take_vllm_style_constraints(server):
    c, _, _ = server
    out = c.completions.create(
        model="default",
        prompt="Is the sky blue? Answer:",
        max_tokens=5,
        extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
    )
    assert out.choices[0].text in ("yes", "no")
    out = c.completions.create(
        model="default",
        prompt="A date:",
        max_tokens=20,
        extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"},
    )
    assert __import__("re").fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", out.choices[0].text)


def test_langchain_structured_output_and_bind_tools(server):
    pytest.importorskip("langchain_openai", reason="langchain-openai is not installed")
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    _, _, url = server
    llm = ChatOpenAI(
        base_url=f"{url}/v1", api_key="unused", model="default", temperature=0, max_tokens=300, max_retries=0
    )

    class City(BaseModel):
        name: str = Field(max_length=20)
        population: int = Field(ge=0)

    # NOTE: strict, as users ask for dependable output: the schema then forbids extra properties (a
    # 135M model can otherwise invent fields until max_tokens cuts the call short)
    for method in ("json_schema", "function_calling"):
        got = llm.with_structured_output(City, method=method, strict=True).invoke("Name a big city.")
        assert isinstance(got, City), method

    @tool
    def get_weather(city: str, days: int) -> str:
        """The weather forecast for a city over some days."""
        return "sunny"

    msg = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("Weather in Paris for 3 days?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    args = msg.tool_calls[0]["args"]
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
