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
import threading
import time
from datetime import datetime
from pathlib import Path

from ..worker_pool import WorkerDied, WorkerPool, WorkerTimeout


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
class TemplateSandbox:
    """A few worker processes (`python -m mistralrs_py.pipeline.template_worker`), one render each at
    a time."""

    def __init__(self, workers: int = WORKERS):
        self._pool = WorkerPool("mistralrs_py.pipeline.template_worker", [str(TEMPLATE_MEMORY_BYTES)], workers=workers)

    def render(self, template: str, context: dict) -> str:
        try:
            # NOTE: the child keeps its own time budget; this deadline is for a child that hangs in C
            reply = self._pool.call({"template": template, "context": context}, TEMPLATE_SECONDS + 3.0)
        except WorkerTimeout:
            raise ChatTemplateError(f"chat template took longer than {TEMPLATE_SECONDS:.0f} s to render") from None
        except WorkerDied:
            raise ChatTemplateError("chat template needs more memory than a render may use") from None
        if not isinstance(reply, dict):
            raise ChatTemplateError("chat template could not be rendered")
        if reply.get("ok"):
            return reply["text"]
        raise ChatTemplateError(reply["error"])


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
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "chat_templates"


def bundled_names() -> list[str]:
    """The templates that ship with the server, by the short names --chat-template takes."""
    return sorted(p.stem for p in BUNDLED_DIR.glob("*.jinja"))


def bundled_template(name: str) -> str:
    return (BUNDLED_DIR / f"{name}.jinja").read_text(encoding="utf-8")


def load_chat_template(path: str | Path) -> str:
    """The template of a --chat-template FILE: a jinja file, or JSON holding `chat_template` (a
    tokenizer_config.json or chat_template.json, as transformers writes them) or a JSON string; or
    the short name of a bundled template (`hermes-tools`) where no such file exists.

    NOTE: parsed here, before the (slow) weight load, so a typo fails in a second with its line."""
    from jinja2 import TemplateSyntaxError

    from .base import LoadError

    p = Path(path).expanduser()
    if not p.exists() and str(path) in bundled_names():
        p = BUNDLED_DIR / f"{path}.jinja"
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LoadError(
            f"--chat-template {path}: no such file (the bundled templates: {', '.join(bundled_names())})"
        ) from None
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
