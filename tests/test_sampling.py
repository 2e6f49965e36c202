"""Table-driven tests of the pure sampling functions."""

from __future__ import annotations

import math

import pytest
import torch

from mistralrs_py import sampling as S
from mistralrs_py.engine.request import SamplingParams

L = torch.tensor([2.0, 1.0, 0.5, -1.0, 3.0])


def banned(logits):
    return [i for i, v in enumerate(logits.tolist()) if v == float("-inf")]


@pytest.mark.parametrize("k,expect_banned", [(0, []), (1, [0, 1, 2, 3]), (2, [1, 2, 3]), (5, []), (9, [])])
def test_top_k(k, expect_banned):
    assert banned(S.apply_top_k(L, k)) == expect_banned


@pytest.mark.parametrize("p", [1e-6, 0.5, 0.7, 0.9, 0.99, 1.0])
def test_top_p_keeps_smallest_set_reaching_p(p):
    probs = L.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    keep, acc = [], 0.0
    for i in order:
        keep.append(i)
        acc += probs[i].item()
        if acc >= p:
            break
    assert sorted(set(range(5)) - set(banned(S.apply_top_p(L, p)))) == sorted(keep)


@pytest.mark.parametrize("min_p,expect", [(0.0, []), (0.1, [2, 3]), (0.3, [1, 2, 3]), (0.5, [0, 1, 2, 3])])
def test_min_p(min_p, expect):
    assert banned(S.apply_min_p(L, min_p)) == expect


def test_logit_bias_adds():
    out = S.apply_logit_bias(L, {1: -100.0, 3: 5.0})
    assert out[1].item() == pytest.approx(-99.0) and out[3].item() == pytest.approx(4.0)
    assert torch.equal(out[[0, 2, 4]], L[[0, 2, 4]])


def test_repetition_penalty_divides_positive_multiplies_negative_once():
    out = S.apply_repetition_penalty(L, [0, 0, 3], 2.0)
    assert out[0].item() == 1.0 and out[3].item() == -2.0 and out[4].item() == 3.0


def test_presence_and_frequency_penalties():
    out = S.apply_presence_frequency(L, [4, 4, 4, 1], presence=0.5, frequency=0.25)
    assert out[4].item() == pytest.approx(3.0 - 0.75 - 0.5)
    assert out[1].item() == pytest.approx(1.0 - 0.25 - 0.5)
    assert out[0].item() == 2.0


def test_process_logits_greedy_ignores_temperature_and_filters():
    p = SamplingParams(temperature=0.0, top_k=2, top_p=0.1)
    assert torch.equal(S.process_logits(L, p, [], []), L)
    assert S.sample(S.process_logits(L, p, [], []), True, None) == 4


def test_temperature_scales_and_seeded_sampling_repeats():
    p = SamplingParams(temperature=0.5)
    assert torch.allclose(S.process_logits(L, p, [], []), L / 0.5)
    draws = lambda seed: [S.sample(L, False, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(20)]
    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.tensor([S.sample(L, False, g) for _ in range(4000)]), minlength=5).float() / 4000
    assert torch.allclose(counts, L.softmax(-1), atol=0.03)


def test_token_logprobs_are_log_softmax():
    lp, top = S.token_logprobs(L, 2, 3)
    ref = torch.log_softmax(L, -1)
    assert lp == pytest.approx(ref[2].item())
    assert [i for i, _ in top] == [4, 0, 1] and all(math.isclose(v, ref[i].item(), rel_tol=1e-6) for i, v in top)


def test_needs_processing():
    assert not S.needs_processing(SamplingParams(temperature=0.0))
    assert S.needs_processing(SamplingParams(temperature=0.0, logit_bias={1: 1.0}))
    assert S.needs_processing(SamplingParams(temperature=1.0))
