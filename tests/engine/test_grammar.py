"""Constrained decoding in the engine: llguidance masks applied in the batched sampler, matchers
advanced by the update step. The fake pipeline prefers tokens the grammars forbid, so every check
below fails if a mask is lost, misaligned with its row, or applied after the filters."""

from __future__ import annotations

import math

import pytest
import torch

from mistralrs_py import sampling
from mistralrs_py.engine.grammar import (
    Choice,
    GrammarCompiler,
    GrammarError,
    JsonSchema,
    Lark,
    Regex,
    fill_masks,
    mask_words,
)
from mistralrs_py.engine.request import Done, SamplingParams
from tests.engine.fake import VOCAB, WORDS, FakePipeline, fake_tokenizer, make_engine, run

DIGITS = {WORDS.index(str(d)) for d in range(10)}


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler(fake_tokenizer(), VOCAB)


@pytest.fixture
def engine():
    e = make_engine(FakePipeline(), max_seqs=4, prefill_chunk=8)
    e.start()
    yield e
    e.stop()


def test_bitmask_application_matches_a_bit_by_bit_reference():
    g = torch.Generator().manual_seed(0)
    R, V = 5, 77
    logits = torch.randn(R, V, generator=g)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (R, mask_words(V)), dtype=torch.int32, generator=g)
    got = sampling.apply_token_bitmask(logits, bitmask)
    for r in range(R):
        for t in range(V):
            allowed = (int(bitmask[r, t // 32]) >> (t % 32)) & 1
            assert got[r, t] == (logits[r, t] if allowed else -math.inf)


def test_both_ways_of_unpacking_a_mask_agree():
    g = torch.Generator().manual_seed(1)
    bitmask = torch.randint(-(2**31), 2**31 - 1, (4, 3), dtype=torch.int32, generator=g)
    cpu = sampling.unpack_bitmask(bitmask, 70, torch.device("cpu"), gather=False)
    table = sampling.unpack_bitmask(bitmask, 70, torch.device("cpu"), gather=True)  # the GPU's way
    assert cpu.shape == (4, 70) and torch.equal(cpu, table)
    assert bool(cpu[0, 5]) == bool((int(bitmask[0, 0]) >> 5) & 1)


def test_masks_allow_exactly_what_the_matcher_accepts(compiler):
    m = compiler.compile(Regex("[0-9]{2}(hello|world)")).matcher()
    bitmask = torch.zeros((1, mask_words(VOCAB)), dtype=torch.int32)
    for step, token in enumerate([WORDS.index("4"), WORDS.index("2"), WORDS.index("world")]):
        fill_masks([m], bitmask)
        allowed = {t for t in range(VOCAB) if (int(bitmask[0, t // 32]) >> (t % 32)) & 1}
        # NOTE: "h" and "w" are allowed too: letters can spell the rest of "hello" and "world"
        want = DIGITS if step < 2 else {WORDS.index(w) for w in ("hello", "world", "h", "w")}
        assert allowed == want
        assert m.consume_token(token)
    assert m.is_stopped()


def test_an_unenforceable_schema_is_refused_with_its_keyword(compiler):
    with pytest.raises(GrammarError, match="not"):
        compiler.compile(JsonSchema({"type": "object", "not": {"type": "null"}}))
    with pytest.raises(GrammarError, match="regex"):
        compiler.compile(Lark("start: /[a/"))


def test_greedy_output_follows_the_grammar_and_stops_when_it_is_complete(engine, compiler):
    g = compiler.compile(Regex("[0-9]{3}"))
    [col] = run(engine, [[5, 9, 14]], [SamplingParams(temperature=0, max_tokens=20, grammar=g)])
    tokens = col.tokens()
    assert len(tokens) == 3 and set(tokens) <= DIGITS
    done = col.final()
    assert done.finish_reason == "stop" and done.completion_tokens == 3


def test_sampled_choices_bias_and_penalties_stay_inside_the_grammar(engine, compiler):
    # NOTE: the fake's token bytes have no spaces (its decoder adds them between words)
    g = compiler.compile(Choice(("helloworld", "stop")))
    params = SamplingParams(
        temperature=1.5,
        n=4,
        seed=3,
        max_tokens=10,
        grammar=g,
        logit_bias={WORDS.index("a"): 100.0},
        presence_penalty=2.0,
        top_k=3,
    )
    [col] = run(engine, [[5, 9, 14]], [params])
    for i in range(4):
        text = col.text(i)
        assert text.replace(" ", "") in ("helloworld", "stop"), text
        assert col.final(i).finish_reason == "stop"
    # unconstrained, the +100 bias would pick "a" every time
    [free] = run(
        engine, [[5, 9, 14]], [SamplingParams(temperature=0, max_tokens=3, logit_bias={WORDS.index("a"): 100.0})]
    )
    assert free.tokens() == [WORDS.index("a")] * 3


def test_logprobs_report_the_models_distribution_before_the_mask(engine, compiler):
    g = compiler.compile(Regex("[0-9]{4}"))
    prompt = [5, 9, 14]
    [col] = run(
        engine, [prompt], [SamplingParams(temperature=0, max_tokens=4, grammar=g, logprobs=True, top_logprobs=2)]
    )
    from tests.engine.fake import next_token

    tokens = list(prompt)
    lps = [lp for e in col.events if hasattr(e, "logprobs") and e.logprobs for lp in e.logprobs]
    assert len(lps) == 4
    for lp in lps:
        best = next_token(tokens)
        raw = 8.0 - (torch.arange(VOCAB) - best).abs().float() * 0.5
        ref = torch.log_softmax(raw, -1)
        assert lp.logprob == pytest.approx(float(ref[lp.token_id]), abs=1e-5)
        assert lp.top[0][0] == best  # NOTE: the model's favourite, which the grammar may forbid
        tokens.append(lp.token_id)
        assert lp.token_id in DIGITS


def test_length_ends_a_constrained_sequence_stop_strings_and_tokens_do_not(engine, compiler):
    """NOTE: the grammar decides where a constrained answer ends (so a schema's answer always
    validates unless max_tokens cuts it); the same stops cut the free answer."""
    g = compiler.compile(Lark('start: "a" "b" "c" "d" "e"'))
    c = WORDS.index("c")
    by_string, by_token, short, free = run(
        engine,
        [[5, 9, 14]] * 4,
        [
            SamplingParams(temperature=0, max_tokens=20, grammar=g, stop=("c",)),
            SamplingParams(temperature=0, max_tokens=20, grammar=g, stop_token_ids=(c,)),
            SamplingParams(temperature=0, max_tokens=2, grammar=g),
            SamplingParams(temperature=0, max_tokens=20, logit_bias={c: 100.0}, stop=("c",), stop_token_ids=(c,)),
        ],
    )
    for whole in (by_string, by_token):
        assert whole.text().replace(" ", "") == "abcde"
        assert whole.final().finish_reason == "stop" and whole.final().stop_reason is None
    assert short.text().replace(" ", "") == "ab" and short.final().finish_reason == "length"
    assert free.text() == "" and free.tokens() == [c] and free.final().stop_reason == c


def test_constrained_and_free_rows_batch_together(engine, compiler):
    from tests.engine.fake import expected

    g = compiler.compile(Regex("[0-9]{4}"))
    prompts = [[5, 9, 14], [7] * 11, [3, 4], list(range(30, 36))]
    params = [
        SamplingParams(temperature=0, max_tokens=6, grammar=g if i % 2 == 0 else None, ignore_eos=True)
        for i in range(4)
    ]
    cols = run(engine, prompts, params)
    for i, (p, c) in enumerate(zip(prompts, cols)):
        if i % 2:
            assert c.tokens() == expected(p, 6)  # NOTE: the free rows are untouched by their neighbours' masks
        else:
            assert len(c.tokens()) == 4 and set(c.tokens()) <= DIGITS
    assert all(isinstance(c.final(), Done) for c in cols)
