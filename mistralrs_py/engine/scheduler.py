"""Which sequences run in the next step, and who holds which cache blocks. Never touches tensors.

Policies:
- "continuous": every running sequence decodes every step, whatever its length, and prompt chunks
  of newly admitted sequences join the same step (up to `prefill_chunk` prompt tokens a step).
- "catch-up" (mistral.rs's original scheduling): prompts are processed in steps of their own; then
  only the shortest running sequences decode, and longer ones wait until the shortest catch up, so
  every decode batch holds sequences of one length.

The scheduler owns the cache's block manager (engine/block_manager.py): admission, allocation,
sharing, preemption and release happen here and nowhere else, and `Sequence.num_cached` changes
only here. A waiting sequence is admitted when its whole prompt fits in the free blocks (after the
prefix cache gave it what it holds already); a running sequence gets a new block when its last one
is full, and when those do not fit, the newest running sequences are preempted: their blocks go
back (those in the prefix cache stay cached) and they wait at the head of the queue to be
recomputed (prompt and output so far, as one prompt), as vLLM's recompute preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence

POLICIES = ("continuous", "catch-up")


class PrefillChunk(NamedTuple):
    seq: Sequence
    start: int  # position of the chunk's first token (the tokens before it are cached)
    n: int  # tokens in the chunk

    @property
    def ends_prompt(self) -> bool:
        """Only the chunk that reaches the end of the tokens yields logits (the next token's)."""
        return self.start + self.n == len(self.seq.tokens)


@dataclass
class SchedulerOutput:
    decode: list[Sequence] = field(default_factory=list)  # one token each, at position len(tokens) - 1
    prefill: list[PrefillChunk] = field(default_factory=list)
    admitted: list[Sequence] = field(default_factory=list)  # took a slot this step: a new sequence owns it
    preempted: list[Sequence] = field(default_factory=list)  # lost their cache; wait to be recomputed
    freed: list[int] = field(default_factory=list)  # the slots the preempted sequences held
    fresh_blocks: list[int] = field(default_factory=list)  # handed out since the last step: zero them
    released_blocks: list[int] = field(default_factory=list)  # left the cache: their pages may go back

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill

    @property
    def sampled(self) -> list[Sequence]:
        """The sequences whose logits the step returns, in row order: decode rows, then each
        prefill chunk that ends its prompt."""
        return [*self.decode, *(c.seq for c in self.prefill if c.ends_prompt)]


class Scheduler:
    def __init__(
        self,
        max_seqs: int,
        policy: str = "continuous",
        prefill_chunk: int = 512,
        *,
        num_blocks: int,
        block_size: int = 16,
        prefix_caching: bool = True,
        retain_blocks: int | None = None,
        salt: bytes = b"",
        cache_decoded: bool = True,
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.max_seqs, self.policy, self.prefill_chunk = max_seqs, policy, max(1, prefill_chunk)
        self.cache = BlockManager(
            num_blocks, block_size, max_seqs, prefix_caching, retain_blocks, salt=salt, cache_decoded=cache_decoded
        )
        self.num_preemptions = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def sequences_of(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.request.id == request_id]

    def drop(self, seq: Sequence, computed: bool = True) -> int | None:
        """A sequence ended (finished, aborted or failed): it leaves the queues and gives its blocks
        back; with `computed` (its last step succeeded) its full blocks stay in the prefix cache.
        Returns the freed slot (None if it held none)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if computed and seq.slot is not None:
            self.cache.commit(seq)
        return self.cache.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        cache = self.cache
        # NOTE: the blocks the last step filled are computed now (a step that failed ended its
        # sequences before this, uncommitted): later prompts may share them
        for seq in self.running:
            cache.commit(seq)
        # 1. the running sequences' next tokens come first: preempt the newest until their new
        # blocks fit. NOTE: the oldest is never preempted: it alone always fits, because the served
        # context (the engine's max_len) is capped at the cache's capacity.
        while len(self.running) > 1 and self._growth() > cache.num_free:
            self._preempt(self.running.pop(), out)
        for seq in self.running:
            if seq.is_decoding and cache.blocks_needed(seq, len(seq.tokens)) <= cache.num_free:
                cache.grow(seq, len(seq.tokens))
        # 2. admission, first come first served: a sequence waits until its whole prompt fits (no
        # admission in a step that preempted)
        while self.waiting and not out.preempted and len(self.running) < self.max_seqs and cache.num_free_slots:
            seq = self.waiting[0]
            hit = self._shared_prefix(seq)
            if hit is None or cache.admit_cost(seq, hit) > cache.num_free:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            cache.admit(seq, hit)
            cache.grow(seq, len(seq.tokens))
            out.admitted.append(seq)
        # 3. prompt chunks, up to --prefill-chunk tokens a step
        budget = self.prefill_chunk
        for seq in self.running:
            if seq.num_uncached and not seq.is_decoding and budget > 0:
                n = min(seq.num_uncached, budget)
                out.prefill.append(PrefillChunk(seq, seq.num_cached, n))
                budget -= n
        ready = [s for s in self.running if s.is_decoding and not cache.blocks_needed(s, len(s.tokens))]
        if self.policy == "catch-up" and out.prefill:
            ready = []  # prompts run in steps of their own
        elif self.policy == "catch-up" and ready:
            shortest = min(len(s.tokens) for s in ready)
            ready = [s for s in ready if len(s.tokens) == shortest]
        out.decode = sorted(ready, key=lambda s: s.slot)
        # NOTE: what the step will cache is counted now (vLLM v1 does the same): the step either
        # runs, or fails and ends every sequence in it (uncommitted).
        for seq in out.decode:
            seq.num_cached += 1
        for chunk in out.prefill:
            chunk.seq.num_cached += chunk.n
        out.released_blocks, out.fresh_blocks = cache.take_released(), cache.take_fresh()
        return out

    def _growth(self) -> int:
        """New blocks the decoding sequences need for their next token."""
        return sum(self.cache.blocks_needed(s, len(s.tokens)) for s in self.running if s.is_decoding)

    def _shared_prefix(self, seq: Sequence) -> list[int] | None:
        """The blocks `seq` starts with when admitted: n > 1 choices take their sibling's prompt
        blocks (None while the sibling is still computing them); otherwise the prefix cache's."""
        src, cache = seq.share_from, self.cache
        if src is not None and src.status is SeqStatus.RUNNING:
            k = (seq.prompt_len - 1) // cache.block_size
            if k > 0:
                return list(src.block_table[:k]) if src.num_cached >= k * cache.block_size else None
        seq.share_from = None  # nothing to share (finished, or preempted): the prefix cache's
        return cache.match(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drops a running sequence's blocks; it goes back to the head of the queue with its tokens
        (prompt and output so far), which are prefilled again when it is readmitted (from its own
        blocks still in the prefix cache, when they were not evicted)."""
        self.cache.commit(seq)
        out.freed.append(self.cache.free(seq))
        seq.status = SeqStatus.WAITING
        seq.share_from = None
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
