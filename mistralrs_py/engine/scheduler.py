"""Which sequences run in the next step, and who holds which cache slot. Never touches tensors.

Policies:
- "continuous": every running sequence decodes every step, whatever its length, and prompt chunks
  of newly admitted sequences join the same step (up to `prefill_chunk` prompt tokens a step).
- "catch-up" (mistral.rs's original scheduling): prompts are processed in steps of their own; then
  only the shortest running sequences decode, and longer ones wait until the shortest catch up, so
  every decode batch holds sequences of one length.

The scheduler owns the cache allocator (`CacheManager`): admission, slot allocation, preemption and
release happen here and nowhere else, and `Sequence.num_cached` changes only here. The budget
(`capacity_tokens`, from --kv-cache-mb) is counted in tokens: a waiting sequence is admitted only
when its whole prompt fits beside what running sequences hold and have been promised, and when the
running sequences' next tokens do not fit, the newest are preempted: their cache is dropped and
they wait at the head of the queue to be recomputed (prompt and output so far, as one prompt), as
vLLM's recompute preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .cache_manager import CacheManager
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
    copies: list[tuple[int, int, int]] = field(default_factory=list)  # (from slot, to slot, positions) first
    preempted: list[Sequence] = field(default_factory=list)  # lost their cache; wait to be recomputed
    freed: list[int] = field(default_factory=list)  # the slots the preempted sequences held

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
        self, max_seqs: int, policy: str = "continuous", prefill_chunk: int = 512, capacity_tokens: int | None = None
    ):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.max_seqs, self.policy, self.prefill_chunk = max_seqs, policy, max(1, prefill_chunk)
        self.cache = CacheManager(max_seqs, capacity_tokens)
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

    def drop(self, seq: Sequence) -> int | None:
        """A sequence ended (finished, aborted or failed): it leaves the queues and gives its slot
        back. Returns the freed slot (None if it held none)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        return self.cache.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        free_tokens = self.cache.capacity_tokens - self.cache.cached_tokens()
        # 1. the running sequences' next tokens come first: preempt the newest until they fit.
        # NOTE: the oldest sequence is never preempted: it alone always fits, because the served
        # context (the engine's max_len) is capped at the cache's capacity.
        growing = sum(1 for s in self.running if s.num_uncached == 1)
        while growing > free_tokens and len(self.running) > 1:
            victim = self.running.pop()
            free_tokens += victim.num_cached
            growing -= victim.num_uncached == 1
            self._preempt(victim, out)
        free_tokens -= growing
        # 2. admission, first come first served; a prompt waits until it fits whole beside the
        # prompts already admitted and not yet processed (no admission in a step that preempted).
        promised = sum(s.num_uncached for s in self.running if s.num_uncached > 1)
        while (
            self.waiting
            and not out.preempted
            and len(self.running) < self.max_seqs
            and self.cache.num_free
            and self.waiting[0].num_uncached + promised <= free_tokens
        ):
            seq = self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self.cache.allocate(seq)
            out.admitted.append(seq)
            promised += seq.num_uncached
        # 3. prompt chunks, up to --prefill-chunk tokens a step and what the cache has left
        budget = min(self.prefill_chunk, free_tokens)
        for seq in self.running:
            if seq.share_from is not None and seq.num_cached == 0 and not self._share(seq, out):
                continue  # waits for its sibling's prompt
            if seq.num_uncached > 1 and budget > 0:
                n = min(seq.num_uncached, budget)
                out.prefill.append(PrefillChunk(seq, seq.num_cached, n))
                budget -= n
        ready = [s for s in self.running if s.num_uncached == 1]
        if not ready and not out.prefill and len(self.running) > 1 and not out.copies:
            # NOTE: every running sequence waits for cache room that only a preemption can make.
            self._preempt(self.running.pop(), out)
        if self.policy == "catch-up" and out.prefill:
            ready = []  # prompts run in steps of their own
        elif self.policy == "catch-up" and ready:
            shortest = min(len(s.tokens) for s in ready)
            ready = [s for s in ready if len(s.tokens) == shortest]
        out.decode = sorted(ready, key=lambda s: s.slot)
        # NOTE: what the step will cache is counted now (vLLM v1 does the same): the step either
        # runs, or fails and ends every sequence in it.
        for seq in out.decode:
            seq.num_cached += 1
        for chunk in out.prefill:
            chunk.seq.num_cached += chunk.n
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drops a running sequence's cache; it goes back to the head of the queue with its tokens
        (prompt and output so far), which are prefilled again when it is readmitted."""
        out.freed.append(self.cache.free(seq))
        seq.status = SeqStatus.WAITING
        seq.share_from = None
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)

    def _share(self, seq: Sequence, out: SchedulerOutput) -> bool:
        """n > 1: choice i > 0 takes choice 0's cached prompt instead of prefilling it again.

        NOTE: all but the last prompt token are copied; that token then runs as a decode row, which
        gives this choice its own first-token logits. Returns False while the source is not ready."""
        src, n = seq.share_from, seq.prompt_len - 1
        if src is None or n < 1 or src.status is not SeqStatus.RUNNING:
            seq.share_from = None  # nothing to share (finished, or preempted): prefill normally
            return True
        if src.num_cached < n:
            return False
        out.copies.append((src.slot, seq.slot, n))
        seq.num_cached, seq.share_from = n, None
        return True
