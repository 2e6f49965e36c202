"""The paged cache under a random load on the scripted pipeline: prompts sharing prefixes, n > 1,
aborts between steps, a budget small enough to preempt, and the prefix cache on. Every finished
sequence gets exactly the script's tokens, and the block manager's books balance after every step
and are empty at the end."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Request, SamplingParams

from .fake import Collector, FakePipeline, expected


def check_books(e: Engine) -> None:
    m, sched = e.scheduler.cache, e.scheduler
    holders = Counter(b for s in sched.running for b in s.block_table)
    assert all(m.ref[b] == n for b, n in holders.items()), "a block's count is not its holders"
    assert sum(m.ref) == sum(holders.values())
    assert all(s.num_cached <= len(s.block_table) * m.block_size for s in sched.running)
    assert not any(s.block_table for s in sched.waiting)
    evictable = set(m._evictable)
    assert all(m.ref[b] == 0 and m.hash_of[b] is not None for b in evictable)
    assert not evictable & set(m._clean) and len(set(m._clean)) == len(m._clean)
    assert all(m.hash_of[b] == h for h, b in m.cached.items())
    assert m.num_free + sum(1 for r in m.ref if r > 0) == m.num_blocks


@pytest.mark.parametrize("seed", range(6))
def test_random_load_with_shared_prefixes_aborts_and_preemption(seed):
    rng = random.Random(seed)
    pipe = FakePipeline(max_model_len=64)
    # NOTE: 48 positions in blocks of 4 for up to 4 running sequences of up to 40 tokens: preemption
    e = Engine(pipe, max_seqs=4, prefill_chunk=8, block_size=4, kv_cache_mb=48 * 8 / 2**20)
    prefixes = [[rng.randrange(2, 40) for _ in range(rng.randrange(4, 14))] for _ in range(3)]
    requests = []
    for i in range(14):
        prompt = rng.choice(prefixes)[: rng.randrange(1, 14)] + [
            rng.randrange(2, 40) for _ in range(rng.randrange(1, 8))
        ]
        params = SamplingParams(
            temperature=0.0, max_tokens=rng.randrange(1, 14), ignore_eos=True, n=rng.choice([1, 1, 2])
        )
        col = Collector(params.n)
        requests.append((f"r{i}", prompt, params, col))
        e.add_request(Request(f"r{i}", prompt, params, col))
    aborted = set()
    steps = 0
    while e._drain(block=False) and e.scheduler.has_work:
        e.step()
        check_books(e)
        steps += 1
        if rng.random() < 0.08:
            victim = rng.choice(requests)[0]
            aborted.add(victim)
            e.abort(victim)
        assert steps < 2000
    for rid, prompt, params, col in requests:
        want = expected(prompt, params.max_tokens)
        for i in range(params.n):
            got = col.tokens(i)
            if rid in aborted:
                assert got == want[: len(got)]
            else:
                assert col.done.is_set() and got == want, (rid, i)
    m = e.scheduler.cache
    assert m.num_used == 0 and m.num_seqs == 0 and sum(m.ref) == 0
    assert e.snapshot()["errors"] == 0 and e.scheduler.num_preemptions > 0 and e.snapshot()["prefix_cache_hits"] > 0
