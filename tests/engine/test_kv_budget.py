"""--kv-cache-mb: admission by budget, recompute preemption, page release, and the GPU sizing plan."""

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
    return Sequence(Request(rid, list(range(prompt_len)), SamplingParams(), lambda e: None), 0, None)


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


# ---- the scheduler alone (token counts, no tensors) -----------------------------------------------
def test_a_prompt_is_admitted_only_when_it_fits_whole():
    sched = Scheduler(max_seqs=8, capacity_tokens=30)
    a, b, c = seq("a", 12), seq("b", 12), seq("c", 12)
    for s in (a, b, c):
        sched.add(s)
    out = prefill_all(sched)
    assert out.admitted == [a, b]  # 24 of 30 tokens promised; c (12) would not fit
    assert c.status is SeqStatus.WAITING and [ch.seq for ch in out.prefill] == [a, b]


def test_newest_running_sequences_are_preempted_and_requeued_first():
    sched = Scheduler(max_seqs=8, capacity_tokens=26)
    a, b, w = seq("a", 12), seq("b", 12), seq("w", 1)
    sched.add(a)
    sched.add(b)
    prefill_all(sched)  # a, b hold 12 each; 2 tokens left
    sched.add(w)
    out = sched.schedule()
    assert out.decode == [a, b] and not out.preempted and not out.admitted  # 24 + 2 == 26 fits
    decode(out)
    out = sched.schedule()  # 26 held, both need one more: b (newest) goes
    assert out.preempted == [b] and out.decode == [a] and out.freed == [1]  # b's slot goes back
    assert b.status is SeqStatus.WAITING and b.num_cached == 0 and b.slot is None
    assert list(sched.waiting) == [b, w]  # the preempted sequence is first in line
    assert not out.admitted  # nothing is admitted in a step that preempted
    assert sched.num_preemptions == 1


def test_the_oldest_sequence_is_never_preempted():
    sched = Scheduler(max_seqs=8, capacity_tokens=20)
    a = seq("a", 19)
    sched.add(a)
    out = prefill_all(sched)
    assert out.admitted == [a]
    out = sched.schedule()  # 19 held + 1 == 20: fits; the engine caps max_len at capacity
    assert out.decode == [a] and not out.preempted


def test_a_recomputed_sequence_prefills_its_output_too():
    sched = Scheduler(max_seqs=8, capacity_tokens=26)
    a, b = seq("a", 12), seq("b", 12)
    sched.add(a)
    sched.add(b)
    prefill_all(sched)
    decode(sched.schedule())
    out = sched.schedule()
    assert out.preempted == [b]
    decode(out)
    a.finish("length")
    assert sched.drop(a) == 0  # a finishes: slot 0 is free again
    out = sched.schedule()
    assert out.admitted == [b] and out.prefill == [PrefillChunk(b, 0, 14)]  # 12 prompt + 2 generated tokens
    assert b.slot == 0 and sched.cache.num_used == 1


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
        assert tight.scheduler.cache.capacity_tokens == 64 and tight.max_len == 64
        assert "contexts are served up to 64 tokens (the model's: 256)" in caplog.text
        got = [col.tokens() for col in run(tight, prompts, [params] * 4)]
        snap = tight.snapshot()
    finally:
        tight.stop()
    assert all(len(t) == 20 for t in ref)
    assert got == ref
    assert snap["preempted"] > 0 and snap["kv_slots_in_use"] == 0 and snap["errors"] == 0


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


def test_a_freed_slot_gives_its_memory_back():
    shape = CacheShape(num_layers=2, num_kv_heads=4, head_dim=64)
    pool = KVCachePool(shape, num_slots=2, max_len=32768, dtype=torch.float32, device=torch.device("cpu"))
    slot = 1
    before = rss_bytes()
    pool.build_view([(slot, 0)], [], None, [])
    for t in (*pool.k, *pool.v):
        t[slot].fill_(1.0)  # as a sequence of 32k tokens would
    used = rss_bytes() - before
    assert used > 0.9 * 4 * 32768 * 4 * 64 * 4  # 4 tensors of 32 MiB each were touched
    pool.release(slot)
    assert rss_bytes() - before < 0.1 * used
    # the next sequence in the slot reads zeros, never the old keys (the slot's edge pages keep theirs)
    pool.build_view([(slot, 0)], [], None, [])
    for t in (*pool.k, *pool.v):
        assert t[slot, :, :256].abs().sum() == 0


# ---- the GPU plan (arithmetic only: no device needed) ---------------------------------------------
def test_gpu_plan_fits_the_budget_with_fewer_or_shorter_slots():
    shape = CacheShape(num_layers=32, num_kv_heads=8, head_dim=128)  # 128 KiB a token in bf16 (Mistral 7B)
    cuda = torch.device("cuda")
    plan = plan_pool(shape, torch.bfloat16, cuda, max_seqs=16, max_len=32768, kv_cache_mb=8192)  # 65,536 tokens
    assert (plan.slots, plan.slot_len, plan.capacity_tokens) == (2, 32768, 65536)
    plan = plan_pool(shape, torch.bfloat16, cuda, max_seqs=16, max_len=32768, kv_cache_mb=1024)  # 8,192 tokens
    assert (plan.slots, plan.slot_len, plan.capacity_tokens) == (1, 8192, 8192)
    cpu = plan_pool(shape, torch.bfloat16, torch.device("cpu"), max_seqs=16, max_len=32768, kv_cache_mb=1024)
    assert (cpu.slots, cpu.slot_len, cpu.capacity_tokens) == (16, 32768, 8192)  # virtual slots, budgeted tokens
