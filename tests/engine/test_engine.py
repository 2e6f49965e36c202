"""The engine on a tiny real model: batching never changes greedy output; stops, aborts, slots."""

from __future__ import annotations

import threading

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Delta, Done, Error, Request, SamplingParams
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir


class Collector:
    def __init__(self):
        self.events, self.done = [], threading.Event()
        self.n_done, self.n = 0, 1

    def __call__(self, ev):
        self.events.append(ev)
        if isinstance(ev, (Done, Error)):
            self.n_done += 1
            if self.n_done >= self.n or isinstance(ev, Error):
                self.done.set()

    def tokens(self, index=0):
        return [t for e in self.events if isinstance(e, Delta) and e.index == index for t in e.token_ids]

    def text(self, index=0):
        return "".join(e.text for e in self.events if isinstance(e, Delta) and e.index == index)

    def final(self, index=0):
        return next(e for e in self.events if isinstance(e, Done) and e.index == index)


def run(engine, prompts, params_list, submit_all=True):
    cols = []
    for i, (p, params) in enumerate(zip(prompts, params_list)):
        c = Collector()
        c.n = params.n
        cols.append(c)
        engine.add_request(Request(f"r{i}", p, params, c))
    for c in cols:
        assert c.done.wait(60), "request did not finish"
    return cols


@pytest.fixture(scope="module")
def pipe(tiny_mistral):
    return load_safetensors_dir(tiny_mistral, ModelSpec(model_id=str(tiny_mistral)), torch.device("cpu"), torch.float32)


def make_engine(pipe, **kw):
    e = Engine(pipe, **kw)
    e.start()
    return e


PROMPTS = [[5, 9, 14], list(range(20, 43)), [7] * 11, list(range(100, 106))]


def tokens_alone(pipe, prompts, params) -> list[list[int]]:
    """The reference: each prompt run by itself on an engine with one slot."""
    alone = make_engine(pipe, max_seqs=1)
    try:
        return [run(alone, [p], [params])[0].tokens() for p in prompts]
    finally:
        alone.stop()


@pytest.mark.parametrize("policy", ["continuous", "catch-up"])
def test_batched_equals_alone(pipe, policy):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    ref = tokens_alone(pipe, PROMPTS, params)
    batched = make_engine(pipe, max_seqs=4, policy=policy, prefill_chunk=8)
    try:
        got = [c.tokens() for c in run(batched, PROMPTS, [params] * len(PROMPTS))]
        assert batched.snapshot()["kv_slots_in_use"] == 0
    finally:
        batched.stop()
    assert all(len(t) == 12 for t in ref)
    assert got == ref


def test_more_requests_than_slots_all_finish(pipe):
    e = make_engine(pipe, max_seqs=2)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True)
        cols = run(e, PROMPTS * 2, [params] * 8)
        assert [c.final().completion_tokens for c in cols] == [5] * 8
        assert all(c.final().finish_reason == "length" for c in cols)
        snap = e.snapshot()
        assert snap["running"] == snap["waiting"] == snap["kv_slots_in_use"] == 0
    finally:
        e.stop()


def test_seeded_sampling_repeats_and_n_choices(pipe):
    e = make_engine(pipe, max_seqs=4)
    try:
        p = SamplingParams(temperature=1.0, seed=123, max_tokens=10, ignore_eos=True, n=2)
        a, b = run(e, [PROMPTS[1], PROMPTS[1]], [p, p])
        assert a.tokens(0) == b.tokens(0) and a.tokens(1) == b.tokens(1)
        assert a.tokens(0) != a.tokens(1)  # two choices are independent draws
        c = run(e, [PROMPTS[1]], [SamplingParams(temperature=1.0, seed=124, max_tokens=10, ignore_eos=True)])[0]
        assert c.tokens() != a.tokens(0)
    finally:
        e.stop()


def test_abort_frees_slot(pipe):
    e = make_engine(pipe, max_seqs=2)
    try:
        c = Collector()
        e.add_request(Request("long", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True), c))
        while not c.events:
            threading.Event().wait(0.01)
        e.abort("long")
        for _ in range(200):
            if e.snapshot()["kv_slots_in_use"] == 0:
                break
            threading.Event().wait(0.01)
        assert e.snapshot()["kv_slots_in_use"] == 0 and e.snapshot()["aborted"] == 1
        assert len(c.tokens()) < 200
        # the engine still answers
        assert run(e, [PROMPTS[2]], [SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)])[0].final().completion_tokens == 3
    finally:
        e.stop()


def test_n_choices_share_one_prompt_prefill(pipe):
    """n > 1: the prompt is processed once; the other choices copy its cache and match it exactly."""
    e = make_engine(pipe, max_seqs=4, prefill_chunk=8)
    try:
        prompt = PROMPTS[1]  # 23 tokens: three prefill chunks
        greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        alone = run(e, [prompt], [greedy])[0].tokens()
        before = e.snapshot()["prompt_tokens"]
        c = run(e, [prompt], [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=3)])[0]
        assert e.snapshot()["prompt_tokens"] - before == len(prompt)
        assert c.tokens(0) == c.tokens(1) == c.tokens(2) == alone
        assert e.snapshot()["kv_slots_in_use"] == 0
    finally:
        e.stop()
