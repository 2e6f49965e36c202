"""A stop string never cuts an answer held to a grammar (the README's promise: a schema's answer always
validates unless max_tokens cuts it): on the tiny model, through the Python API, checked with
jsonschema (an independent validator). Without a grammar the same stop string still cuts."""

from __future__ import annotations

import json

import jsonschema
import pytest

from mistralrs_py import Runner

SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}, "c": {"enum": ["x", "y"]}},
    "required": ["a", "b", "c"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def runner(tiny_llama):
    with Runner(model_id=str(tiny_llama), dtype="float32", max_seqs=4, max_model_len=128) as r:
        yield r


@pytest.mark.parametrize("stop", [[","], [":", "}"], ['"']])
def test_a_stop_string_does_not_cut_a_schema_answer(runner, stop):
    r = runner.chat([{"role": "user", "content": "hi"}], response_format=FORMAT, stop=stop, max_tokens=80, n=3, seed=1)
    for choice in r["choices"]:
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), SCHEMA)


def test_stop_strings_still_cut_free_text(runner):
    free = runner.complete('{"a": true, "b": 1', max_tokens=30, temperature=0, ignore_eos=True)["choices"][0]
    text = free["text"]
    assert len(text) > 2  # the reference: what the model writes unconstrained
    stop = text[1:3]
    cut = runner.complete('{"a": true, "b": 1', max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert cut["choices"][0]["text"] == text[: text.index(stop)] and cut["choices"][0]["finish_reason"] == "stop"
