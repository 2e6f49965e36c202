"""The Responses API without a model: request -> chat request, refusals, and scripted engine events ->
Response objects and stream events, checked against the openai SDK's own types."""

from __future__ import annotations

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from mistralrs_py.engine.request import Delta, Done
from mistralrs_py.openai.protocol import InvalidRequest
from mistralrs_py.openai.responses import ChatAssembler
from mistralrs_py.openai.responses_api import ResponsesAssembler
from mistralrs_py.openai.responses_protocol import chat_body, parse_request, renamed
from mistralrs_py.openai.tool_calls import ToolCallParser
from mistralrs_py.openai.tool_formats import FORMATS

EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
TOOL = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}, "strict": True}


def test_a_request_becomes_the_chat_request_meaning_the_same():
    req = parse_request(
        {
            "instructions": "Be brief.",
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Weather"}, {"type": "input_text", "text": "?"}],
                },
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look."}]},
                {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}", "id": "fc_1"},
                {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "rain"}],
                },
            ],
            "max_output_tokens": 5,
            "temperature": 0,
            "tools": [TOOL],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}, "strict": True}},
            "seed": 3,
            "store": True,
            "unknown_field": 1,
        }
    )
    body = chat_body(req)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [{"id": "call_1", **call}, {"id": "call_2", **call}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]
    assert body["max_tokens"] == 5 and body["temperature"] == 0 and body["seed"] == 3
    assert body["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}, "strict": True}}
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": True},
    }
    assert chat_body(parse_request({"input": "Hi"}))["messages"] == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "function"}]}, "tools.0.name"),
        ({"tools": [TOOL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        ({"top_logprobs": 2}, "top_logprobs"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.content.0.type",
        ),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "x"}]}]}, "input.0.content.0.type"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input.0.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input.0.call_id"),
        ({"input": [{"content": "no role"}]}, "input.0.role"),
        ({"input": []}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_what_is_not_supported_is_a_400_naming_it(extra, param):
    with pytest.raises(InvalidRequest) as e:
        chat_body(parse_request({"input": "Hi", **extra}))
    assert e.value.status == 400 and e.value.param == param, e.value.message


def test_chat_errors_are_given_in_this_apis_names():
    e = renamed(InvalidRequest('response_format: Unimplemented keys: ["not"]', "response_format"))
    assert (e.message, e.param) == ('text.format: Unimplemented keys: ["not"]', "text.format")
    e = renamed(InvalidRequest("messages.2.content: bad", "messages.2.content"))
    assert (e.message, e.param) == ("input: bad", "input")


def run(req: dict, texts: list[str], finish: str, parser=None) -> tuple[list[dict], dict]:
    chat = ChatAssembler("chatcmpl-1", "m", None, 7, 1, parsers=[parser])
    asm = ResponsesAssembler(chat, parse_request(req), "m")
    events = asm.head()
    for t in texts:
        events += asm.feed(Delta(0, t, [1]))
    events += asm.feed(Done(0, finish, 7, len(texts)))
    events += asm.tail()
    for ev in events:
        EVENTS.validate_python(ev)
    assert [ev["sequence_number"] for ev in events] == list(range(len(events)))
    resp = asm.response()
    Response.model_validate(resp)
    assert events[-1]["response"] == resp
    return events, resp


def test_text_streams_as_one_message_and_ends_completed():
    events, resp = run({"input": "Hi"}, ["Hel", "lo"], "stop")
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert resp["status"] == "completed" and resp["incomplete_details"] is None
    assert resp["output"][0]["content"][0]["text"] == "Hello" and resp["output"][0]["status"] == "completed"
    assert resp["usage"] == {
        "input_tokens": 7,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9,
    }


def test_a_length_cut_is_incomplete_and_an_empty_answer_is_still_a_message():
    events, resp = run({"input": "Hi", "max_output_tokens": 1}, ["Hel"], "length")
    assert events[-1]["type"] == "response.incomplete"
    assert resp["status"] == "incomplete" and resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["status"] == "incomplete"
    _, resp = run({"input": "Hi"}, [], "stop")
    assert resp["output"][0]["content"][0]["text"] == ""


def test_calls_stream_as_function_call_items():
    parser = ToolCallParser(FORMATS["hermes"], {"get_weather"}, incremental=True)
    text = ['<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": ', '"Paris"}}\n</tool_call>']
    req = {"input": "Hi", "tools": [TOOL], "tool_choice": "required"}
    events, resp = run(req, text, "stop", parser)
    kinds = [e["type"] for e in events]
    assert kinds[2] == "response.output_item.added" and "response.output_text.delta" not in kinds
    assert kinds[-4:] == [
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    (item,) = resp["output"]
    deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
    assert item["type"] == "function_call" and item["name"] == "get_weather" and item["status"] == "completed"
    assert item["id"].startswith("fc_") and item["call_id"].startswith("call_")
    assert deltas == item["arguments"] == '{"city": "Paris"}'
    assert resp["tool_choice"] == "required" and resp["tools"][0]["name"] == "get_weather"
    # NOTE: cut short, the call stays in the output, marked incomplete
    parser = ToolCallParser(FORMATS["hermes"], {"get_weather"}, incremental=True)
    _, resp = run(req, text[:2], "length", parser)
    assert resp["output"][0]["status"] == "incomplete" and resp["status"] == "incomplete"
