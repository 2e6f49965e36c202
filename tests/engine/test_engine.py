"""Engine rules on the scripted pipeline (tests/engine/fake.py): batching, budgets, preemption,
aborts, failures and slot ownership, each checked against the script computed without the engine."""

from __future__ import annotations

import threading
import time

import pytest

from mistralrs_py.engine.engine import EngineDead
from mistralrs_py.engine.request import Request, SamplingParams

from .fake import EOS, PROMPTS, Collector, FakePipeline, expected, make_engine, run

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture
def engine():
    engines = []

    def make(pipe=None, **kw):
        e = make_engine(pipe, **kw)
        e.start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.stop()


@pytest.mark.parametrize("policy", ["continuous", "catch-up"])
@pytest.mark.parametrize("max_seqs", [1, 2, 4])
def test_every_sequence_gets_its_scripted_tokens_however_it_is_batched(engine, policy, max_seqs):
    e = engine(max_seqs=max_seqs, policy=policy, prefill_chunk=8)
    cols = run(e, PROMPTS * 2, [GREEDY] * 8)
    assert [c.tokens() for c in cols] == [expected(p, 12) for p in PROMPTS * 2]
    assert all(c.final().finish_reason == "length" and c.final().completion_tokens == 12 for c in cols)
    snap = e.snapshot()
    assert snap["running"] == snap["waiting"] == snap["kv_blocks_in_use"] == snap["kv_cache_bytes_in_use"] == 0
    assert snap["errors"] == 0


def test_continuous_batching_decodes_mixed_lengths_together(engine):
    pipe = FakePipeline()
    e = engine(pipe, max_seqs=4, policy="continuous", prefill_chunk=64)
    run(e, PROMPTS, [GREEDY] * 4)
    continuous = pipe.steps
    pipe2 = FakePipeline()
    e2 = engine(pipe2, max_seqs=4, policy="catch-up", prefill_chunk=64)
    run(e2, PROMPTS, [GREEDY] * 4)
    # NOTE: catch-up runs the shorter sequences alone until they reach the longest: more steps
    assert continuous < pipe2.steps


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_n_choices_share_one_prompt_prefill(engine, block_size, prefix_caching):
    e = engine(max_seqs=4, prefill_chunk=8, block_size=block_size, prefix_caching=prefix_caching)
    prompt = PROMPTS[1]  # 23 tokens: three prefill chunks
    (c,) = run(e, [prompt], [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=3)])
    assert c.tokens(0) == c.tokens(1) == c.tokens(2) == expected(prompt, 10)
    # the prompt's full blocks (all but its last token's) were computed once; each other choice
    # computes the rest of the prompt
    shared = (len(prompt) - 1) // block_size * block_size
    assert e.snapshot()["prompt_tokens"] == len(prompt) + 2 * (len(prompt) - shared)
    assert e.snapshot()["kv_blocks_in_use"] == 0


def test_seeded_sampling_repeats_and_choices_are_independent(engine):
    e = engine(max_seqs=4)
    p = SamplingParams(temperature=1.0, seed=123, max_tokens=10, ignore_eos=True, n=2)
    a, b = run(e, [PROMPTS[1], PROMPTS[1]], [p, p])
    assert a.tokens(0) == b.tokens(0) and a.tokens(1) == b.tokens(1)
    assert a.tokens(0) != a.tokens(1)  # two choices are independent draws
    (c,) = run(e, [PROMPTS[1]], [SamplingParams(temperature=1.0, seed=124, max_tokens=10, ignore_eos=True)])
    assert c.tokens() != a.tokens(0)


def test_preempted_sequences_recompute_their_scripted_tokens(engine, caplog):
    # 4 sequences of up to 23 + 20 tokens need ~130 cached tokens; the budget holds 64 (8 bytes a token)
    e = engine(FakePipeline(max_model_len=256), max_seqs=4, prefill_chunk=16, kv_cache_mb=64 * 8 / 2**20)
    assert e.max_len == 64 and "contexts are served up to 64 tokens" in caplog.text
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    cols = run(e, PROMPTS, [params] * 4)
    assert [c.tokens() for c in cols] == [expected(p, 20) for p in PROMPTS]
    snap = e.snapshot()
    assert snap["preempted"] > 0 and snap["kv_blocks_in_use"] == 0 and snap["errors"] == 0


def test_every_slot_a_sequence_took_is_released_once_with_its_report(engine):
    pipe = FakePipeline()
    e = engine(pipe, max_seqs=2, kv_cache_mb=40 * 8 / 2**20)  # tight: preemptions happen too
    cols = run(e, PROMPTS, [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)] * 4)
    assert sorted(pipe.begun) == sorted(pipe.ended) and len(pipe.begun) >= 4
    assert all(c.final().extra == {"fake_report": c.final().extra["fake_report"]} for c in cols)


def test_stop_tokens_and_eos_end_a_sequence(engine):
    e = engine(max_seqs=2)
    want = expected(PROMPTS[0], 12)
    stop_at = want[5]
    (c,) = run(e, [PROMPTS[0]], [SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_at,))])
    done = c.final()
    assert done.finish_reason == "stop" and done.stop_reason == stop_at
    assert c.tokens() == want[: want.index(stop_at) + 1]
    # the bias forces EOS as the first token: finished with "stop" and no text
    (c,) = run(e, [PROMPTS[0]], [SamplingParams(temperature=0.0, max_tokens=12, logit_bias={EOS: 100.0})])
    assert c.final().finish_reason == "stop" and c.tokens() == [EOS] and c.text() == ""


def test_stop_strings_cut_the_text(engine):
    e = engine(max_seqs=1)
    tok, prompt = e.pipe.tokenizer, PROMPTS[3]
    text = tok.decode(prompt + expected(prompt, 12))[len(tok.decode(prompt)) :]  # " d c b v u ..."
    words = text.split()
    stop = f"{words[2]} {words[3]}"  # spans two tokens: held back until it is decided
    (c,) = run(e, [prompt], [SamplingParams(temperature=0.0, max_tokens=12, stop=(stop,))])
    assert c.final().finish_reason == "stop" and c.final().stop_reason == stop
    assert c.text() == text[: text.index(stop)]


def test_abort_frees_the_slot_and_the_engine_goes_on(engine):
    pipe = FakePipeline(max_model_len=4096)
    e = engine(pipe, max_seqs=2)
    c = Collector()
    e.add_request(Request("long", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=4000, ignore_eos=True), c))
    while not c.events:
        time.sleep(0.001)
    e.abort("long")
    deadline = time.monotonic() + 10
    while e.snapshot()["kv_blocks_in_use"] and time.monotonic() < deadline:
        time.sleep(0.001)
    assert e.snapshot()["kv_blocks_in_use"] == 0 and e.snapshot()["aborted"] == 1
    assert len(c.tokens()) < 4000 and not c.done.is_set()  # an aborted request gets no more events
    assert pipe.ended == pipe.begun
    (d,) = run(e, [PROMPTS[2]], [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)])
    assert d.tokens() == expected(PROMPTS[2], 3)


def test_a_failed_forward_fails_its_step_only(engine):
    pipe = FakePipeline()
    e = engine(pipe, max_seqs=4)
    pipe.fail_on = 39  # a token only the bad prompt has
    bad, good = Collector(), Collector()
    e.add_request(Request("bad", [39, 5], GREEDY, bad))
    assert bad.done.wait(10)
    assert "model forward failed: RuntimeError" in bad.errors()[0].message
    pipe.fail_on = None
    (good,) = run(e, [PROMPTS[0]], [GREEDY])
    assert good.tokens() == expected(PROMPTS[0], 12)
    snap = e.snapshot()
    assert snap["errors"] == 1 and snap["kv_blocks_in_use"] == 0 and e.alive


def test_a_dead_engine_fails_everything_and_refuses_new_work(engine, monkeypatch):
    e = engine(max_seqs=1)
    cols = [Collector() for _ in range(3)]
    boom = threading.Event()
    real = e.scheduler.schedule

    def schedule():
        if boom.is_set():
            raise RuntimeError("injected engine fault")
        return real()

    monkeypatch.setattr(e.scheduler, "schedule", schedule)
    boom.set()
    for i, c in enumerate(cols):
        e.add_request(Request(f"r{i}", PROMPTS[0], GREEDY, c))
    assert all(c.done.wait(10) for c in cols)
    assert all(c.errors() and "the engine stopped: RuntimeError" in c.errors()[0].message for c in cols)
    assert not e.alive
    with pytest.raises(EngineDead):
        e.add_request(Request("late", PROMPTS[0], GREEDY, Collector()))


@pytest.mark.parametrize("prompt", [[], list(range(2, 42)) * 2], ids=["empty", "fills-the-context"])
def test_a_prompt_that_cannot_progress_fails_alone(engine, prompt):
    e = engine(FakePipeline(max_model_len=64), max_seqs=2)
    bad = Collector()
    e.add_request(Request("bad", prompt, GREEDY, bad))
    assert bad.done.wait(10) and "a prompt must have 1 to 63 tokens" in bad.errors()[0].message
    (good,) = run(e, [PROMPTS[0]], [GREEDY])
    assert good.tokens() == expected(PROMPTS[0], 12)
    assert e.snapshot()["waiting"] == e.snapshot()["running"] == 0 and e.alive


def test_seeds_at_the_ends_of_the_64_bit_range_work(engine):
    e = engine(max_seqs=4)
    top = SamplingParams(temperature=1.0, seed=2**64 - 1, max_tokens=4, ignore_eos=True, n=2)  # choice 1: seed 0
    low = SamplingParams(temperature=1.0, seed=-(2**63), max_tokens=4, ignore_eos=True)
    zero = SamplingParams(temperature=1.0, seed=0, max_tokens=4, ignore_eos=True)
    a, b, z = run(e, [PROMPTS[1]] * 3, [top, low, zero])
    assert not a.errors() and not b.errors() and len(a.tokens(1)) == 4 and len(b.tokens()) == 4
    assert a.tokens(1) == z.tokens()  # (2**64 - 1) + 1 wraps to 0
