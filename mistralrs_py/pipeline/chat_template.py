"""Chat templates: a sandboxed jinja2 with time and size budgets, rendered in worker processes that
have a memory limit, and --chat-template files.

Templates come from model files written by strangers. The immutable sandbox keeps them from Python's
internals and from mutating what they are given; the budgets stop `'x' * 10**9` and runaway loops
early; and the render itself runs in a child process (`template_worker.py`) whose address space is
capped, so a template that grows a string through filters or `~` until it holds gigabytes fails
its own request instead of taking the server's memory. A child that dies or overruns is replaced.

NOTE: imported by that child too: nothing here may import torch (or mistralrs_py.pipeline.base).
"""

from __future__ import annotations

import json
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path


class ChatTemplateError(ValueError):
    """The chat template failed to render these messages; str() is safe to show a client."""


# NOTE: limits for templates from untrusted model files: wall time, output size, the size of values
# built by `*`/`+` (fail fast in-process), and the memory of the worker that renders them.
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 16 * 1024 * 1024
TEMPLATE_MEMORY_BYTES = 1 << 30  # the worker's whole address space, Python and jinja2 included
WORKERS = 2
_budget = threading.local()
_ENV = None


def _check_budget() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(f"chat template took longer than {TEMPLATE_SECONDS:.0f} s to render")


def environment():
    """The sandboxed jinja2 environment (made once per process)."""
    global _ENV
    if _ENV is None:
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class BudgetedSandbox(ImmutableSandboxedEnvironment):
            intercepted_binops = frozenset(["*", "**", "+"])

            def call(self, __context, __obj, *args, **kwargs):
                _check_budget()
                return super().call(__context, __obj, *args, **kwargs)

            def call_binop(self, context, operator, left, right):
                _check_budget()
                if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                    raise ChatTemplateError("chat template computes an oversized power")
                if operator == "*" and isinstance(left, (str, list, tuple)) != isinstance(right, (str, list, tuple)):
                    count = right if isinstance(left, (str, list, tuple)) else left
                    seq = left if isinstance(left, (str, list, tuple)) else right
                    if isinstance(count, int) and count * max(len(seq), 1) > TEMPLATE_MAX_CHARS:
                        raise ChatTemplateError("chat template builds an oversized value")
                if operator == "+" and isinstance(left, (str, list)) and isinstance(right, (str, list)):
                    if len(left) + len(right) > TEMPLATE_MAX_CHARS:
                        raise ChatTemplateError("chat template builds an oversized value")
                return super().call_binop(context, operator, left, right)

        def raise_exception(message: str):
            raise ChatTemplateError(f"chat template error: {message}")

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        def budget_range(*args):
            for i, v in enumerate(range(*args)):
                if i % 1024 == 0:
                    _check_budget()
                yield v

        env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.globals["range"] = budget_range
        _ENV = env
    return _ENV


def render_template(template: str, **context) -> str:
    """Renders in this process, within the time and size budgets (the worker's implementation)."""
    from jinja2 import TemplateError

    _budget.deadline = time.monotonic() + TEMPLATE_SECONDS
    try:
        parts, size = [], 0
        for piece in environment().from_string(template).generate(**context):
            size += len(piece)
            if size > TEMPLATE_MAX_CHARS:
                raise ChatTemplateError("chat template output is too large")
            _check_budget()
            parts.append(piece)
        return "".join(parts)
    except ChatTemplateError:
        raise
    except TemplateError as e:
        raise ChatTemplateError(f"chat template error: {type(e).__name__}: {e}") from None
    except MemoryError:
        raise ChatTemplateError("chat template needs more memory than a render may use") from None
    except (TypeError, ValueError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:
        raise ChatTemplateError(f"chat template could not render these messages: {type(e).__name__}: {e}") from None
    finally:
        _budget.deadline = None


# ---- rendering in worker processes --------------------------------------------------------------
def write_frame(stream, obj) -> None:
    data = json.dumps(obj).encode("utf-8")
    stream.write(struct.pack(">I", len(data)) + data)
    stream.flush()


def read_frame(stream) -> object:
    head = stream.read(4)
    if len(head) < 4:
        raise EOFError
    (n,) = struct.unpack(">I", head)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError
    return json.loads(data)


class _Worker:
    """One child process (`python -m mistralrs_py.pipeline.template_worker`), one render at a time."""

    def __init__(self):
        env = dict(os.environ)
        # NOTE: the child imports this very package, wherever it was imported from here
        root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistralrs_py.pipeline.template_worker", str(TEMPLATE_MEMORY_BYTES)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
        )

    def render(self, template: str, context: dict, timeout: float) -> str:
        write_frame(self.proc.stdin, {"template": template, "context": context})
        # NOTE: the child keeps its own time budget; this deadline is for a child that hangs in C
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.kill()
            raise ChatTemplateError(f"chat template took longer than {TEMPLATE_SECONDS:.0f} s to render")
        try:
            reply = read_frame(self.proc.stdout)
        except EOFError:
            self.kill()
            raise ChatTemplateError("chat template needs more memory than a render may use") from None
        if reply.get("ok"):
            return reply["text"]
        raise ChatTemplateError(reply["error"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()


class TemplateSandbox:
    """A few worker processes; `render()` takes an idle one (or waits for one)."""

    def __init__(self, workers: int = WORKERS):
        self._idle: queue.SimpleQueue[_Worker | None] = queue.SimpleQueue()
        for _ in range(workers):
            self._idle.put(None)  # NOTE: started on first use

    def render(self, template: str, context: dict) -> str:
        worker = self._idle.get()
        try:
            if worker is None or not worker.alive():
                worker = _Worker()
            return worker.render(template, context, TEMPLATE_SECONDS + 3.0)
        except ChatTemplateError:
            raise  # NOTE: the template's error; a worker that failed was already stopped
        except (OSError, ValueError) as e:  # a broken pipe, a reply that is not a frame
            if worker is not None:
                worker.kill()
            raise ChatTemplateError(f"chat template could not be rendered: {type(e).__name__}") from None
        finally:
            self._idle.put(worker if worker is not None and worker.alive() else None)


_sandbox: TemplateSandbox | None = None
_sandbox_lock = threading.Lock()


def render_isolated(template: str, **context) -> str:
    """Renders in a worker process with a memory limit; raises ChatTemplateError."""
    global _sandbox
    if _sandbox is None:
        with _sandbox_lock:
            if _sandbox is None:
                _sandbox = TemplateSandbox()
    return _sandbox.render(template, context)


# ---- --chat-template FILE -----------------------------------------------------------------------
def load_chat_template(path: str | Path) -> str:
    """The template of a --chat-template FILE: a jinja file, or JSON holding `chat_template` (a
    tokenizer_config.json or chat_template.json, as transformers writes them) or a JSON string.

    NOTE: parsed here, before the (slow) weight load, so a typo fails in a second with its line."""
    from jinja2 import TemplateSyntaxError

    from .base import LoadError

    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoadError(f"--chat-template {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"--chat-template {path}: cannot read it ({type(e).__name__}: {e})") from None
    template = text
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoadError(f"--chat-template {path}: not valid JSON ({e})") from None
        template = data.get("chat_template") if isinstance(data, dict) else data
        if isinstance(template, list):  # named templates: take the default one
            template = next(
                (t.get("template") for t in template if t.get("name") == "default"), template[0].get("template")
            )
        if not isinstance(template, str):
            raise LoadError(f'--chat-template {path}: a JSON file must hold a "chat_template" string')
    if not template.strip():
        raise LoadError(f"--chat-template {path}: the file is empty")
    try:
        environment().parse(template)
    except TemplateSyntaxError as e:
        raise LoadError(f"--chat-template {path}: line {e.lineno}: {e.message}") from None
    return template


# ---- what a template can express ------------------------------------------------------------------
_variables_cache: dict[str, frozenset[str]] = {}


def template_variables(template: str) -> frozenset[str]:
    """The names a template reads from its context (`messages`, `tools`, `documents`...): a template
    that never reads `tools` cannot show the model its tool definitions."""
    found = _variables_cache.get(template)
    if found is None:
        from jinja2 import TemplateSyntaxError, meta

        try:
            found = frozenset(meta.find_undeclared_variables(environment().parse(template)))
        except TemplateSyntaxError:
            found = frozenset()
        if len(_variables_cache) < 64:
            _variables_cache[template] = found
    return found
