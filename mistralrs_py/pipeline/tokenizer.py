"""Tokenizer wrapper, incremental detokenizer and chat templates rendered in a sandboxed jinja2."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from .base import LoadError


class ChatTemplateError(ValueError):
    """The chat template failed to render these messages; str() is safe to show a client."""


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what serving needs around it: BOS/EOS, the chat template."""

    def __init__(
        self,
        backend,
        *,
        bos_token: str | None,
        eos_token: str | None,
        chat_template: str | None,
        add_bos: bool | None = None,
        extra_eos_ids: Sequence[int] = (),
    ):
        self.backend = backend
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = backend.token_to_id(bos_token) if bos_token else None
        eos_id = backend.token_to_id(eos_token) if eos_token else None
        self.eos_ids = sorted({i for i in (eos_id, *extra_eos_ids) if i is not None})
        # NOTE: add_bos=None: the backend's own post-processor decides (tokenizer.json); True/False:
        # we prepend BOS ourselves (GGUF metadata says whether the model expects it).
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    # ---- text <-> ids --------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.add_bos is None:
            return self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes of one token as decoded alone (for logprob `bytes` fields)."""
        return self.backend.decode([i], skip_special_tokens=False).encode("utf-8", "replace")

    # ---- chat ----------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs) -> str:
        if not self.chat_template:
            raise ChatTemplateError(
                "this model has no chat template; use /v1/completions, or start the server with --chat-template FILE"
            )
        return render_template(
            self.chat_template,
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs) -> list[int]:
        # NOTE: the template writes BOS itself where the model wants it, so no special tokens are
        # added on top (what transformers' apply_chat_template(tokenize=True) does).
        return self.encode(self.render_chat(messages, **kwargs), add_special_tokens=False)


# ---- chat templates ---------------------------------------------------------------------------
_ENV = None


# NOTE: limits for templates from untrusted model files: wall time, output size, and the size of
# values built by `*`/`+` (so `'x' * 10**9` or nested range loops fail fast instead of hanging).
TEMPLATE_SECONDS = 2.0
TEMPLATE_MAX_CHARS = 16 * 1024 * 1024
_budget = threading.local()


def _check_budget() -> None:
    deadline = getattr(_budget, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise ChatTemplateError(f"chat template took longer than {TEMPLATE_SECONDS:.0f} s to render")


def _environment():
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

        # NOTE: an immutable sandbox: templates come from model files written by strangers; they may
        # not reach Python internals or mutate the messages they are given.
        env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        env.globals["range"] = budget_range
        _ENV = env
    return _ENV


def render_template(template: str, **context) -> str:
    from jinja2 import TemplateError

    _budget.deadline = time.monotonic() + TEMPLATE_SECONDS
    try:
        parts, size = [], 0
        for piece in _environment().from_string(template).generate(**context):
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
    except (
        TypeError,
        ValueError,
        KeyError,
        AttributeError,
        IndexError,
        OverflowError,
        MemoryError,
        RecursionError,
    ) as e:
        raise ChatTemplateError(f"chat template could not render these messages: {type(e).__name__}: {e}") from None
    finally:
        _budget.deadline = None


def load_chat_template(path: str | Path) -> str:
    """The template of a --chat-template FILE: a jinja file, or JSON holding `chat_template` (a
    tokenizer_config.json or chat_template.json, as transformers writes them) or a JSON string.

    NOTE: parsed here, before the (slow) weight load, so a typo fails in a second with its line."""
    from jinja2 import TemplateSyntaxError

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
        _environment().parse(template)
    except TemplateSyntaxError as e:
        raise LoadError(f"--chat-template {path}: line {e.lineno}: {e.message}") from None
    return template


# ---- loading ------------------------------------------------------------------------------------
def load_hf_tokenizer(directory: Path, extra_eos_ids: Sequence[int] = ()) -> Tokenizer:
    """tokenizer.json (+ tokenizer_config.json, chat_template.jinja/json) from a model directory."""
    from tokenizers import Tokenizer as Backend

    cfg_path = directory / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
    tj = directory / "tokenizer.json"
    if tj.exists():
        backend = Backend.from_file(str(tj))
    elif (directory / "tokenizer.model").exists():
        # NOTE: SentencePiece-only repos: transformers converts the model to a fast tokenizer.
        from transformers import AutoTokenizer

        backend = AutoTokenizer.from_pretrained(str(directory)).backend_tokenizer
    else:
        raise LoadError(f"no tokenizer.json or tokenizer.model in {directory}; pass a tokenizer with the model")
    template = cfg.get("chat_template")
    for name in ("chat_template.jinja",):
        if (directory / name).exists():
            template = (directory / name).read_text()
    if template is None and (directory / "chat_template.json").exists():
        template = json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
    return Tokenizer(
        backend,
        bos_token=_token_str(cfg.get("bos_token")),
        eos_token=_token_str(cfg.get("eos_token")),
        chat_template=template,
        extra_eos_ids=extra_eos_ids,
    )


def _token_str(tok) -> str | None:
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


# ---- streaming detokenization ---------------------------------------------------------------------
class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas without breaking multi-byte characters.

    NOTE: each delta is decode(ids[prefix:]) minus decode(ids[prefix:read]): decoding a window that
    starts a few tokens back keeps leading spaces right (SentencePiece drops the space of a token
    decoded alone), and a trailing U+FFFD means a character is still incomplete, so it waits."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = list(prompt_ids[-5:])
        self.prefix = 0
        self.read = len(self.ids)

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character is emitted as U+FFFD)."""
        prefix_text = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        new_text = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
