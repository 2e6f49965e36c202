"""POST /v1/responses through the official openai SDK (and LangChain) against real server processes on
the embedded model: plain, streamed, cut short, held to a schema, calling tools, and what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import Response

from tests.server.conftest import client, running_server

HERMES_TOOLS = Path(__file__).parents[2] / "mistralrs_py" / "chat_templates" / "hermes-tools.jinja"
WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 30},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": WEATHER},
    {"type": "function", "name": "get_time", "description": "The time now", "parameters": {"type": "object"}},
]
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def url(embedded_gguf_server):
    return embedded_gguf_server


@pytest.fixture(scope="module")
def tools_url():
    with running_server(["--max-seqs", "4", "--chat-template", str(HERMES_TOOLS)], ["gguf-mistral"]) as srv:
        yield srv.url


def prompt_tokens(url: str, messages: list[dict]) -> int:
    return httpx.post(f"{url}/tokenize", json={"messages": messages}).json()["count"]


def test_a_plain_response_has_text_and_its_usage(url):
    r = client(url).responses.create(model="default", input="Hi", temperature=0, max_output_tokens=20)
    assert r.object == "response" and r.id.startswith("resp_") and r.store is False
    assert r.status in ("completed", "incomplete") and r.output_text.strip()
    assert r.usage.input_tokens == prompt_tokens(url, [{"role": "user", "content": "Hi"}])
    assert 0 < r.usage.output_tokens <= 20
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    # NOTE: the raw JSON validates as the SDK's Response model, with nothing filled in by defaults
    raw = httpx.post(f"{url}/v1/responses", json={"input": "Hi", "max_output_tokens": 5, "temperature": 0})
    Response.model_validate(raw.json())


def test_instructions_are_a_leading_system_message(url):
    c = client(url)
    told = c.responses.create(
        model="default", input="Hi", instructions="You are a pirate.", temperature=0, max_output_tokens=5
    )
    longer = c.responses.create(
        model="default",
        input="Hi",
        instructions="You are a pirate who sails the seven seas.",
        temperature=0,
        max_output_tokens=5,
    )
    listed = c.responses.create(
        model="default",
        input=[
            {"role": "system", "content": "You are a pirate."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]},
        ],
        temperature=0,
        max_output_tokens=5,
    )
    system = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
    assert told.usage.input_tokens == prompt_tokens(url, system) == listed.usage.input_tokens
    assert longer.usage.input_tokens > told.usage.input_tokens
    assert told.instructions == "You are a pirate." and told.output_text == listed.output_text


def test_a_stream_is_typed_events_in_order_ending_completed(url):
    events = list(
        client(url).responses.create(
            model="default", input="Say hello", temperature=0, max_output_tokens=100, stream=True
        )
    )
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and text == events[-4].text == final.output_text
    assert final.status == "completed" and final.usage.output_tokens > 0
    assert events[0].response.id == final.id and events[0].response.status == "in_progress"


def test_the_sse_frames_name_their_event_and_end_without_done(url):
    body = {"input": "Hi", "temperature": 0, "max_output_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{url}/v1/responses", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line and not line.startswith(":")]
    names = [line[len("event: ") :] for line in lines if line.startswith("event: ")]
    datas = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")]
    assert names == [d["type"] for d in datas] and names[-1] == "response.incomplete"
    assert "[DONE]" not in "".join(lines)


def test_the_sdk_stream_helper_accepts_the_events(url):
    with client(url).responses.stream(model="default", input="Say hello", temperature=0, max_output_tokens=100) as s:
        deltas = "".join(e.delta for e in s if e.type == "response.output_text.delta")
        final = s.get_final_response()
    assert final.output_text == deltas and final.status == "completed"


def test_max_output_tokens_cuts_the_answer_and_says_so(url):
    r = client(url).responses.create(model="default", input="Tell me a long story.", temperature=0, max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 3 and r.output[0].status == "incomplete" and r.output_text


def test_a_json_schema_format_is_followed(url):
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
        "required": ["name", "population"],
        "additionalProperties": False,
    }
    r = client(url).responses.create(
        model="default",
        input="Name a big city and its population.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=100,
    )
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)


def test_a_required_tool_choice_gives_a_function_call_and_its_output_can_follow(tools_url):
    c = client(tools_url)
    r = c.responses.create(
        model="default",
        input=ASK,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=80,
    )
    assert r.status == "completed"
    (call,) = r.output
    assert call.type == "function_call" and call.status == "completed"
    assert call.id.startswith("fc_") and call.call_id.startswith("call_")
    schema = next(t["parameters"] for t in TOOLS if t["name"] == call.name)
    jsonschema.validate(json.loads(call.arguments), schema)
    follow = c.responses.create(
        model="default",
        input=[
            {"role": "user", "content": ASK},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": json.dumps({"sky": "sunny"})},
        ],
        tools=TOOLS,
        tool_choice="none",
        temperature=0,
        max_output_tokens=30,
    )
    assert follow.output[0].type == "message" and follow.output_text
    assert follow.usage.input_tokens > r.usage.input_tokens


def test_a_named_tool_choice_streams_its_arguments(tools_url):
    events = list(
        client(tools_url).responses.create(
            model="default",
            input=ASK,
            tools=TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            temperature=0,
            max_output_tokens=80,
            stream=True,
        )
    )
    final = events[-1].response
    assert events[-1].type == "response.completed"
    (call,) = final.output
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert call.name == "get_weather" and deltas == done.arguments == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_previous_response_id_is_refused_the_server_is_stateless(url):
    with pytest.raises(openai.BadRequestError) as e:
        client(url).responses.create(model="default", input="Hi", previous_response_id="resp_123")
    assert "stateless" in e.value.message and e.value.body["param"] == "previous_response_id"


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"background": True}, "background"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0.type",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"not": {}}}}}, "text.format"),
    ],
)
def test_unsupported_features_are_400s_naming_them(url, extra, param):
    r = httpx.post(f"{url}/v1/responses", json={"input": "Hi", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_a_generation_failing_mid_stream_ends_with_an_error_event(tiny_llama, monkeypatch):
    import torch

    from mistralrs_py import sampling
    from mistralrs_py.engine.client import EngineClient
    from mistralrs_py.engine.engine import Engine
    from mistralrs_py.engine.model_runner import ModelRunner
    from mistralrs_py.openai.service import OpenAIService
    from mistralrs_py.pipeline.base import ModelSpec
    from mistralrs_py.pipeline.hf import load_safetensors_dir
    from mistralrs_py.server.app import ServerConfig, create_app

    from .conftest import in_process_server

    real_row, real_batch = ModelRunner._sample_row, sampling.sample_batch

    def row(self, seq, *rest):
        if seq.params.seed == 666 and seq.num_output >= 2:
            raise RuntimeError("injected sampling fault")
        return real_row(self, seq, *rest)

    def batch(logits, params, *rest):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected batch fault")  # NOTE: the engine then samples row by row
        return real_batch(logits, params, *rest)

    monkeypatch.setattr(ModelRunner, "_sample_row", row)
    monkeypatch.setattr(sampling, "sample_batch", batch)
    pipe = load_safetensors_dir(tiny_llama, ModelSpec(model_id=str(tiny_llama)), torch.device("cpu"), torch.float32)
    service = OpenAIService(EngineClient(pipe, Engine(pipe, max_seqs=2)), model_name="tiny")
    with in_process_server(create_app(service, ServerConfig(metrics=False, ui=False))) as live:
        body = {"input": "Hi", "max_output_tokens": 20, "seed": 666, "stream": True}
        text = httpx.post(f"{live}/v1/responses", json=body, timeout=60).text
    events = [json.loads(x[len("data: ") :]) for x in text.splitlines() if x.startswith("data: ")]
    assert events[0]["type"] == "response.created" and events[-1]["type"] == "error"
    assert "injected" in events[-1]["message"] and "[DONE]" not in text


def test_langchain_chat_openai_with_the_responses_api(url):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(
        base_url=f"{url}/v1", api_key="x", model="default", use_responses_api=True, temperature=0, max_tokens=20
    )
    msg = llm.invoke("Hi")
    assert msg.text.strip() and msg.usage_metadata["output_tokens"] > 0
