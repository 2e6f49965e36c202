"""Prompt logprobs (echo + logprobs, vLLM's prompt_logprobs) survive a preemption: a sequence
preempted in the middle of its prompt and recomputed keeps the logprobs it had and scores only the
positions after them, so the answer holds exactly one entry per prompt token, equal bit for bit (in
float32) to the run that was never preempted. On a tiny real model, driven on the test's thread
(Engine.run_until_idle) so that the schedule, and so the preemption, is the same on every run."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Delta, Done, Request, SamplingParams
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir

from .fake import Collector

BS = 4
TOKEN_BYTES = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head_dim x float32: the tiny model's


@pytest.fixture(scope="module")
def pipe(tiny_llama):
    return load_safetensors_dir(tiny_llama, ModelSpec(model_id=str(tiny_llama)), torch.device("cpu"), torch.float32)


# A decodes a long answer from a short prompt; B, admitted next, has a long prompt whose logprobs are
# wanted and prefills it in small chunks, so that A's growth preempts B (the newest) mid-prompt
DECODER = list(range(5, 21))  # with these sizes B is preempted after 16 of its 40 prompt tokens
LONG = [(7 * i) % 200 + 6 for i in range(40)]


def serve(pipe, capacity_tokens: int, params: SamplingParams) -> tuple[list[Collector], dict]:
    e = Engine(
        pipe,
        max_seqs=2,
        prefill_chunk=2,
        block_size=BS,
        kv_cache_mb=capacity_tokens * TOKEN_BYTES / 2**20,
    )
    a, b = Collector(), Collector()
    e.add_request(Request("a", DECODER, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), a))
    e.add_request(Request("b", LONG, params, b))
    e.run_until_idle()
    assert a.done.is_set() and b.done.is_set() and not a.errors() and not b.errors()
    return [a, b], e.snapshot()


def prompt_lps(col: Collector) -> list:
    got = [ev.prompt_logprobs for ev in col.events if isinstance(ev, Delta) and ev.prompt_logprobs is not None]
    assert len(got) == 1, "the prompt's logprobs go out once"
    return got[0]


@pytest.mark.parametrize("max_tokens", [0, 3])
def test_a_preempted_prompt_keeps_one_logprob_per_token(pipe, max_tokens):
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=3)
    (_, ref), snap = serve(pipe, 256, params)
    assert snap["preempted"] == 0
    (a, got), snap = serve(pipe, 64, params)
    assert snap["preempted"] > 0 and snap["errors"] == 0 and snap["kv_blocks_in_use"] == 0
    # B was recomputed: more prompt tokens were computed than the two prompts hold
    assert snap["prompt_tokens"] > len(DECODER) + len(LONG)
    want, lps = prompt_lps(ref), prompt_lps(got)
    assert len(want) == len(lps) == len(LONG) and lps[0] is None and want[0] is None
    assert [x.token_id for x in lps[1:]] == LONG[1:]
    for x, y in zip(lps[1:], want[1:]):
        # bit for bit: the same float32 numbers, alternatives included
        assert x.logprob == y.logprob and x.top == y.top
    assert got.tokens() == ref.tokens() and len(got.tokens()) == max_tokens
    done = next(ev for ev in got.events if isinstance(ev, Done))
    assert done.prompt_tokens == len(LONG) and done.completion_tokens == max_tokens


def test_a_recomputed_chunk_scores_only_positions_not_scored_yet():
    from mistralrs_py.engine.request import TokenLogprob
    from mistralrs_py.engine.sequence import Sequence

    s = Sequence(Request("r", list(range(10, 20)), SamplingParams(prompt_logprobs=0), lambda e: None), 0, None)
    assert list(s.prompt_rows_to_score(0, 4)) == [0, 1, 2, 3]
    s.add_prompt_logprobs(1, [TokenLogprob(t, -1.0) for t in range(11, 15)])
    # preempted here; the recompute starts again at position 0: its first chunk scores nothing new
    assert not s.prompt_rows_to_score(0, 4)
    assert list(s.prompt_rows_to_score(4, 8)) == [4, 5, 6, 7, 8]  # the last row predicts, not scores
    s.add_prompt_logprobs(5, [TokenLogprob(t, -2.0) for t in range(15, 20)])
    assert [x.token_id for x in s.take_prompt_logprobs()[1:]] == list(range(11, 20))
    assert not s.prompt_rows_to_score(0, 10)
    one = Sequence(Request("r", [7], SamplingParams(prompt_logprobs=0), lambda e: None), 0, None)
    assert one.take_prompt_logprobs() == [None]  # a one-token prompt: nothing to score, sent at once
