"""The engine samples a whole step in one batched call; seeded rows do not depend on their batch,
the row-by-row fallback gives the same tokens, and a bad row still fails alone."""

from __future__ import annotations

import pytest

from mistralrs_py import sampling
from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.model_runner import ModelRunner
from mistralrs_py.engine.request import Error, Request, SamplingParams

from .fake import PROMPTS, Collector, FakePipeline


@pytest.fixture(scope="module")
def pipe():
    return FakePipeline()


def run_batch(pipe, params_list, prompts=None):
    """All requests are queued before the engine starts, so every run schedules the same batches."""
    prompts = prompts or [PROMPTS[i % len(PROMPTS)] for i in range(len(params_list))]
    e = Engine(pipe, max_seqs=len(params_list), kv_cache_mb=1.0)
    cols = []
    for i, (prompt, params) in enumerate(zip(prompts, params_list)):
        c = Collector()
        cols.append(c)
        e.add_request(Request(f"r{i}", prompt, params, c))
    e.start()
    try:
        for c in cols:
            assert c.done.wait(60), "request did not finish"
        return cols, e.snapshot()
    finally:
        e.stop()


def logprobs_of(c):
    return [(lp.token_id, lp.logprob, lp.top) for e in c.events if getattr(e, "logprobs", None) for lp in e.logprobs]


KW = dict(max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_k=20, seed=7, **KW)
MIXED = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3, presence_penalty=0.5, logit_bias={5: 3.0}, **KW),
    SEEDED,
    SamplingParams(temperature=1.2, min_p=0.05, seed=1, logprobs=True, top_logprobs=3, **KW),
    SamplingParams(temperature=0.9, top_p=0.8, frequency_penalty=0.4, seed=2, **KW),
    SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2, **KW),
]


def test_a_seeded_row_does_not_depend_on_its_batch(pipe):
    (alone,), _ = run_batch(pipe, [SEEDED], [PROMPTS[1]])
    cols, snap = run_batch(pipe, MIXED)
    assert len(alone.tokens()) == 8 and cols[1].tokens() == alone.tokens()
    assert snap["errors"] == 0 and all(c.final().completion_tokens == 8 for c in cols)
    assert [len(logprobs_of(c)) for c in cols] == [0, 0, 8, 0, 8]


def test_the_row_by_row_fallback_samples_like_the_batch(pipe, monkeypatch):
    batched, _ = run_batch(pipe, MIXED)

    def broken(*args, **kwargs):
        raise RuntimeError("injected batch fault")

    monkeypatch.setattr(sampling, "sample_batch", broken)
    fallback, snap = run_batch(pipe, MIXED)
    assert snap["errors"] == 0
    assert [c.tokens() for c in fallback] == [c.tokens() for c in batched]
    for a, b in zip(fallback, batched):
        for (ta, la, topa), (tb, lb, topb) in zip(logprobs_of(a), logprobs_of(b)):
            assert ta == tb and la == pytest.approx(lb, abs=1e-5)
            assert [i for i, _ in topa] == [i for i, _ in topb]


def test_a_row_the_batch_cannot_sample_fails_alone(pipe):
    # NOTE: logits / 1e-45 overflow to inf, so this row's distribution is NaN (sample_batch flags it).
    bad = SamplingParams(temperature=1e-45, seed=3, **KW)
    cols, snap = run_batch(pipe, [*MIXED[:3], bad])
    errors = [e for e in cols[3].events if isinstance(e, Error)]
    assert len(errors) == 1 and "sampling failed" in errors[0].message
    assert all(c.final().completion_tokens == 8 for c in cols[:3])
    assert snap["errors"] == 1 and snap["kv_blocks_in_use"] == 0


def test_a_failing_batch_falls_back_and_the_bad_row_fails_alone(pipe, monkeypatch):
    real_batch, real_row = sampling.sample_batch, ModelRunner._sample_row

    def batch(logits, params, *rest):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected batch fault")
        return real_batch(logits, params, *rest)

    def row(self, seq, logits_row, mask):
        if seq.params.seed == 666 and seq.num_output >= 2:
            raise RuntimeError("injected sampling fault")
        return real_row(self, seq, logits_row, mask)

    monkeypatch.setattr(sampling, "sample_batch", batch)
    monkeypatch.setattr(ModelRunner, "_sample_row", row)
    cols, snap = run_batch(pipe, [*MIXED[:3], SamplingParams(temperature=0.5, seed=666, **KW)])
    errors = [e for e in cols[3].events if isinstance(e, Error)]
    assert len(errors) == 1 and "injected sampling fault" in errors[0].message
    assert len(cols[3].tokens()) <= 2
    assert all(c.final().completion_tokens == 8 for c in cols[:3])
    assert snap["errors"] == 1 and snap["kv_blocks_in_use"] == 0
