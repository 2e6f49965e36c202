"""The block manager and the scheduler's prefix cache, with no model: sharing, reference counts,
eviction order, preemption of a sequence whose blocks are shared, and what is committed when."""

from __future__ import annotations

import pytest

from mistralrs_py.engine.block_manager import BlockManager, block_hash
from mistralrs_py.engine.request import Request, SamplingParams
from mistralrs_py.engine.scheduler import PrefillChunk, Scheduler
from mistralrs_py.engine.sequence import SeqStatus, Sequence

BS = 4


def seq(tokens: list[int], rid: str = "r", **params) -> Sequence:
    return Sequence(Request(rid, list(tokens), SamplingParams(**params), lambda e: None), 0, None)


def computed(s: Sequence) -> Sequence:
    """As if every token of `s` had been through the model."""
    s.num_cached = len(s.tokens)
    return s


def admitted(m: BlockManager, s: Sequence) -> Sequence:
    m.admit(s, m.match(s))
    m.grow(s, len(s.tokens))
    return s


def test_hashes_chain_over_everything_before_the_block():
    a, b = block_hash(None, [1, 2, 3, 4]), block_hash(None, [1, 2, 3, 5])
    assert a != b and block_hash(None, [1, 2, 3, 4]) == a
    # the same tokens after a different prefix are a different block
    assert block_hash(a, [9, 9, 9, 9]) != block_hash(b, [9, 9, 9, 9])
    assert block_hash(None, [1, 2, 3, 4], b"salt") != a


def test_a_later_sequence_shares_the_cached_prefix_by_reference():
    m = BlockManager(num_blocks=16, block_size=BS, num_slots=4)
    a = admitted(m, seq(range(10)))  # 3 blocks, the last one partial
    assert len(a.block_table) == 3 and m.num_used == 3 and a.cached_prompt_tokens == 0
    m.commit(computed(a))  # 2 full blocks enter the cache; the partial one does not
    assert len(m.cached) == 2 and a.num_committed == 2
    b = admitted(m, seq([*range(8), 50, 51, 52]))  # the same first 8 tokens, then different ones
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] not in a.block_table
    assert b.num_cached == 8 and b.cached_prompt_tokens == 8
    assert [m.ref[x] for x in a.block_table] == [2, 2, 1] and m.num_used == 4
    assert (m.stats.queries, m.stats.hits) == (10 + 11, 8)


def test_the_last_token_is_always_computed():
    m = BlockManager(num_blocks=16, block_size=BS, num_slots=4)
    a = admitted(m, seq(range(8)))
    m.commit(computed(a))
    assert len(m.cached) == 2
    # the same 8 tokens: the second block holds the last token, whose logits are needed
    b = seq(range(8))
    assert m.match(b) == a.block_table[:1]
    c = seq(range(9))  # one more token: both blocks hit
    assert m.match(c) == a.block_table[:2]


def test_prompt_logprobs_and_a_disabled_cache_never_hit():
    m = BlockManager(num_blocks=16, block_size=BS, num_slots=4)
    m.commit(computed(admitted(m, seq(range(12)))))
    assert m.match(seq(range(12), prompt_logprobs=1)) == []
    off = BlockManager(num_blocks=16, block_size=BS, num_slots=4, prefix_caching=False)
    off.commit(computed(admitted(off, seq(range(12)))))
    assert not off.cached and off.match(seq(range(12))) == []


def test_freed_blocks_stay_cached_and_are_evicted_least_recently_used_tail_first():
    m = BlockManager(num_blocks=6, block_size=BS, num_slots=4)
    a = admitted(m, seq(range(12)))  # 3 full blocks
    m.commit(computed(a))
    a_blocks = list(a.block_table)
    m.free(a)
    assert m.num_used == 0 and m.num_cached_free == 3 and m.num_free == 6
    b = admitted(m, seq(range(100, 112)))  # needs 3 blocks: the 3 never used go first
    assert not set(b.block_table) & set(a_blocks) and len(m.cached) == 3
    m.commit(computed(b))
    m.free(b)
    c = admitted(m, seq(range(200, 208)))  # 2 blocks: evicted from a's chain, its tail first
    assert c.block_table == [a_blocks[2], a_blocks[1]]
    assert m.match(seq(range(12))) == a_blocks[:1]  # a's first block is still cached
    assert len(m.take_fresh()) == 3 + 3 + 2


def test_a_cache_hit_refreshes_the_blocks_it_uses():
    m = BlockManager(num_blocks=4, block_size=BS, num_slots=4)
    a = admitted(m, seq(range(5)))
    m.commit(computed(a))
    m.free(a)  # a's first block: cached, free
    b = admitted(m, seq(range(100, 105)))
    m.commit(computed(b))
    m.free(b)  # b's first block: cached, free, more recent than a's
    hit = admitted(m, seq(range(6)))  # uses a's block again: it becomes the most recent
    m.commit(computed(hit))
    m.free(hit)
    admitted(m, seq(range(300, 312)))  # 3 blocks: the 2 clean ones, then the least recently used
    assert len(m.match(seq(range(6)))) == 1  # a's block survived: b's was older
    assert m.match(seq(range(100, 106))) == []


def test_only_unshared_blocks_return_when_a_sharer_ends():
    m = BlockManager(num_blocks=8, block_size=BS, num_slots=4)
    a = admitted(m, seq(range(9)))
    m.commit(computed(a))
    b = admitted(m, seq(range(10)))
    assert m.num_used == 4  # 2 shared + a's tail + b's tail
    m.free(a)
    assert m.num_used == 3 and all(m.ref[x] == 1 for x in b.block_table)
    m.free(b)
    assert m.num_used == 0 and m.num_cached_free == 2 and m.num_seqs == 0


def test_retention_forgets_the_oldest_cached_blocks_and_releases_their_pages():
    m = BlockManager(num_blocks=8, block_size=BS, num_slots=4, retain_blocks=2)
    a = admitted(m, seq(range(16)))
    m.commit(computed(a))
    blocks = list(a.block_table)
    m.take_released()
    m.free(a)
    assert m.num_cached_free == 2 and len(m.cached) == 2
    # the tail went first: its pages may go back to the OS
    assert sorted(m.take_released()) == sorted(blocks[2:])
    assert m.match(seq(range(16))) == blocks[:2]


def test_generated_tokens_are_cached_only_where_decode_keys_equal_prompt_keys():
    for cache_decoded, expect in ((True, 3), (False, 1)):
        m = BlockManager(num_blocks=8, block_size=BS, num_slots=4, cache_decoded=cache_decoded)
        a = admitted(m, seq(range(6)))
        a.tokens += [40, 41, 42, 43, 44, 45]  # 6 generated tokens
        m.grow(a, len(a.tokens))
        m.commit(computed(a))
        assert len(m.cached) == expect


def test_admission_counts_revived_cached_blocks_against_the_free_ones():
    m = BlockManager(num_blocks=4, block_size=BS, num_slots=4)
    a = admitted(m, seq(range(12)))
    m.commit(computed(a))
    m.free(a)
    b = seq(range(16))  # hits a's 3 blocks (free, cached) and needs one more
    hit = m.match(b)
    assert len(hit) == 3 and m.admit_cost(b, hit) == 4
    keep = admitted(m, seq(range(12)))  # a sharer holds them now: reviving costs nothing
    # keep holds 2 of them (its third is recomputed: it ends with keep's last token); b revives the third
    assert keep.num_cached == 8 and m.admit_cost(b, m.match(b)) == 1 + 1


# ---- the scheduler ------------------------------------------------------------------------------------
def step(sched: Scheduler):
    """One step: the 'model' computes what was scheduled and appends a token where logits come back."""
    out = sched.schedule()
    for s in out.sampled:
        s.tokens.append(7)
    return out


def test_a_new_request_prefills_only_what_the_cache_lacks():
    sched = Scheduler(max_seqs=4, num_blocks=32, block_size=BS)
    system = list(range(100, 120))  # 5 blocks of shared system prompt
    a = seq([*system, 1, 2, 3], "a")
    sched.add(a)
    assert step(sched).prefill == [PrefillChunk(a, 0, 23)]
    step(sched)  # decode; the prompt's blocks are committed at the next schedule
    b = seq([*system, 9, 9], "b")
    sched.add(b)
    out = step(sched)
    assert out.admitted == [b] and out.prefill == [PrefillChunk(b, 20, 2)] and b.cached_prompt_tokens == 20
    assert b.block_table[:5] == a.block_table[:5]


def test_a_failed_step_commits_nothing():
    sched = Scheduler(max_seqs=4, num_blocks=32, block_size=BS)
    a = seq(range(12), "a")
    sched.add(a)
    step(sched)
    a.finish("error")
    sched.drop(a, computed=False)  # its step failed: its blocks may hold anything
    assert not sched.cache.cached and sched.cache.num_used == 0
    b = seq(range(12), "b")
    sched.add(b)
    assert step(sched).prefill == [PrefillChunk(b, 0, 12)]


def test_n_choices_share_the_prompt_blocks_of_the_first():
    sched = Scheduler(max_seqs=4, num_blocks=32, block_size=BS, prefix_caching=False)
    req = Request("r", list(range(10)), SamplingParams(n=3), lambda e: None)
    seqs = [Sequence(req, i, None) for i in range(3)]
    for s in seqs[1:]:
        s.share_from = seqs[0]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert out.admitted == [seqs[0]]  # the others wait for its prompt's blocks
    out = step(sched)
    assert out.admitted == seqs[1:] and [c.n for c in out.prefill] == [2, 2]  # 8 shared, 2 computed each
    assert all(s.block_table[:2] == seqs[0].block_table[:2] for s in seqs[1:])
    assert [sched.cache.ref[b] for b in seqs[0].block_table] == [3, 3, 1]


def test_preempting_a_sequence_whose_blocks_are_shared_frees_only_its_own():
    sched = Scheduler(max_seqs=4, num_blocks=7, block_size=BS)
    system = list(range(100, 108))  # 2 blocks
    a = seq([*system, 1, 2, 3], "a")
    sched.add(a)
    step(sched)  # a: 11 tokens + 1 generated, 3 blocks
    b = seq([*system, 5, 6, 7], "b")
    sched.add(b)
    step(sched)  # b shares a's 2 blocks and holds 1 of its own: 4 used, 3 free
    assert sched.cache.num_used == 4 and b.block_table[:2] == a.block_table[:2]
    c = seq(range(200, 207), "c")  # 2 blocks: with a's 4th, all that is free
    sched.add(c)
    step(sched)
    assert c.status is SeqStatus.RUNNING and sched.cache.num_free == 0
    preempted = []
    for _ in range(12):  # the sequences fill their last blocks and need new ones
        out = step(sched)
        preempted += out.preempted
        if b in out.preempted:
            break
    assert preempted == [c, b]  # the newest goes first
    shared = a.block_table[:2]
    assert b.block_table == [] and b.status is SeqStatus.WAITING
    # a still holds the shared blocks; only b's own block went back
    assert a.status is SeqStatus.RUNNING and [sched.cache.ref[x] for x in shared] == [1, 1]


@pytest.mark.parametrize("policy", ["continuous", "catch-up"])
def test_a_one_token_prompt_remainder_runs_as_a_prompt_chunk(policy):
    """A cached prefix that leaves one prompt token: it is a prompt chunk (pipelines treat prompt
    rows and decode rows differently), not a decode row."""
    sched = Scheduler(max_seqs=4, num_blocks=32, block_size=BS, policy=policy)
    a = seq(range(9), "a")
    sched.add(a)
    step(sched)
    a.finish("stop")
    sched.drop(a)
    b = seq(range(9), "b")
    sched.add(b)
    out = step(sched)
    assert out.prefill == [PrefillChunk(b, 8, 1)] and not out.decode and b.cached_prompt_tokens == 8
