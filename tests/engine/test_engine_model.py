"""The engine on a tiny real model: batching and shared prompt caches never change greedy output
(the numerics of batched attention over slots of different lengths, sliding window included)."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import SamplingParams
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir

from .fake import run


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
        assert batched.snapshot()["kv_blocks_in_use"] == 0
    finally:
        batched.stop()
    assert all(len(t) == 12 for t in ref)
    assert got == ref


def test_n_choices_share_one_prompt_prefill(pipe):
    """n > 1: the prompt's full blocks are computed once and shared; the other choices compute the
    rest of the prompt and match it exactly."""
    e = make_engine(pipe, max_seqs=4, prefill_chunk=8, block_size=4, prefix_caching=False)
    try:
        prompt = PROMPTS[1]  # 23 tokens: three prefill chunks; 5 full blocks before its last token
        greedy = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
        alone = run(e, [prompt], [greedy])[0].tokens()
        before = e.snapshot()["prompt_tokens"]
        c = run(e, [prompt], [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, n=3)])[0]
        assert e.snapshot()["prompt_tokens"] - before == len(prompt) + 2 * 3
        assert c.tokens(0) == c.tokens(1) == c.tokens(2) == alone
        assert e.snapshot()["kv_blocks_in_use"] == 0
    finally:
        e.stop()
