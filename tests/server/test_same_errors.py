"""One request, one refusal: the same invalid field gets the same message over HTTP, from the
Python API (a ValueError) and in the terminal chat (/name value), since all three go through
mistralrs_py.openai.service."""

from __future__ import annotations

import io

import httpx
import pytest
from rich.console import Console

from mistralrs_py import ContextTooLong, InvalidRequest, Runner
from mistralrs_py.interactive import Chat

Q = [{"role": "user", "content": "What is the capital of France?"}]
BAD = [
    {"temperature": 5},
    {"top_p": 0},
    {"top_k": -2},
    {"seed": "7"},
    {"presence_penalty": 3},
    {"max_tokens": 0},
    {"max_tokens": 10_000},  # over the 128-token context
    {"messages": [{"role": "wizard", "content": "hi"}]},
    {"top_logprobs": 3},
    {"logit_bias": {"99999": 1}},
    {"stop": ["a", "b", "c", "d", "e"]},
    {"model": "gpt-4"},
]


@pytest.fixture(scope="module")
def runner(tiny_llama):
    # NOTE: as the tiny_server fixture: float32, a 128-token context
    with Runner(model_id=str(tiny_llama), dtype="float32", max_seqs=1, max_model_len=128) as r:
        yield r


@pytest.mark.parametrize("field", BAD, ids=lambda f: next(iter(f)))
def test_http_and_python_refuse_with_the_same_message(tiny_server, runner, field):
    url, _ = tiny_server
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": Q, **field})
    assert 400 <= r.status_code < 500
    message = r.json()["error"]["message"]
    kwargs = dict(field)
    messages = kwargs.pop("messages", Q)
    with pytest.raises(ValueError) as e:
        runner.chat(messages, **kwargs)
    assert isinstance(e.value, InvalidRequest) and str(e.value) == message
    if "max_tokens" in field and field["max_tokens"] > 1:
        assert isinstance(e.value, ContextTooLong) and e.value.limit == 128


def chat_output(runner, lines) -> str:
    out, feed = io.StringIO(), iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    Chat(runner, Console(file=out, width=400, color_system=None, highlight=False), read=read).loop()
    return out.getvalue()


@pytest.mark.parametrize(
    "name,value",
    [("temperature", "5"), ("top_p", "0"), ("top_k", "-2"), ("presence_penalty", "3"), ("max_tokens", "0")],
)
def test_the_terminal_chat_shows_the_same_message(tiny_server, runner, name, value):
    url, _ = tiny_server
    field = {name: float(value) if "." in value or name in ("temperature", "top_p", "presence_penalty") else int(value)}
    message = httpx.post(f"{url}/v1/chat/completions", json={"messages": Q, **field}).json()["error"]["message"]
    assert f"error: /{name} {value}: {message}" in chat_output(runner, [f"/{name} {value}"])
