"""`mistralrs -i`: the terminal chat driven through a pseudo-terminal (pexpect), plus its command and
context rules on a tiny model in-process, and the --chat-template flag."""

from __future__ import annotations

import io
import os
import re
import sys

import pexpect
import pytest
from rich.console import Console
from typer.testing import CliRunner

from mistralrs_py import Runner, cli
from mistralrs_py.interactive import Chat

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TERM": "xterm", "COLUMNS": "160"}
PROMPT = ">>> "
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def spawn(*args: str, timeout: float = 90) -> pexpect.spawn:
    child = pexpect.spawn(
        sys.executable,
        ["-m", "mistralrs_py", "-i", "--threads", "1", *args],
        env=ENV,
        encoding="utf-8",
        timeout=timeout,
        dimensions=(50, 160),
    )
    child.logfile_read = io.StringIO()
    return child


def plain(text: str) -> str:
    return ANSI.sub("", text)


def screen(child) -> str:
    return plain(child.logfile_read.getvalue())


def ask(child, line: str) -> str:
    """Sends a line and returns what came back before the next prompt, colours removed."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return plain(child.before)


@pytest.mark.slow
def test_terminal_chat_on_the_embedded_model():
    child = spawn("mistral")
    try:
        child.expect_exact(PROMPT, timeout=120)
        assert "ready SmolLM2" in screen(child) and "interactive" in screen(child)
        assert "temperature = 0.0" in ask(child, "/temperature 0")
        answer = ask(child, "What is the capital of France?")
        assert "Paris" in answer and "tok/s" in answer

        # a multi-line message in a block, and a line continued with a backslash
        child.sendline('"""')
        child.sendline("Name one river")
        child.sendline('in Paris."""')
        child.expect_exact(PROMPT)
        child.sendline("Reply with one word: \\")
        child.sendline("yes")
        child.expect_exact(PROMPT)
        history = ask(child, "/history")
        assert "Name one river\r\nin Paris." in history and "Reply with one word: \r\nyes" in history
        assert history.count("assistant:") == 3 and "Paris" in history  # the model's answers are kept too

        # Ctrl-C stops the answer, not the program; the partial answer stays in the conversation
        ask(child, "/max_tokens off")
        child.sendline("Write a very long story about a dragon who learns to cook.")
        child.expect_exact("cook.\r\n")  # the echo of the question
        child.expect(r"\w+ \w+ \w+")  # the answer is streaming
        child.sendintr()
        child.expect_exact("[stopped]", timeout=20)
        child.expect_exact(PROMPT)
        assert child.isalive()
        assert "dragon who learns to cook" in ask(child, "/history")

        child.sendintr()  # at the prompt: a hint, not an exit
        child.expect_exact("Ctrl-D or /exit to leave")
        child.expect_exact(PROMPT)
        assert "conversation cleared" in ask(child, "/clear")
        assert "(empty)" in ask(child, "/history")
        assert "Paris" in ask(child, "What is the capital of France?")
        child.sendline("/exit")
        child.expect(pexpect.EOF, timeout=20)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, screen(child)


def test_model_without_template_is_refused_naming_the_flag(no_template_model, tmp_path):
    child = spawn("mistral", "-m", str(no_template_model))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 2
    out = " ".join(screen(child).split())
    assert "no chat template" in out and "--chat-template FILE" in out and "Traceback" not in out

    template = tmp_path / "t.jinja"
    template.write_text(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n"
    )
    child = spawn("--chat-template", str(template), "--dtype", "float32", "mistral", "-m", str(no_template_model))
    try:
        child.expect_exact(PROMPT)
        assert "tokens" in ask(child, "/max_tokens 5") + ask(child, "hello there")
        child.sendeof()  # Ctrl-D leaves
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0, screen(child)


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--chat-template", "/no/such/file.jinja"], "--chat-template"),
        (["--chat-template", "BAD"], "line 1"),
    ],
)
def test_cli_chat_template_errors_are_one_line(args, expect, tmp_path):
    bad = tmp_path / "bad.jinja"
    bad.write_text("{% if %}")
    args = [str(bad) if a == "BAD" else a for a in args]
    r = CliRunner().invoke(cli.app, ["--port", "0", *args, "mistral", "-m", str(tmp_path / "model-not-needed")])
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output


def test_cli_flags_reach_the_options(monkeypatch):
    seen = {}
    monkeypatch.setattr(
        "mistralrs_py.server.launch.run_server", lambda opts, spec: seen.update(opts=opts, via="server")
    )
    monkeypatch.setattr(
        "mistralrs_py.interactive.run_interactive", lambda opts, spec: seen.update(opts=opts, via="chat")
    )
    r = CliRunner().invoke(cli.app, ["-i", "--no-metrics", "--no-ui", "mistral"])
    assert r.exit_code == 0, r.output
    o = seen["opts"]
    assert (o.interactive, o.metrics, o.ui, seen["via"]) == (True, False, False, "chat")
    r = CliRunner().invoke(cli.app, ["mistral"])
    assert (seen["opts"].interactive, seen["opts"].metrics, seen["opts"].ui, seen["via"]) == (
        False,
        True,
        True,
        "server",
    )


# ---- the chat loop in-process ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runner(tiny_llama):
    with Runner(model_id=str(tiny_llama), dtype="float32", max_seqs=1, max_model_len=96) as r:
        yield r


def run_chat(runner, lines):
    out = io.StringIO()
    feed = iter(lines)

    def read(prompt):
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    chat = Chat(runner, Console(file=out, width=200, color_system=None, highlight=False), read=read)
    assert chat.loop() == 0
    return chat, out.getvalue()


def test_settings_are_checked_like_api_fields(tiny_runner):
    chat, out = run_chat(
        tiny_runner, ["/temperature 9", "/top_k 3", "/max_tokens 0", "/seed off", "/settings", "/frobnicate", "/help"]
    )
    assert all(cmd in out for cmd in ("/clear", "/system TEXT", "/temperature 0.7", "/history", "/exit", "Ctrl-C"))
    assert "error: /temperature 9" in out and "error: /max_tokens 0" in out
    assert chat.settings == {"temperature": 0.7, "top_k": 3}
    assert "temperature=0.7, top_k=3" in out
    assert "unknown command /frobnicate" in out


def test_old_turns_are_dropped_to_fit_the_context(tiny_runner):
    long = "The quick brown fox jumps over the lazy dog. " * 2  # ~24 tokens with the template
    chat, out = run_chat(tiny_runner, ["/max_tokens 8", "/temperature 0", *(f"{i} {long}" for i in range(4)), "/exit"])
    assert "dropped the oldest exchange" in out
    users = [m["content"] for m in chat.turns if m["role"] == "user"]
    assert users[-1].startswith("3 ") and not any(u.startswith("0 ") for u in users)
    assert len(tiny_runner.tokenizer.encode_chat(chat.conversation())) <= 96


def test_a_message_alone_too_long_is_an_error_not_a_crash(tiny_runner):
    chat, out = run_chat(tiny_runner, ["word " * 300, "/history"])
    assert "error: this message is" in out and "the context holds 96" in out
    assert chat.turns == [] and "(empty)" in out


def test_slash_slash_sends_a_message_starting_with_a_slash(tiny_runner):
    chat, out = run_chat(tiny_runner, ["/max_tokens 2", "//etc/hosts is a file"])
    assert chat.turns[0] == {"role": "user", "content": "/etc/hosts is a file"}
    assert chat.turns[1]["role"] == "assistant" and chat.turns[1]["content"]  # the answer came back
    assert "tokens," in out  # and its stats line


def test_json_and_schema_commands_shape_the_answers(tiny_runner, tmp_path):
    import json

    good, bad = tmp_path / "ab.json", tmp_path / "bad.json"
    schema = {
        "type": "object",
        "properties": {"a": {"enum": ["x", "y"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    good.write_text(json.dumps(schema))
    bad.write_text(json.dumps({"not": {"type": "null"}}))
    chat, out = run_chat(tiny_runner, [f"/schema {bad}", "/temperature 0", "/max_tokens 60", f"/schema {good}", "hi"])
    assert f"error: /schema {bad}" in out and "not" in out
    assert json.loads(chat.turns[1]["content"])["a"] in ("x", "y")
    chat, out = run_chat(tiny_runner, ["/json", "/json off", "/settings"])
    assert "response_format" not in chat.settings and "answers in text" in out
