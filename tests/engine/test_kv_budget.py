"""--kv-cache-mb: admission by budget in blocks, recompute preemption, page release, and the pool plan."""

from __future__ import annotations

import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.kv_cache import CacheShape, KVCachePool, plan_pool, release_pages
from mistralrs_py.engine.request import Request, SamplingParams
from mistralrs_py.engine.scheduler import PrefillChunk, Scheduler
from mistralrs_py.engine.sequence import SeqStatus, Sequence
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir

from .fake import run
from .test_engine_model import make_engine, tokens_alone


def seq(rid: str, prompt_len: int) -> Sequence:
    """A sequence of distinct tokens (others' prompts never share its blocks)."""
    first = 1000 * (ord(rid[0]) - ord("a"))
    return Sequence(Request(rid, list(range(first, first + prompt_len)), SamplingParams(), lambda e: None), 0, None)


def prefill_all(sched: Scheduler):
    """One step that prefills everything admitted; the 'model' then appends one token per prompt."""
    out = sched.schedule()
    for chunk in out.prefill:
        if chunk.ends_prompt:
            chunk.seq.tokens.append(0)
    return out


def decode(out):
    for s in out.decode:
        s.tokens.append(0)


# ---- the scheduler alone (block counts, no tensors; blocks of 4 positions) -------------------------
def test_a_prompt_is_admitted_only_when_it_fits_whole():
    sched = Scheduler(max_seqs=8, num_blocks=7, block_size=4)
    a, b, c = seq("a", 12), seq("b", 12), seq("c", 12)
    for s in (a, b, c):
        sched.add(s)
    out = prefill_all(sched)
    assert out.admitted == [a, b]  # 3 blocks each, 6 of 7; c (3 blocks) would not fit
    assert c.status is SeqStatus.WAITING and [ch.seq for ch in out.prefill] == [a, b]
    assert len(a.block_table) == len(b.block_table) == 3 and not set(a.block_table) & set(b.block_table)


def test_newest_running_sequences_are_preempted_and_requeued_first():
    sched = Scheduler(max_seqs=8, num_blocks=7, block_size=4, prefix_caching=False)
    a, b, w = seq("a", 12), seq("b", 12), seq("w", 1)
    sched.add(a)
    sched.add(b)
    prefill_all(sched)  # a, b hold 3 full blocks each and 13 tokens: each needs a 4th; 1 is free
    sched.add(w)
    out = sched.schedule()  # 2 new blocks needed, 1 free: b (newest) goes
    assert out.preempted == [b] and out.decode == [a] and out.freed == [1]  # b's slot goes back
    assert b.status is SeqStatus.WAITING and b.num_cached == 0 and b.slot is None and b.block_table == []
    assert len(a.block_table) == 4 and sched.cache.num_free == 3  # b's 3 blocks are free again
    assert list(sched.waiting) == [b, w]  # the preempted sequence is first in line
    assert not out.admitted  # nothing is admitted in a step that preempted
    assert sched.num_preemptions == 1


def test_the_oldest_sequence_is_never_preempted():
    sched = Scheduler(max_seqs=8, num_blocks=5, block_size=4)
    a = seq("a", 19)
    sched.add(a)
    out = prefill_all(sched)
    assert out.admitted == [a]
    out = sched.schedule()  # 20 tokens in 5 blocks: fits; the engine caps max_len at capacity
    assert out.decode == [a] and not out.preempted


def test_a_recomputed_sequence_prefills_its_output_too():
    sched = Scheduler(max_seqs=8, num_blocks=7, block_size=4, prefix_caching=False)
    a, b = seq("a", 12), seq("b", 12)
    sched.add(a)
    sched.add(b)
    prefill_all(sched)
    out = sched.schedule()
    assert out.preempted == [b]
    decode(out)
    a.finish("length")
    assert sched.drop(a) == 0  # a finishes: slot 0 is free again
    out = sched.schedule()
    assert out.admitted == [b] and out.prefill == [PrefillChunk(b, 0, 13)]  # 12 prompt + 1 generated token
    assert b.slot == 0 and sched.cache.num_used == 4


def test_a_preempted_sequence_is_readmitted_from_its_own_cached_blocks():
    sched = Scheduler(max_seqs=8, num_blocks=7, block_size=4)
    a, b = seq("a", 12), seq("b", 12)
    sched.add(a)
    sched.add(b)
    prefill_all(sched)
    out = sched.schedule()
    assert out.preempted == [b] and sched.cache.num_cached_free == 3  # b's computed blocks stay cached
    decode(out)
    a.finish("length")
    sched.drop(a)
    out = sched.schedule()
    # its prompt's 3 blocks come back from the cache: only its generated token is left, a decode row
    assert out.admitted == [b] and not out.prefill and out.decode == [b] and b.cached_prompt_tokens == 0


# ---- the engine on a tiny model ---------------------------------------------------------------------
def test_preempted_sequences_recompute_to_the_same_greedy_output(tiny_mistral, caplog):
    pipe = load_safetensors_dir(tiny_mistral, ModelSpec(model_id=str(tiny_mistral)), torch.device("cpu"), torch.float32)
    c = pipe.config
    per_token = CacheShape(c.num_layers, c.num_kv_heads, c.head_dim).bytes_per_token(torch.float32)
    prompts = [list(range(10 + 7 * i, 30 + 7 * i)) for i in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    ref = tokens_alone(pipe, prompts, params)
    # 4 sequences of 40 tokens need 160; the cache holds 64 (and serves at most 64-token contexts)
    tight = make_engine(pipe, max_seqs=4, prefill_chunk=16, kv_cache_mb=64 * per_token / 2**20)
    try:
        assert tight.scheduler.cache.num_blocks * tight.scheduler.cache.block_size == 64 and tight.max_len == 64
        assert "contexts are served up to 64 tokens (the model's: 256)" in caplog.text
        got = [col.tokens() for col in run(tight, prompts, [params] * 4)]
        snap = tight.snapshot()
    finally:
        tight.stop()
    assert all(len(t) == 20 for t in ref)
    assert got == ref
    assert snap["preempted"] > 0 and snap["kv_blocks_in_use"] == 0 and snap["errors"] == 0


def test_too_small_a_budget_is_a_clear_error(tiny_mistral):
    pipe = load_safetensors_dir(tiny_mistral, ModelSpec(model_id=str(tiny_mistral)), torch.device("cpu"), torch.float32)
    try:
        Engine(pipe, max_seqs=2, kv_cache_mb=0.0001)
    except RuntimeError as e:
        assert "--kv-cache-mb" in str(e)
    else:
        raise AssertionError("a budget below 16 tokens was accepted")


# ---- memory -----------------------------------------------------------------------------------------
def test_release_pages_zeroes_whole_pages_and_keeps_the_edges():
    t = torch.ones(3 * 1024 * 1024 + 7, dtype=torch.float32)  # not page-sized: both edges are partial pages
    inner = t[5 : t.numel() - 5]
    assert release_pages(inner)
    assert t[:5].eq(1).all() and t[-5:].eq(1).all()
    zeros = int(inner.eq(0).sum())
    assert zeros > inner.numel() - 2 * 4096  # everything but the two partial pages reads as zero now


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_freed_blocks_give_their_memory_back():
    shape = CacheShape(num_layers=2, num_kv_heads=4, head_dim=64)  # 4 KiB a position in float32
    pool = KVCachePool(shape, num_blocks=32, block_size=1024, dtype=torch.float32, device=torch.device("cpu"))
    assert pool.bytes_per_block() == 4 * 2**20 and pool.buffer[3].is_contiguous()
    assert pool.buffer.data_ptr() % 4096 == 0  # blocks of whole pages: released whole
    blocks = list(range(4, 20))
    before = rss_bytes()
    pool.zero_blocks(blocks)
    for b in blocks:
        for t in (*pool.k, *pool.v):
            t[b].fill_(1.0)  # as sequences of 16k tokens would
    used = rss_bytes() - before
    assert used > 0.9 * 16 * 4 * 2**20  # 16 blocks of 4 MiB were touched
    pool.release_blocks(blocks)
    assert rss_bytes() - before < 0.1 * used
    assert pool.buffer[4:20].abs().sum() == 0  # released pages read as zero


def test_the_cpu_pool_owns_its_storage_from_offset_zero():
    # torch.compile sizes a view's storage from its base: a pool aligned by a storage offset into a
    # larger allocation failed to compile whenever the allocator's address needed that offset
    shape = CacheShape(num_layers=2, num_kv_heads=2, head_dim=16)
    for _ in range(8):  # different addresses
        pool = KVCachePool(shape, num_blocks=128, block_size=16, dtype=torch.float32, device=torch.device("cpu"))
        buf = pool.buffer
        assert buf.storage_offset() == 0 and buf.data_ptr() % 4096 == 0
        assert buf.untyped_storage().nbytes() == buf.numel() * buf.element_size()


def test_a_block_handed_out_again_is_zeroed():
    shape = CacheShape(num_layers=1, num_kv_heads=1, head_dim=4)
    pool = KVCachePool(shape, num_blocks=4, block_size=2, dtype=torch.float32, device=torch.device("cpu"))
    pool.buffer.fill_(float("nan"))  # stale memory
    pool.zero_blocks([2])
    assert pool.buffer[2].eq(0).all() and pool.buffer[1].isnan().all()


# ---- the pool plan (arithmetic only: no device needed) --------------------------------------------
def test_the_plan_sizes_the_pool_from_the_budget():
    shape = CacheShape(num_layers=32, num_kv_heads=8, head_dim=128)  # 128 KiB a token in bf16 (Mistral 7B)
    cuda = torch.device("cuda")
    plan = plan_pool(shape, torch.bfloat16, cuda, max_seqs=16, max_len=32768, kv_cache_mb=8192)  # 65,536 tokens
    assert (plan.num_blocks, plan.block_size, plan.capacity_tokens) == (4096, 16, 65536)
    plan = plan_pool(shape, torch.bfloat16, cuda, max_seqs=16, max_len=32768, kv_cache_mb=1024, block_size=32)
    assert (plan.num_blocks, plan.capacity_tokens) == (256, 8192)
    cpu = plan_pool(shape, torch.bfloat16, torch.device("cpu"), max_seqs=16, max_len=32768, kv_cache_mb=1024)
    assert cpu.capacity_tokens == 8192  # the budget, as on a GPU (the pages are mapped as used)
    # without a budget the CPU pool holds every sequence's whole context (it is virtual) and a prefix
    # cache of 4x the weights (here 64 KiB: 32 blocks of 16 tokens of 128 bytes), or 1 GiB if that is less
    cpu = plan_pool(
        CacheShape(2, 1, 8), torch.float32, torch.device("cpu"), max_seqs=4, max_len=1000, weights_bytes=16 << 10
    )
    assert (cpu.num_blocks, cpu.retain_blocks) == (4 * 63 + 32, 32)
    cpu = plan_pool(
        CacheShape(2, 1, 8), torch.float32, torch.device("cpu"), max_seqs=4, max_len=1000, weights_bytes=1 << 40
    )
    assert cpu.retain_blocks == (1 << 30) // (128 * 16)
