"""The Python API (`from mistralrs_py import Runner`): OpenAI-shaped results on a tiny model, early
exit aborts, chat templates, and the README's example run as a user would run it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mistralrs_py import ContextTooLong, LoadError, Runner
from mistralrs_py.pipeline.chat_template import load_chat_template

README = Path(__file__).resolve().parents[1] / "README.md"
Q = [{"role": "user", "content": "What is the capital of France?"}]
BRACKETS = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]"


@pytest.fixture(scope="module")
def runner(tiny_llama):
    with Runner(model_id=str(tiny_llama), dtype="float32", max_seqs=2, max_model_len=128) as r:
        yield r


def test_import_does_not_pull_in_torch():
    code = (
        "import sys, mistralrs_py; assert 'torch' not in sys.modules, 'torch at import time'; "
        "from mistralrs_py import Runner; assert 'torch' in sys.modules and Runner.__module__ == 'mistralrs_py.api'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chat_is_openai_shaped(runner):
    r = runner.chat(Q, temperature=0, max_tokens=6, ignore_eos=True)
    assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-") and r["model"] == runner.model
    (choice,) = r["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    assert r["usage"]["completion_tokens"] == 6
    assert r["usage"]["prompt_tokens"] == len(runner.tokenizer.encode_chat(Q))
    assert r["usage"]["total_tokens"] == r["usage"]["prompt_tokens"] + 6
    assert runner.chat(Q, temperature=0, max_tokens=6, ignore_eos=True)["choices"][0]["message"] == choice["message"]


def test_stream_chat_reassembles_to_chat(runner):
    full = runner.chat(Q, temperature=0, max_tokens=12)
    chunks = list(runner.stream_chat(Q, temperature=0, max_tokens=12))
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == full["choices"][0]["message"]["content"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finishes == [full["choices"][0]["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    assert len([c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]) >= 2


def test_leaving_a_stream_early_aborts_it(runner):
    aborted = runner.client.snapshot()["aborted"]
    stream = runner.stream_chat(Q, temperature=0, max_tokens=100, ignore_eos=True)
    for chunk in stream:
        if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            break
    stream.close()
    deadline = time.monotonic() + 10
    while runner.client.snapshot()["aborted"] == aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.client.snapshot()["aborted"] == aborted + 1
    while runner.client.snapshot()["kv_blocks_in_use"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.client.snapshot()["kv_blocks_in_use"] == 0


def test_sampling_options_n_seed_and_complete(runner):
    r = runner.chat(Q, n=2, temperature=1.0, seed=7, max_tokens=5)
    assert [c["index"] for c in r["choices"]] == [0, 1]
    assert runner.chat(Q, n=2, temperature=1.0, seed=7, max_tokens=5)["choices"] == r["choices"]
    c = runner.complete("The quick brown", temperature=0, max_tokens=4, ignore_eos=True)
    assert c["object"] == "text_completion" and c["usage"]["completion_tokens"] == 4 and c["choices"][0]["text"]


def test_bad_arguments_are_clear_errors(runner):
    with pytest.raises(ValueError, match="temperature"):
        runner.chat(Q, temperature=5)
    with pytest.raises(ValueError, match="messages"):
        runner.chat([{"role": "wizard", "content": "hi"}])
    with pytest.raises(TypeError, match="stream_chat"):
        runner.chat(Q, stream=True)
    with pytest.raises(ContextTooLong) as e:
        runner.chat([{"role": "user", "content": "word " * 200}])
    assert e.value.limit == 128 and e.value.prompt_tokens > 128


# ---- chat templates ------------------------------------------------------------------------------------
def test_model_without_template_names_the_option(no_template_model):
    with Runner(model_id=str(no_template_model), dtype="float32", max_seqs=1) as r:
        with pytest.raises(ValueError, match="chat_template=FILE"):
            r.chat(Q)
        assert r.complete("Hello", max_tokens=2)["usage"]["completion_tokens"] >= 1  # completions need no template


@pytest.mark.parametrize("kind", ["jinja", "tokenizer_config", "chat_template_json"])
def test_chat_template_override(no_template_model, tmp_path, kind):
    if kind == "jinja":
        f = tmp_path / "t.jinja"
        f.write_text(BRACKETS)
    else:
        f = tmp_path / ("tokenizer_config.json" if kind == "tokenizer_config" else "chat_template.json")
        f.write_text(
            json.dumps({"chat_template": BRACKETS, **({"eos_token": "x"} if kind == "tokenizer_config" else {})})
        )
    assert load_chat_template(f) == BRACKETS
    with Runner(model_id=str(no_template_model), dtype="float32", max_seqs=1, chat_template=str(f)) as r:
        out = r.chat(Q, max_tokens=2)
        expected = r.tokenizer.encode("[user] What is the capital of France?\n[assistant]", add_special_tokens=False)
        assert out["usage"]["prompt_tokens"] == len(expected)


def test_bad_chat_template_files_fail_before_loading(tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(LoadError, match=r"--chat-template .*bad\.jinja: line 1"):
        load_chat_template(bad)
    with pytest.raises(LoadError, match="no such file"):
        load_chat_template(tmp_path / "missing.jinja")
    j = tmp_path / "x.json"
    j.write_text(json.dumps({"bos_token": "<s>"}))
    with pytest.raises(LoadError, match="chat_template"):
        load_chat_template(j)
    with pytest.raises(LoadError, match="bad.jinja"):  # before any weights are read: the model does not exist
        Runner(model_id=str(tmp_path / "no-such-model"), chat_template=str(bad))


# ---- the README ------------------------------------------------------------------------------------------
def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    examples = [b for b in blocks if "from mistralrs_py import Runner" in b]
    assert examples, "README.md has no ```python example using `from mistralrs_py import Runner`"
    return examples[0]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path):
    """The example exactly as the README shows it, in a fresh interpreter, on the embedded model."""
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "Paris" in lines[0], out.stdout  # the chat() answer
    assert "'completion_tokens'" in lines[1]  # its usage
    assert lines[2] == lines[0]  # stream_chat() streams the same greedy answer


def test_a_prompt_of_no_tokens_is_refused_without_a_bos_token(tiny_llama, tmp_path):
    """Nothing to compute a first token from: with a BOS token the prompt is that token (tested over
    HTTP in tests/server/test_hardening.py), without one it is a 400-style InvalidRequest."""
    import shutil

    from mistralrs_py import InvalidRequest

    d = tmp_path / "no_bos"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["bos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with Runner(model_id=str(d), dtype="float32", max_seqs=1, max_model_len=64) as r:
        with pytest.raises(InvalidRequest, match="no tokens") as e:
            r.complete("", max_tokens=2)
        assert e.value.param == "prompt"
        assert r.complete("Hello", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_respond_gives_a_responses_api_object(runner):
    from openai.types.responses import Response

    out = runner.respond("Hello", instructions="Be brief.", max_output_tokens=4, temperature=0)
    resp = Response.model_validate(out)
    assert resp.status == "incomplete" and resp.usage.output_tokens == 4 and resp.output_text
