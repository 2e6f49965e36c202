"""`mistralrs -i <subcommand>`: chat with the model in this terminal, no server.

Answers stream as they are generated; the conversation is re-rendered through the chat template on
every turn (so the model sees its history); Ctrl-C stops the answer being written, not the program.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .api import ContextTooLong, GenerationFailed, Runner

PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'

# /name VALUE sets a sampling option for the next answers; "off" restores the default.
SETTINGS: dict[str, Callable[[str], object]] = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "min_p": float,
    "max_tokens": int,
    "seed": int,
    "repetition_penalty": float,
    "presence_penalty": float,
    "frequency_penalty": float,
}
COMMANDS = [
    ("/help", "show this list"),
    ("/clear", "forget the conversation (the system prompt stays)"),
    ("/system TEXT", "set the system prompt (/system alone removes it)"),
    (
        "/temperature 0.7",
        "set a sampling option; also /top_p /top_k /min_p /max_tokens /seed /repetition_penalty "
        "/presence_penalty /frequency_penalty; 'off' restores the default",
    ),
    ("/json", "answer in JSON (a grammar guarantees it); /json off goes back to text"),
    ("/schema FILE", "answer in JSON valid against the JSON schema in FILE; /schema off goes back to text"),
    ("/settings", "show the sampling options in use"),
    ("/history", "show the conversation the model sees"),
    ("/exit", "leave (also /quit, /bye or Ctrl-D)"),
    ('"""', 'start a multi-line message, ended by a line ending with """ (or end a line with \\ to continue it)'),
    ("Ctrl-C", "stop the answer being written"),
]


def run_interactive(opts, spec) -> None:
    """The -i front end: the shared start-up (progress, one-line errors), then the chat loop."""
    from .terminal import console as err_console
    from .terminal import fail, ready_line, setup_logging, start_client

    setup_logging()
    # NOTE: one conversation needs one KV cache slot, whatever --max-seqs says.
    client = start_client(spec, opts.engine_options(max_seqs=1))
    if not client.tokenizer.chat_template:
        client.stop()
        fail(
            "this model has no chat template, which interactive mode needs: pass --chat-template FILE "
            "(a jinja file, or a tokenizer_config.json holding one)"
        )
    runner = Runner.from_client(
        client,
        repeat_last_n=spec.repeat_last_n,
        truncate_sequence=opts.truncate_sequence,
        model_name=opts.served_model_name,
        tool_call_parser=opts.tool_call_parser,
    )
    err_console.print(
        f"{ready_line(client, runner.model, opts.scheduler)} | interactive", highlight=False, soft_wrap=True
    )
    try:
        code = Chat(runner, Console(highlight=False)).loop()
    finally:
        runner.close()
    sys.exit(code)


class Chat:
    def __init__(self, runner: Runner, console: Console, read: Optional[Callable[[str], str]] = None):
        self.runner, self.out = runner, console
        self.read = read or _line_reader(console)
        self.system: Optional[str] = None
        self.turns: list[dict] = []  # user/assistant messages, oldest first
        self.settings: dict[str, object] = {"temperature": 0.7}

    # ---- the loop ------------------------------------------------------------------------------------
    def loop(self) -> int:
        self.out.print(
            f"Chatting with [bold]{escape(self.runner.model)}[/]. /help lists commands, Ctrl-C stops an "
            "answer, Ctrl-D or /exit leaves."
        )
        while True:
            try:
                text = self.read_message()
            except KeyboardInterrupt:
                self.out.print("\n[dim](Ctrl-D or /exit to leave)[/]")
                continue
            except EOFError:
                self.out.print()
                return 0
            if text is None or not text.strip():
                continue
            try:
                if text.startswith("/") and not text.startswith("//"):
                    if self.command(text.strip()) == "exit":
                        return 0
                    continue
                self.answer(text[1:] if text.startswith("//") else text)
            except KeyboardInterrupt:  # NOTE: Ctrl-C between two steps of our own: nothing to undo
                self.out.print("\n[yellow]\\[stopped][/]")

    def read_message(self) -> Optional[str]:
        """One message: a line; lines ending in \\ continue it; \"\"\" opens a block up to a line ending in \"\"\"."""
        line = self.read(PROMPT)
        if line.lstrip().startswith(BLOCK):
            rest = line.lstrip()[len(BLOCK) :]
            if rest.endswith(BLOCK):
                return rest[: -len(BLOCK)]
            lines = [rest] if rest else []
            while True:
                try:
                    more = self.read(MORE)
                except EOFError:
                    break
                if more.rstrip().endswith(BLOCK):
                    last = more.rstrip()[: -len(BLOCK)]
                    if last:
                        lines.append(last)
                    break
                lines.append(more)
            return "\n".join(lines)
        parts = []
        while line.endswith("\\"):
            parts.append(line[:-1])
            line = self.read(MORE)
        parts.append(line)
        return "\n".join(parts)

    # ---- one answer ------------------------------------------------------------------------------------
    def conversation(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.turns

    def answer(self, text: str) -> None:
        self.turns.append({"role": "user", "content": text})
        reply, tokens, first, stopped = "", 0, None, None
        started = time.perf_counter()
        stream = None
        try:
            stream = self.start_stream()
            if stream is None:
                self.turns.pop()
                return
            for chunk in stream:
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content") or ""
                    if piece:
                        first = first or time.perf_counter()
                        reply += piece
                        self.out.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
                    if choice.get("finish_reason") == "length":
                        stopped = "max_tokens" if self.settings.get("max_tokens") else "context full"
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # NOTE: closing the stream aborts the request in the engine
            stopped = "stopped"
        except GenerationFailed as e:
            self.out.print(f"\n[bold red]error:[/] {escape(str(e))}")
            self.turns.pop()
            return
        if stopped == "stopped" and not reply:
            self.turns.pop()  # NOTE: stopped before a word was written: as if never asked
        else:
            # NOTE: a stopped answer stays in the history: it is what the user saw and may refer to.
            self.turns.append({"role": "assistant", "content": reply})
        end = time.perf_counter()
        stats = []
        if tokens:
            stats.append(f"{tokens} tokens, {tokens / max(end - (first or started), 1e-6):.1f} tok/s")
        if first:
            stats.append(f"first token {first - started:.2f} s")
        note = f"[yellow]\\[{stopped}][/] " if stopped else ""
        self.out.print(f"\n{note}[dim]{' | '.join(stats)}[/]")

    def start_stream(self):
        """The answer's chunk stream; the oldest exchanges are dropped while the conversation is too
        long for the context (what llama.cpp's context shift does, a turn at a time)."""
        while True:
            try:
                return self.runner.stream_chat(self.conversation(), **self.settings)
            except ContextTooLong as e:
                if len(self.turns) <= 1:
                    self.out.print(
                        f"[bold red]error:[/] this message is {e.prompt_tokens} tokens with the template; the "
                        f"context holds {e.limit}" + (" (lower /max_tokens)" if self.settings.get("max_tokens") else "")
                    )
                    return None
                del self.turns[:2]
                self.out.print(f"[dim](dropped the oldest exchange to fit the {e.limit}-token context)[/]")
            except ValueError as e:
                self.out.print(f"[bold red]error:[/] {escape(str(e))}")
                return None

    # ---- commands ----------------------------------------------------------------------------------------
    def command(self, line: str) -> Optional[str]:
        name, _, arg = line[1:].partition(" ")
        name, arg = name.lower().replace("-", "_"), arg.strip()
        if name in ("exit", "quit", "bye"):
            return "exit"
        if name in ("help", "?"):
            table = Table(show_header=False, box=None, padding=(0, 2))
            for cmd, what in COMMANDS:
                table.add_row(f"[bold]{escape(cmd)}[/]", escape(what))
            self.out.print(table)
        elif name == "clear":
            self.turns.clear()
            self.out.print("[dim](conversation cleared)[/]")
        elif name == "system":
            self.system = arg or None
            self.out.print(f"[dim](system prompt {'set' if arg else 'removed'})[/]")
        elif name == "settings":
            shown = ", ".join(f"{k}={v}" for k, v in self.settings.items()) or "server defaults"
            self.out.print(f"[dim]{escape(shown)}[/]")
        elif name == "history":
            for m in self.conversation():
                self.out.print(f"[bold]{m['role']}:[/] ", end="")
                self.out.print(m["content"], markup=False, highlight=False)
            if not self.turns:
                self.out.print("[dim](empty)[/]")
        elif name in SETTINGS:
            self.set(name, arg)
        elif name in ("json", "schema"):
            self.set_format(name, arg)
        else:
            self.out.print(
                f"[bold red]unknown command[/] /{escape(name)}; /help lists the commands "
                "(start a message with // to send one that begins with /)"
            )
        return None

    def set_format(self, name: str, arg: str) -> None:
        """/json and /schema FILE: the answers' form, as the API's response_format."""
        if arg.lower() in ("off", "none", "default", "text"):
            self.settings.pop("response_format", None)
            self.out.print("[dim](answers in text)[/]")
            return
        if name == "json":
            value = {"type": "json_object"}
        else:
            if not arg:
                self.out.print("[bold red]error:[/] /schema needs a file holding a JSON schema")
                return
            try:
                schema = json.loads(Path(arg).expanduser().read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                self.out.print(f"[bold red]error:[/] /schema {escape(arg)}: {escape(str(e))}")
                return
            value = {"type": "json_schema", "json_schema": {"name": Path(arg).stem[:64] or "schema", "schema": schema}}
        try:
            # NOTE: compiled now by the server's own validation, so an unsupported schema says so here
            self.runner.service.chat({"messages": [{"role": "user", "content": ""}], "response_format": value})
        except ValueError as e:
            self.out.print(f"[bold red]error:[/] /{name} {escape(arg)}: {escape(str(e))}")
            return
        self.settings["response_format"] = value
        self.out.print(f"[dim](answers in JSON{' following ' + escape(arg) if name == 'schema' else ''})[/]")

    def set(self, name: str, arg: str) -> None:
        if not arg:
            self.out.print(f"[dim]{name} = {self.settings.get(name, 'default')}[/]")
            return
        if arg.lower() in ("off", "none", "default"):
            self.settings.pop(name, None)
            self.out.print(f"[dim]({name} back to the default)[/]")
            return
        try:
            value = SETTINGS[name](arg)
            # NOTE: checked by the server's own request validation, so limits and messages match the API's.
            self.runner.service.chat({"messages": [{"role": "user", "content": ""}], name: value})
        except ValueError as e:
            self.out.print(f"[bold red]error:[/] /{name} {escape(arg)}: {escape(str(e))}")
            return
        self.settings[name] = value
        self.out.print(f"[dim]({name} = {value})[/]")


def _line_reader(console: Console) -> Callable[[str], str]:
    """input() with line editing and history (readline) where the terminal has it."""
    tty = sys.stdin.isatty() and console.is_terminal
    if tty:
        try:
            import readline  # noqa: F401 - importing it gives input() editing and history
        except ImportError:
            pass

    def read(prompt: str) -> str:
        if tty and console.color_system:
            # NOTE: \001..\002 tell readline the colour codes take no columns, so editing long
            # lines and recalling history redraw the prompt correctly.
            prompt = f"\001\x1b[1;32m\002{prompt}\001\x1b[0m\002"
        return input(prompt)

    return read
