"""Grammars from hostile clients: every one is compiled or refused with a GrammarError, none ends
the process. Compilation runs first in a checker process (a crash there refuses the grammar), then
here on a large stack; limits llguidance only meets at the first mask are found before admission.

The deep cases below overflowed a thread's default 8 MiB stack inside llguidance (SIGSEGV: this
test process would die, not fail)."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mistralrs_py.engine import grammar as G
from mistralrs_py.engine.grammar import Choice, GrammarCompiler, GrammarError, JsonSchema, Lark, Regex
from tests.engine.fake import VOCAB, fake_tokenizer

# NOTE: byte-level tokens, so that JSON, Lark literals and regexes can all be written
BYTES = [chr(b) for b in range(32, 127)] + ["\n"]


@pytest.fixture(scope="module")
def compiler():
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    from mistralrs_py.pipeline.tokenizer import Tokenizer

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(BYTES)}}
    backend = HFTokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(["<eos>"])
    tok = Tokenizer(backend, bos_token=None, eos_token="<eos>", chat_template=None, add_bos=False)
    c = GrammarCompiler(tok, len(vocab))
    yield c
    c.close()


def ref_chain(n: int) -> dict:
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(n)}
    defs[f"d{n}"] = {"type": "integer"}
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def lark_chain(n: int) -> str:
    return "start: r0\n" + "\n".join(f"r{i}: r{i + 1}" for i in range(n)) + f'\nr{n}: "x"'


@pytest.mark.parametrize(
    "spec",
    [
        JsonSchema(ref_chain(3000)),
        Lark(lark_chain(20_000)),
        Regex("a{1000000000}"),
        Regex("((a{1,100}){1,100}){1,100}"),
        JsonSchema({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(5000)}}),
        JsonSchema({"$ref": "#"}),
        JsonSchema({"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}),
    ],
    ids=["ref-chain", "lark-chain", "huge-count", "nested-counts", "5000-optional", "self-ref", "recursive"],
)
def test_hostile_grammars_compile_or_are_refused(compiler, spec):
    try:
        g = compiler.compile(spec)
    except GrammarError as e:
        assert str(e) and "<" not in str(e)  # NOTE: one readable line, no parser state dump
        return
    m = g.matcher()
    assert not m.is_error()


def test_limits_are_checked_before_compiling(compiler):
    with pytest.raises(GrammarError, match=f"at most {G.MAX_CHOICES} options"):
        compiler.compile(Choice(tuple(f"o{i}" for i in range(G.MAX_CHOICES + 1))))
    with pytest.raises(GrammarError, match=f"at most {G.MAX_GRAMMAR_CHARS} are accepted"):
        compiler.compile(Regex("a" * (G.MAX_GRAMMAR_CHARS + 1)))


def test_a_crash_in_the_checker_refuses_the_grammar_and_the_next_one_compiles(compiler):
    """A chain this long overflows even the compile thread's large stack: in the checker process,
    which dies of it; the grammar is refused (not this process killed), and a fresh checker serves
    the next request."""
    compiler._check_isolated(Regex("x"))  # NOTE: the checker is running
    pool = compiler._checker
    spec = Lark(lark_chain(400_000))  # NOTE: past the size limit, so sent straight to the checker
    with pytest.raises(GrammarError, match="too large or too deeply nested"):
        compiler._check_isolated(spec)
    assert compiler.compile(Regex("[0-9]+")).matcher() is not None
    assert compiler._checker is pool


def test_a_grammar_no_token_can_start_is_refused_before_admission():
    c = GrammarCompiler(fake_tokenizer(), VOCAB)  # NOTE: whole words only: no token writes "{"
    try:
        with pytest.raises(GrammarError, match="no text this model's vocabulary can write"):
            c.compile(JsonSchema({"type": "object"}))
    finally:
        c.close()


# ---- generated schemas and grammars ---------------------------------------------------------------
_leaf = st.sampled_from([{"type": "integer"}, {"type": "string", "maxLength": 5}, {"type": "boolean"}, {"enum": [1]}])


def _schemas():
    return st.recursive(
        _leaf,
        lambda inner: st.one_of(
            st.dictionaries(st.sampled_from("abcdefgh"), inner, min_size=1, max_size=6).map(
                lambda props: {"type": "object", "properties": props, "required": sorted(props)[:1]}
            ),
            inner.map(lambda s: {"type": "array", "items": s, "maxItems": 3}),
            st.lists(inner, min_size=1, max_size=4).map(lambda xs: {"anyOf": xs}),
        ),
        max_leaves=60,
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=_schemas(), depth=st.integers(0, 200))
def test_generated_deep_and_wide_schemas_never_crash(compiler, schema, depth):
    for _ in range(depth):
        schema = {"type": "object", "properties": {"n": schema}, "required": ["n"]}
    try:
        compiler.compile(JsonSchema(json.loads(json.dumps(schema))))
    except GrammarError:
        pass


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 5000), width=st.integers(1, 40), nest=st.integers(0, 300))
def test_generated_lark_grammars_never_crash(compiler, n, width, nest):
    rules = [f"r{i}: r{i + 1} | " + " | ".join(f'"{chr(97 + j % 26)}"' for j in range(width)) for i in range(n)]
    source = "start: " + "(" * nest + "r0" + ")" * nest + "\n" + "\n".join(rules) + f'\nr{n}: "z"'
    try:
        compiler.compile(Lark(source))
    except GrammarError:
        pass
