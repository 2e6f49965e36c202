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


def test_top_p_zero_keeps_the_top_token():
    assert banned(S.apply_top_p(L, 0.0)) == [0, 1, 2, 3]
    params = [SamplingParams(top_p=0.0), SamplingParams(top_p=0.0, top_k=3)]
    tokens = S.sample_batch(torch.stack([L, L]), params, [[], []], [[], []], [None, None])
    assert tokens.tolist() == [4, 4]


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

    def draws(seed):
        return [S.sample(L, False, g) for g in [torch.Generator().manual_seed(seed)] for _ in range(20)]

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


def test_sample_refuses_an_empty_or_nan_distribution():
    with pytest.raises(ValueError):
        S.sample(torch.full((5,), float("-inf")), False, torch.Generator().manual_seed(0))


# ---- the batched sampler, checked row by row against the single-row functions ----------------------
V = 64
MIXED = [
    SamplingParams(temperature=0.0),  # plain greedy
    SamplingParams(temperature=0.0, logit_bias={3: 8.0, 7: -100.0}, repetition_penalty=1.5, frequency_penalty=0.7),
    SamplingParams(top_k=1, presence_penalty=1.5),  # greedy through top_k
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_k=5),
    SamplingParams(top_p=0.6),
    SamplingParams(min_p=0.2),
    SamplingParams(
        temperature=0.9,
        top_k=20,
        top_p=0.8,
        min_p=0.05,
        repetition_penalty=1.3,
        repeat_last_n=8,
        presence_penalty=0.4,
        frequency_penalty=-0.3,
        logit_bias={0: 5.0, 1: -5.0},
    ),
    SamplingParams(top_k=V, top_p=1.0, repetition_penalty=0.7),  # filters off, a penalty below 1
    SamplingParams(top_k=-1, repetition_penalty=2.0, repeat_last_n=0),  # a window of 0: no penalty
    SamplingParams(temperature=2.0, top_p=0.95, logit_bias={5: 100.0}),
    SamplingParams(temperature=0.5, top_k=3, frequency_penalty=2.0),
]
GREEDY = [p for p in MIXED if S.is_greedy(p)]
SAMPLED = [p for p in MIXED if not S.is_greedy(p)]
# every row with top-p also has a top-k: the batch takes topk(largest k) instead of a full sort
TOP_K = [p for p in MIXED if p.top_p == 1.0 or 0 < p.top_k < V]


def batch_case(params, seed):
    """Random logits, and outputs/contexts drawn from a small id range so penalties hit often."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(params), generator=g).tolist()
    params = [params[i] for i in perm]
    logits = torch.randn(len(params), V, generator=g) * 3
    lengths = torch.randint(0, 15, (len(params),), generator=g).tolist()
    outputs = [torch.randint(0, 12, (n,), generator=g).tolist() for n in lengths]
    # NOTE: contexts longer than the default 64-token window, so the window's edge matters
    contexts = [torch.randint(0, 40, (70,), generator=g).tolist() + o for o in outputs]
    return logits, params, outputs, contexts


def processed_batch(logits, params, outputs, contexts):
    """What sample_batch draws from: the batched penalties on every row, then the batched filters on
    the sampled (not greedy) rows."""
    x = S._penalize_batch(logits.float(), params, outputs, contexts)
    rows = [r for r, p in enumerate(params) if not S.is_greedy(p)]
    if not rows:
        return x
    idx = torch.tensor(rows)
    return x.index_copy(0, idx, S._filter_batch(x[idx], [params[r] for r in rows]))


@pytest.mark.parametrize("params", [MIXED, SAMPLED, GREEDY, TOP_K], ids=["mixed", "all-sampled", "all-greedy", "top-k"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batched_processing_equals_process_logits_row_by_row(params, seed):
    logits, params, outputs, contexts = batch_case(params, seed)
    before = logits.clone()
    got = processed_batch(logits, params, outputs, contexts)
    assert torch.equal(logits, before)  # the raw logits (logprobs read them) are left alone
    for r, p in enumerate(params):
        ref = S.process_logits(logits[r], p, outputs[r], contexts[r])
        assert torch.equal(torch.isinf(got[r]), torch.isinf(ref)), (r, p)
        assert torch.allclose(got[r].softmax(-1), ref.softmax(-1), atol=1e-6, rtol=1e-5), (r, p)
        if S.is_greedy(p):
            assert torch.allclose(got[r], ref) and got[r].argmax() == ref.argmax()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("params", [MIXED, TOP_K, GREEDY], ids=["mixed", "top-k", "all-greedy"])
def test_sample_batch_draws_like_the_single_row_sampler(params, seed):
    logits, params, outputs, contexts = batch_case(params, seed)
    gens = [torch.Generator().manual_seed(100 + r) for r in range(len(params))]
    refs = [torch.Generator().manual_seed(100 + r) for r in range(len(params))]
    for _ in range(10):  # the generators advance: later draws must agree too
        got = S.sample_batch(logits, params, outputs, contexts, gens).tolist()
        want = [
            S.sample(S.process_logits(logits[r], p, outputs[r], contexts[r]), S.is_greedy(p), refs[r])
            for r, p in enumerate(params)
        ]
        assert got == want


def test_top_p_of_one_stays_off_when_the_float_cumsum_reaches_one_early():
    # p0 rounds to 1.0 in float32, so (cumsum - prob) of the next tokens is already 1.0 >= p
    row = torch.tensor([0.0, -30.0, -30.0, -31.0, -40.0])
    p = SamplingParams(top_k=4, top_p=1.0)
    got = processed_batch(row[None], [p], [[]], [[]])[0]
    assert banned(got) == banned(S.process_logits(row, p, [], [])) == [4]


def test_sample_batch_rows_are_independent_and_seeded():
    logits, params, outputs, contexts = batch_case(SAMPLED, 3)

    def draws(seeds, rows):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        sub = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return [
            S.sample_batch(logits[rows], sub(params), sub(outputs), sub(contexts), gens).tolist() for _ in range(30)
        ]

    everyone = list(range(len(params)))
    seeds = [7 + r for r in everyone]
    assert draws(seeds, everyone) == draws(seeds, everyone)
    assert draws(seeds, everyone) != draws([s + 1000 for s in seeds], everyone)
    # a row's tokens depend on its own seed only, not on which rows share its batch
    alone = [draws([seeds[r]], [r]) for r in everyone]
    together = draws(seeds, everyone)
    assert all([step[0] for step in alone[r]] == [step[r] for step in together] for r in everyone)


@pytest.mark.parametrize(
    "p",
    [
        SamplingParams(),
        SamplingParams(temperature=0.8, top_k=6),
        SamplingParams(top_p=0.7),
        SamplingParams(min_p=0.15, repetition_penalty=1.4),
    ],
)
def test_sample_batch_follows_the_processed_distribution(p):
    n, v = 6000, 12
    row = torch.randn(v, generator=torch.Generator().manual_seed(5)) * 1.5
    context = [0, 1, 2]
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    tokens = S.sample_batch(row.expand(n, v).contiguous(), [p] * n, [[]] * n, [context] * n, gens)
    counts = torch.bincount(tokens, minlength=v).double()
    probs = S.process_logits(row, p, [], context).softmax(-1).double()
    kept = probs > 0
    assert counts[~kept].sum() == 0  # a filtered token is never drawn
    exp = probs[kept] * n
    chi2 = float(((counts[kept] - exp) ** 2 / exp).sum())
    df = int(kept.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * max(df, 1)), (chi2, df)


def test_sample_batch_flags_a_row_it_cannot_sample():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.8), SamplingParams(temperature=1e-45), SamplingParams(temperature=0.0)]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    tokens = S.sample_batch(logits, params, [[]] * 3, [[]] * 3, gens).tolist()
    assert tokens[1] == -1 and 0 <= tokens[0] < V and tokens[2] == int(logits[2].argmax())
    with pytest.raises(ValueError):  # a bias id outside the vocabulary would land in another row
        S.sample_batch(logits, [SamplingParams(logit_bias={V: 1.0})] * 3, [[]] * 3, [[]] * 3, gens)


def test_batch_token_logprobs_are_log_softmax_of_the_raw_logits():
    raw = torch.randn(5, V, generator=torch.Generator().manual_seed(1)) * 4
    tokens = torch.tensor([3, 0, 63, 17, 17])
    top_ns = [0, 3, 20, 1, 0]
    got = S.batch_token_logprobs(raw, tokens, top_ns)
    ref = torch.log_softmax(raw, -1)
    for r, (lp, top) in enumerate(got):
        assert lp == pytest.approx(ref[r, tokens[r]].item(), abs=1e-6)
        vals, ids = torch.topk(ref[r], top_ns[r])
        assert [i for i, _ in top] == ids.tolist()
        assert all(math.isclose(v, w, abs_tol=1e-6) for (_, v), w in zip(top, vals.tolist()))
    assert S.batch_token_logprobs(raw[:2], tokens[:2], [0, 0]) == [(got[0][0], []), (got[1][0], [])]
