"""Structured outputs on every model kind (HF safetensors, GGUF, X-LoRA), on tiny random models in
this process: a random model wants to write anything, so only the grammar keeps the output valid."""

from __future__ import annotations

import json

import jsonschema
import pytest

from mistralrs_py import Runner
from mistralrs_py.pipeline.base import ModelKind, ModelSpec

# NOTE: a compact Hermes-style template: the tiny models' context is 256 tokens of a 400-word vocabulary
HERMES_SHORT = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }} {% endfor %}</tools>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    "{# calls: <tool_call>{...}</tool_call> #}"
)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": -5, "maximum": 5},
        "ok": {"type": ["boolean", "null"]},
        "kind": {"enum": ["x", "y"]},
        "items": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 1}, "maxItems": 2},
    },
    "required": ["name", "n", "ok", "kind", "items"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {
            "type": "object",
            "properties": {"key": {"type": "string", "pattern": "^[a-z]{1,6}$"}},
            "required": ["key"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """A tiny random Llama with room for long answers (a random model spends many tokens on the
    whitespace JSON allows between tokens)."""
    from tests.conftest import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("long_tiny"), "llama", seed=11, max_position_embeddings=1024)


@pytest.fixture(scope="module", params=["hf", "gguf", "xlora"])
def runner(request, long_tiny, tmp_path_factory):
    tiny_llama = long_tiny
    d = tmp_path_factory.mktemp(request.param)
    (d / "hermes.jinja").write_text(HERMES_SHORT)
    template = str(d / "hermes.jinja")
    if request.param == "hf":
        spec = ModelSpec(ModelKind.PLAIN, model_id=str(tiny_llama), dtype="float32", chat_template=template)
    elif request.param == "gguf":
        from tests.gguf_util import write_gguf

        gguf = write_gguf(tiny_llama, d / "tiny.gguf")
        spec = ModelSpec(
            ModelKind.GGUF, quantized_filename=str(gguf), tokenizer_id=str(tiny_llama), chat_template=template
        )
    else:
        from tests.lora.xlora_util import build_xlora

        spec = build_xlora(tiny_llama, d / "x", seed=5).spec(chat_template=template)
    r = Runner(spec, max_seqs=4)
    yield r
    r.close()


def test_json_schema_holds_on_a_random_model_whole_streamed_and_batched(runner):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA, "strict": True}}
    out = runner.chat(
        [{"role": "user", "content": "hello"}], response_format=fmt, n=3, temperature=1.0, seed=2, max_tokens=600
    )
    for c in out["choices"]:
        assert c["finish_reason"] == "stop", c
        jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)
    text = "".join(
        ch["choices"][0]["delta"].get("content") or ""
        for ch in runner.stream_chat(
            [{"role": "user", "content": "hi"}], response_format=fmt, temperature=0, max_tokens=600
        )
        if ch["choices"]
    )
    jsonschema.validate(json.loads(text), SCHEMA)
    done = runner.complete("The", structured_outputs={"regex": "[a-c]{3}-[0-9]{2}"}, max_tokens=20, temperature=0.8)
    assert __import__("re").fullmatch("[a-c]{3}-[0-9]{2}", done["choices"][0]["text"])
    gbnf = 'root ::= "yes" | "no" | num\nnum ::= [0-9]{2}'  # llama.cpp's grammar field
    for seed in range(4):
        done = runner.complete("The", grammar=gbnf, max_tokens=20, temperature=1.0, seed=seed)
        assert __import__("re").fullmatch("yes|no|[0-9]{2}", done["choices"][0]["text"])
    lark = 'start: "a" b+\nb: /[xy]/'
    done = runner.complete("The", structured_outputs={"grammar": lark}, max_tokens=8, temperature=1.0, seed=1)
    assert __import__("re").fullmatch("a[xy]+", done["choices"][0]["text"])


def test_a_forced_tool_call_validates_on_a_random_model(runner):
    out = runner.chat(
        [{"role": "user", "content": "look it up"}],
        tools=[TOOL],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
        seed=4,
        max_tokens=600,
    )
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    [call] = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL["function"]["parameters"])


def test_auto_tools_with_a_response_format_give_an_answer_or_a_call(runner):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    out = runner.chat(
        [{"role": "user", "content": "x"}],
        tools=[TOOL],
        response_format=fmt,
        parallel_tool_calls=False,  # NOTE: a random model would go on calling until max_tokens
        n=4,
        temperature=1.0,
        seed=9,
        max_tokens=600,
    )
    for c in out["choices"]:
        msg = c["message"]
        if msg.get("tool_calls"):
            assert c["finish_reason"] == "tool_calls", c
            for call in msg["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL["function"]["parameters"])
        else:
            assert c["finish_reason"] == "stop", c
            jsonschema.validate(json.loads(msg["content"]), SCHEMA)


def test_auto_tool_calls_stream_as_whole_calls(runner):
    fmt = {"type": "json_schema", "json_schema": {"name": "t", "schema": SCHEMA}}
    kw = dict(
        tools=[TOOL], response_format=fmt, parallel_tool_calls=False, n=4, temperature=1.0, seed=9, max_tokens=600
    )
    whole = runner.chat([{"role": "user", "content": "x"}], **kw)
    content, calls, finish = [""] * 4, [{} for _ in range(4)], [None] * 4
    for chunk in runner.stream_chat([{"role": "user", "content": "x"}], **kw):
        for ch in chunk["choices"]:
            i, d = ch["index"], ch["delta"]
            content[i] += d.get("content") or ""
            finish[i] = ch["finish_reason"] or finish[i]
            for tc in d.get("tool_calls") or ():
                if "id" in tc:
                    calls[i][tc["index"]] = [tc["function"]["name"], ""]
                calls[i][tc["index"]][1] += tc["function"]["arguments"]
    assert any(calls), "no choice called the tool: the streamed calls went untested"
    for i, c in enumerate(whole["choices"]):
        # NOTE: the same seeds, the same answers; streamed or not, the same calls and text
        got = [(n, json.loads(a)) for n, a in calls[i].values()]
        want = [
            (t["function"]["name"], json.loads(t["function"]["arguments"]))
            for t in c["message"].get("tool_calls") or ()
        ]
        assert got == want and finish[i] == c["finish_reason"]
        assert content[i] == (c["message"]["content"] or "")


MISTRAL_STYLE = (
    "{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
    "{% elif m.tool_calls %}[TOOL_CALLS] {{ m.tool_calls | map(attribute='function') | list | tojson }}</s>"
    "{% else %}{{ m.content }}</s>{% endif %}{% endfor %}"
    "{% if tools %}[AVAILABLE_TOOLS] {{ tools | map(attribute='function') | map(attribute='name') | list | tojson }}"
    "[/AVAILABLE_TOOLS]{% endif %}"
)


def test_a_special_token_marker_is_generated_as_that_token(tmp_path):
    """Mistral's [TOOL_CALLS] is a special token: the forced grammar must produce the token (not its
    letters), and the parser must see it in the text although special tokens are normally hidden.
    The model's vocabulary is wider than the tokenizer's (as padded embeddings are): the ids past it
    are never allowed."""
    from tokenizers import AddedToken, Tokenizer

    from tests.conftest import make_tiny_model

    d = make_tiny_model(tmp_path / "m", "llama", seed=12, max_position_embeddings=1024, vocab_size=416)
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.add_special_tokens([AddedToken("[TOOL_CALLS]", special=True)])
    tok.save(str(d / "tokenizer.json"))
    marker = tok.token_to_id("[TOOL_CALLS]")
    assert marker == 400
    (d / "t.jinja").write_text(MISTRAL_STYLE)
    with Runner(ModelSpec(ModelKind.PLAIN, model_id=str(d), dtype="float32", chat_template=str(d / "t.jinja"))) as r:
        gen = r.service.chat(
            dict(
                messages=[{"role": "user", "content": "x"}],
                tools=[TOOL],
                tool_choice="required",
                temperature=1.0,
                seed=3,
                n=3,
                max_tokens=400,
            )
        )
        out = gen.response()
        for c, raw in zip(out["choices"], gen.assembler.choices):
            assert raw.token_ids[0] == marker and max(raw.token_ids) < 401
            assert c["finish_reason"] == "tool_calls", raw.text
            for call in c["message"]["tool_calls"]:
                jsonschema.validate(json.loads(call["function"]["arguments"]), TOOL["function"]["parameters"])
                assert len(call["id"]) == 9 and call["id"].isalnum()  # NOTE: Mistral's templates require 9
