"""Constrained decoding: grammars compiled by llguidance, one matcher per sequence, token masks per step.

    grammars = GrammarCompiler(tokenizer, vocab_size)            # once per model (builds llguidance's token trie)
    g = grammars.compile(Lark('start: "yes" | "no"'))            # GrammarError (a ValueError) when it cannot be built
    m = g.matcher()                                              # one per sequence, cheap
    fill_masks([m1, m2], bitmask)                                # int32 [R, ceil(V/32)], one bit per token
    m.consume_token(token)                                       # after sampling; m.is_stopped(): the grammar ended

We write no grammar engine: llguidance (the library mistral.rs uses) compiles JSON schemas, Lark
grammars and regexes, and computes masks in a few tens of microseconds a token. Measured here
against xgrammar: both are far below a decode step, llguidance compiles a schema in ~1 ms cold
(xgrammar ~10 ms) and refuses schema keywords it cannot enforce ("Unimplemented keys: [\"not\"]")
where xgrammar silently drops them.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import llguidance

from ..worker_pool import WorkerDied, WorkerPool, WorkerTimeout

if TYPE_CHECKING:
    import torch

# NOTE: JSON may put whitespace between tokens, but a grammar that allows any amount lets a small
# model fill its whole budget with newlines. This is llama.cpp's rule (json-schema-to-grammar's
# `space`): nothing, one space, or a line break and up to 20 characters of indentation.
JSON_WHITESPACE = r"(?: |\n[ \t]{0,20})?"
JSON_OPTIONS = {"whitespace_flexible": True, "whitespace_pattern": JSON_WHITESPACE}

# NOTE: llguidance's limits, tightened where its defaults let one grammar take hundreds of MB (each
# lexer state costs 1-2 kB), and with the error text kept free of the parser's internal state
_LIMITS = dict(verbose_errors=False, max_lexer_states=50_000)

# NOTE: what a client's grammar may be. Checked before anything is compiled, each a 400 naming it.
MAX_GRAMMAR_CHARS = 512 * 1024  # the grammar's text: a schema as JSON, a Lark or GBNF grammar, a regex
MAX_CHOICES = 4096  # options of a choice list
COMPILE_SECONDS = 10.0  # compiling and the first mask, in the checker process
# NOTE: llguidance compiles recursively: a chain of a few thousand Lark rules or $refs overflows a
# thread's default 8 MiB stack, and the process dies of SIGSEGV. Every compile (the checker's and
# the server's own) runs on a thread with this stack: address space, touched only as deep as it goes.
COMPILE_STACK_BYTES = 256 << 20
CHECKER_MEMORY_BYTES = 3 << 30
COMPILE_NICENESS = 10  # the checker's whole address space (its compile stack included)


class GrammarError(ValueError):
    """A grammar, schema or regex that cannot be compiled (or uses a feature that cannot be enforced)."""


# NOTE: the error code of an answer whose grammar met one of llguidance's limits while it was being
# written (a count of a billion `a`s compiles, and fails a few thousand tokens in): the client's
# grammar, so a 400 where the answer was not streamed yet
GRAMMAR_LIMIT = "grammar_limit"


class GrammarFailed(ValueError):
    """A sequence's grammar failed while its answer was being written."""


def grammar_failure(matcher) -> str:
    return f"the output grammar could not go on: {_one_line(matcher.get_error())}"


@dataclass(frozen=True)
class JsonSchema:
    schema: dict


@dataclass(frozen=True)
class Regex:
    pattern: str


@dataclass(frozen=True)
class Lark:
    source: str


@dataclass(frozen=True)
class Choice:
    options: tuple[str, ...]


GrammarSpec = JsonSchema | Regex | Lark | Choice


def lark_source(spec: GrammarSpec) -> str:
    """The llguidance grammar text of a spec (Lark with llguidance's %json extension)."""
    if isinstance(spec, JsonSchema):
        return llguidance.LLMatcher.grammar_from_json_schema(spec.schema, defaults=JSON_OPTIONS)
    if isinstance(spec, Regex):
        return llguidance.LLMatcher.grammar_from_regex(spec.pattern)
    if isinstance(spec, Choice):
        return "start: " + " | ".join(json.dumps(o) for o in spec.options)
    return spec.source


def json_rule(schema: dict) -> str:
    """A Lark rule body that matches JSON valid against `schema`, with our whitespace rule
    (for grammars that embed JSON, such as tool calls)."""
    return "%json " + json.dumps({**schema, "x-guidance": {**schema.get("x-guidance", {}), **JSON_OPTIONS}})


class Grammar:
    """A compiled grammar; `matcher()` gives each sequence its own state."""

    def __init__(self, template: llguidance.LLMatcher, description: str):
        self._template, self.description = template, description

    def matcher(self) -> llguidance.LLMatcher:
        return self._template.deep_copy()

    def __repr__(self) -> str:
        return f"Grammar({self.description})"


class GrammarCompiler:
    """Compiles grammars for one tokenizer. Thread-safe; the token trie is built on first use
    (about 0.3 s for a 50k vocabulary), or ahead of time with `warm_up()`.

    NOTE: a client's grammar is compiled twice: first in a checker process (with a time and memory
    limit; a grammar that crashes llguidance or runs away ends the checker, not the server, and is
    refused), then here, where the same compile on the same stack size is known to succeed. Both
    compute the first mask, so limits llguidance only finds there are a 400 before admission, and
    the engine's first step does not pay for the lexer's first states."""

    def __init__(self, tokenizer, vocab_size: int, isolate: bool = True):
        self._tokenizer, self.vocab_size = tokenizer, vocab_size
        self._llt: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._isolate = isolate
        self._checker: WorkerPool | None = None
        self._desc: dict | None = None

    def warm_up(self) -> None:
        """Builds the token trie, and starts the checker process (so that its start-up is not a
        first request's wait)."""
        self._lltokenizer()
        if self._isolate:
            self._check_isolated(Regex("x"))

    def close(self) -> None:
        if self._checker is not None:
            self._checker.close()

    def _lltokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._llt is None:
                self._desc = self._describe()  # NOTE: builds self._llt too
            return self._llt

    def _describe(self) -> dict:
        """What llguidance needs of the tokenizer, as JSON (the checker process builds its own)."""
        tok = self._tokenizer
        # NOTE: masks cover the model's logits, which may be wider than the tokenizer's
        # vocabulary (padded embeddings): ids past the tokenizer's are never allowed.
        n_vocab = max(self.vocab_size, tok.vocab_size)
        desc = {"n_vocab": n_vocab, "eos": list(tok.eos_ids)}
        try:
            desc["json"] = tok.backend.to_str()
            # NOTE: whether llguidance reads this tokenizer itself (the built one is kept)
            self._llt = tokenizer_from(desc)
            return desc
        except ValueError:
            # NOTE: llguidance reads byte-level and SentencePiece tokenizers itself; any other
            # (a decoder it does not know) is described to it token by token
            special = sorted(t for t, added in tok.backend.get_added_tokens_decoder().items() if added.special)
            tokens = [
                tok.backend.decode([i], skip_special_tokens=False).encode("utf-8") if i < tok.vocab_size else b""
                for i in range(n_vocab)
            ]
            desc.pop("json")
            desc.update(tokens=[t.decode("latin-1") for t in tokens], special=special, bos=tok.bos_id)
            self._llt = tokenizer_from(desc)
        return desc

    def compile(self, spec: GrammarSpec) -> Grammar:
        """A compiled grammar with its first mask computed; GrammarError for anything wrong with it,
        a limit it passes included."""
        check_size(spec)
        llt = self._lltokenizer()
        if self._isolate:
            self._check_isolated(spec)
        return Grammar(on_big_stack(build_matcher, llt, spec), type(spec).__name__)

    def _check_isolated(self, spec: GrammarSpec) -> None:
        if self._checker is None:
            with self._lock:
                if self._checker is None:
                    self._checker = WorkerPool(
                        "mistralrs_py.engine.grammar_worker", [str(CHECKER_MEMORY_BYTES)], init=self._desc
                    )
        try:
            # NOTE: a few seconds' grace over the limit for a checker that must start first
            reply = self._checker.call(spec_to_json(spec), COMPILE_SECONDS + 5.0)
        except WorkerTimeout:
            raise GrammarError(f"the grammar took longer than {COMPILE_SECONDS:g} s to compile") from None
        except WorkerDied:
            raise GrammarError(
                "the grammar is too large or too deeply nested to compile (it exhausted the compiler's stack or memory)"
            ) from None
        if not reply.get("ok"):
            raise GrammarError(reply.get("error") or "invalid grammar")


def tokenizer_from(desc: dict) -> llguidance.LLTokenizer:
    if "json" in desc:
        return llguidance.LLTokenizer(desc["json"], n_vocab=desc["n_vocab"], eos_token=desc["eos"])
    table = _TokenTable([t.encode("latin-1") for t in desc["tokens"]], desc["special"], desc["eos"], desc["bos"])
    return llguidance.LLTokenizer(table, n_vocab=desc["n_vocab"])


def check_size(spec: GrammarSpec) -> None:
    """The limits a grammar is held to before it is compiled."""
    if isinstance(spec, Choice):
        if len(spec.options) > MAX_CHOICES:
            raise GrammarError(f"a choice list may have at most {MAX_CHOICES} options ({len(spec.options)} given)")
        size = sum(len(o) + 4 for o in spec.options)
    elif isinstance(spec, JsonSchema):
        try:
            size = len(json.dumps(spec.schema))
        except (ValueError, TypeError, RecursionError):
            raise GrammarError("the schema is not JSON that can be written back") from None
    else:
        size = len(spec.pattern if isinstance(spec, Regex) else spec.source)
    if size > MAX_GRAMMAR_CHARS:
        raise GrammarError(f"the grammar is {size} characters long; at most {MAX_GRAMMAR_CHARS} are accepted")


def build_matcher(llt: llguidance.LLTokenizer, spec: GrammarSpec) -> llguidance.LLMatcher:
    """Compiles `spec` and computes its first mask: GrammarError for whatever llguidance finds."""
    limits = llguidance.LLParserLimits(**_LIMITS)
    # NOTE: the spec is a client's: whatever llguidance raises about it is that client's error
    try:
        source = lark_source(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(source, llt, limits=limits)
        if is_error:
            raise GrammarError(_one_line(messages[0]))
        matcher = llguidance.LLMatcher(llt, source, log_level=0, limits=limits)
        if not matcher.is_error():
            matcher.compute_bitmask()  # NOTE: the first mask: some limits are only met here
    except GrammarError:
        raise
    except Exception as e:  # noqa: BLE001 - ValueError, TypeError, OverflowError... from the input
        raise GrammarError(_one_line(str(e)) or type(e).__name__) from None
    if matcher.is_error():
        raise GrammarError(_one_line(matcher.get_error()))
    return matcher


_stack_lock = threading.Lock()


def on_big_stack(fn, *args):
    """fn(*args) on a new thread whose stack is COMPILE_STACK_BYTES; its result, or its exception."""
    out: dict = {}

    def run():
        try:
            # NOTE: a large grammar compiles for seconds; on a machine whose cores decode, the
            # streams come first (Linux sets a thread's niceness by its own id)
            with contextlib.suppress(AttributeError, OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), COMPILE_NICENESS)
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed back to the caller's thread
            out["error"] = e

    with _stack_lock:
        old = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="mistralrs-grammar-compile")
            thread.start()
        finally:
            threading.stack_size(old)
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def spec_to_json(spec: GrammarSpec) -> dict:
    if isinstance(spec, JsonSchema):
        return {"json": spec.schema}
    if isinstance(spec, Regex):
        return {"regex": spec.pattern}
    if isinstance(spec, Choice):
        return {"choice": list(spec.options)}
    return {"lark": spec.source}


def spec_from_json(obj: dict) -> GrammarSpec:
    if "json" in obj:
        return JsonSchema(obj["json"])
    if "regex" in obj:
        return Regex(obj["regex"])
    if "choice" in obj:
        return Choice(tuple(obj["choice"]))
    return Lark(obj["lark"])


class _TokenTable(llguidance.TokenizerWrapper):
    """A tokenizer as llguidance's generic interface wants it: every token's bytes (as it decodes
    alone), the special ones, and an encoder."""

    def __init__(self, tokens: list[bytes], special: list[int], eos: list[int], bos):
        self.eos_token_id = eos[0] if eos else 0
        self.bos_token_id = bos
        self.special_token_ids = sorted(special)
        self.tokens = tokens
        self.is_tokenizer_wrapper = True
        self._ids: dict[bytes, int] = {}
        special = set(special)
        for i, b in enumerate(self.tokens):
            if b and i not in special:
                self._ids.setdefault(b, i)
        self._longest = max(map(len, self._ids), default=1)

    def __call__(self, s) -> list[int]:
        """Greedy longest match over the token table: it can spell any text the vocabulary covers
        (the model's own encoder may not, where it has an unknown-word token)."""
        data = s if isinstance(s, bytes) else s.encode("utf-8")
        out, i = [], 0
        while i < len(data):
            for k in range(min(self._longest, len(data) - i), 0, -1):
                t = self._ids.get(data[i : i + k])
                if t is not None:
                    out.append(t)
                    i += k
                    break
            else:
                i += 1  # NOTE: a byte no token holds cannot be generated anyway
        return out


def _one_line(message: str) -> str:
    """llguidance's errors end with the grammar line and a caret; the first line says what is wrong."""
    first = message.strip().splitlines()[0] if message.strip() else "invalid grammar"
    if first.startswith("NoExtensionBias"):
        # NOTE: the first mask allows no token: nothing this vocabulary can write starts an answer
        return "the grammar accepts no text this model's vocabulary can write"
    # "at 1(8): failed to compile JSON schema: Unimplemented keys: ["not"]" -> from "failed ..."
    head, sep, rest = first.partition("): ")
    return rest if sep and head.startswith("at ") else first


# ---- masks -----------------------------------------------------------------------------------------
def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_masks(matchers: Sequence[Any], bitmask: "torch.Tensor") -> None:
    """Writes row r of `bitmask` (int32 [R, W], CPU, contiguous) for matchers[r]: bit t of the row set
    when token t may come next. Runs without the GIL."""
    if str(bitmask.dtype) != "torch.int32" or not bitmask.is_contiguous() or bitmask.device.type != "cpu":
        raise ValueError("the bitmask must be a contiguous int32 CPU tensor")
    row_bytes = bitmask.shape[1] * 4
    base = bitmask.data_ptr()
    for r, m in enumerate(matchers):
        # NOTE: one call per row: llguidance's parallel executor would start threads that compete with
        # torch's for the same two cores; a row costs tens of microseconds.
        m.unsafe_compute_mask_ptr(base + r * row_bytes, row_bytes)
