"""Tokenizer wrapper: incremental detokenization and sandboxed chat templates."""

from __future__ import annotations

import pytest

from mistralrs_py.pipeline.chat_template import ChatTemplateError, render_isolated, render_template
from mistralrs_py.pipeline.tokenizer import IncrementalDetokenizer, load_hf_tokenizer

TEXTS = [
    "Hello world, café naïve straße",
    "日本語のテキスト 中文 🙂🎉 emoji",
    "  leading spaces\n\ttabs\nand lines  ",
    "x" * 3 + " 12345 ü",
]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    return load_hf_tokenizer(tiny_llama)


@pytest.fixture(scope="module")
def smollm():
    import gguf

    from mistralrs_py.models.config import ModelConfig
    from mistralrs_py.pipeline.base import ModelSpec
    from mistralrs_py.pipeline.gguf import tokenizer_from_fields
    from mistralrs_py.pipeline.gguf_tokenizer import read_gguf_fields
    from mistralrs_py.pipeline.hub import embedded_gguf_path

    fields = read_gguf_fields(gguf.GGUFReader(str(embedded_gguf_path())))
    cfg = ModelConfig.from_gguf(fields, has_output_weight=False)
    return tokenizer_from_fields(fields, cfg, ModelSpec())


@pytest.mark.parametrize("which", ["tok", "smollm"])
@pytest.mark.parametrize("text", TEXTS)
def test_incremental_deltas_reassemble_exactly(request, which, text):
    t = request.getfixturevalue(which)
    prompt = t.encode("Some prompt:")
    ids = t.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(t, prompt)
    deltas = [d.add(i) for i in ids]
    deltas.append(d.flush())
    assert "".join(deltas) == t.decode(ids)
    assert not any("\ufffd" in x for x in deltas)


def test_chat_template_renders_and_adds_no_double_bos(smollm):
    ids = smollm.encode_chat([{"role": "user", "content": "Hi"}])
    text = smollm.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert ids.count(smollm.bos_id) == text.count("<|im_start|>")


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{% set x = messages.append(1) %}",
        "{{ raise_exception('nope') }}",
        "{% for %}",
    ],
)
def test_hostile_or_broken_templates_are_clean_errors(template):
    with pytest.raises(ChatTemplateError):
        render_template(template, messages=[{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        "{{ 'x' * 1000000000 }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{{ 2 ** 100000000 }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ],
)
def test_runaway_templates_fail_fast(template):
    import time

    t = time.monotonic()
    with pytest.raises(ChatTemplateError):
        render_template(template, messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - t < 10


def test_normal_templates_still_render():
    out = render_template(
        "{% for m in messages %}{{ m['role'] }}:{{ m['content'] * 2 }}|{% endfor %}{{ range(3) | list }}",
        messages=[{"role": "user", "content": "ab"}],
    )
    assert out == "user:abab|[0, 1, 2]"


# ---- rendering in a worker process with a memory limit ----------------------------------------------
MSG = [{"role": "user", "content": "x"}]


def test_the_worker_renders_what_the_sandbox_renders():
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | upper }}{% endfor %}{{ bos_token }}"
    ctx = dict(messages=[{"role": "user", "content": "héllo 日本"}], bos_token="<s>")
    assert render_isolated(template, **ctx) == render_template(template, **ctx) == "[user] HÉLLO 日本<s>"


@pytest.mark.parametrize(
    "template,why",
    [
        # grown by `~` (concatenation is no intercepted operator): 2**31 characters, past the worker's 1 GiB
        (
            "{% set ns = namespace(s='x') %}{% for i in range(31) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
            "{{ ns.s|length }}",
            "memory",
        ),
        # grown through a filter: slow enough that the time budget ends it first (the cap would too)
        (
            "{% set ns = namespace(s='xy') %}{% for i in range(31) %}{% set ns.s = ns.s|replace('x', 'xx') %}"
            "{% endfor %}{{ ns.s|length }}",
            "memory|longer than",
        ),
    ],
    ids=["concat", "filter"],
)
def test_a_template_that_grows_gigabytes_fails_alone(template, why):
    with pytest.raises(ChatTemplateError, match=why):
        render_isolated(template, messages=MSG)
    assert render_isolated("ok {{ messages|length }}", messages=MSG) == "ok 1"  # the sandbox still renders


def test_template_errors_keep_their_message_and_the_worker():
    with pytest.raises(ChatTemplateError, match="chat template error: no system role"):
        render_isolated("{{ raise_exception('no system role') }}", messages=MSG)
    assert render_isolated("{{ messages[0]['content'] }}", messages=MSG) == "x"


def test_the_embedded_models_tools_template_renders_its_own_template_without_tools():
    """The embedded model is served with the bundled smollm2-tools template: without tools it must
    give exactly what the model's own template (from its GGUF) gives, with or without a system turn."""
    from mistralrs_py.pipeline.chat_template import bundled_names, bundled_template, load_chat_template, render_template
    from mistralrs_py.pipeline.gguf import read_gguf
    from mistralrs_py.pipeline.gguf_tokenizer import tokenizer_from_gguf
    from mistralrs_py.pipeline.hub import embedded_gguf_path

    own = tokenizer_from_gguf(read_gguf(embedded_gguf_path())[0]).chat_template
    ours = bundled_template("smollm2-tools")
    assert {"hermes-tools", "smollm2-tools"} <= set(bundled_names()) and load_chat_template("smollm2-tools") == ours
    for messages in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "?"},
        ],
    ):
        for gen in (True, False):
            assert render_template(ours, messages=messages, add_generation_prompt=gen) == render_template(
                own, messages=messages, add_generation_prompt=gen
            )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    shown = render_template(ours, messages=[{"role": "user", "content": "Hi"}], tools=tools, add_generation_prompt=True)
    assert '"name": "f"' in shown and "<tool_call>" in shown
