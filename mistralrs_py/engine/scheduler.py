"""Which sequences run in the next step. Moves sequences between queues; never touches tensors.

Policies:
- "continuous": every running sequence decodes every step, whatever its length, and prompt chunks
  of newly admitted sequences join the same step (up to `prefill_chunk` prompt tokens a step).
- "catch-up" (the seed's method): prompts are processed in steps of their own; then only the
  shortest running sequences decode, and longer ones wait until the shortest catch up, so every
  decode batch holds sequences of one length.

The cache budget (`capacity_tokens`, from --kv-cache-mb) is counted here in tokens: a waiting
sequence is admitted only when its whole prompt fits beside what running sequences hold and have
been promised, and when the running sequences' next tokens do not fit, the newest are preempted:
their cache is dropped and they wait at the head of the queue to be recomputed (prompt and output
so far, as one prompt), as vLLM's recompute preemption.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .sequence import Sequence, SeqStatus

POLICIES = ("continuous", "catch-up")


@dataclass
class SchedulerOutput:
    admitted: list[Sequence] = field(default_factory=list)  # need a cache slot before the step runs
    decode: list[Sequence] = field(default_factory=list)
    prefill: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, prompt tokens this step)
    copies: list[tuple[Sequence, Sequence, int]] = field(default_factory=list)  # (from, to, positions) before the step
    preempted: list[Sequence] = field(default_factory=list)  # lost their cache slot; wait to be recomputed

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, max_seqs: int, policy: str = "continuous", prefill_chunk: int = 512,
                 capacity_tokens: int | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {policy!r}; choose one of {', '.join(POLICIES)}")
        self.max_seqs, self.policy, self.prefill_chunk = max_seqs, policy, max(1, prefill_chunk)
        self.capacity_tokens = capacity_tokens if capacity_tokens is not None else 2**62
        self.num_preemptions = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence from whichever queue holds it."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def sequences_of(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.request.id == request_id]

    def schedule(self, free_slots: int) -> SchedulerOutput:
        out = SchedulerOutput()
        free_tokens = self.capacity_tokens - sum(s.num_cached for s in self.running)
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
        while (self.waiting and not out.preempted and len(self.running) < self.max_seqs and free_slots > 0
               and self.waiting[0].num_uncached + promised <= free_tokens):
            seq = self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.admitted.append(seq)
            promised += seq.num_uncached
            free_slots -= 1
        # 3. prompt chunks, up to --prefill-chunk tokens a step and what the cache has left
        budget = min(self.prefill_chunk, free_tokens)
        for seq in self.running:
            if seq.share_from is not None and seq.num_cached == 0 and not self._share(seq, out):
                continue  # waits for its sibling's prompt
            if seq.num_uncached > 1 and budget > 0:
                # NOTE: only a chunk that reaches the end of the prompt yields logits (those of the
                # first output token); earlier chunks just fill the cache.
                n = min(seq.num_uncached, budget)
                out.prefill.append((seq, n))
                budget -= n
        ready = [s for s in self.running if s.num_uncached == 1]
        if not ready and not out.prefill and len(self.running) > 1 and not out.copies:
            # NOTE: every running sequence waits for cache room that only a preemption can make.
            self._preempt(self.running.pop(), out)
        if self.policy == "catch-up":
            if out.prefill:
                return out  # prompts run in steps of their own
            if ready:
                shortest = min(len(s.tokens) for s in ready)
                ready = [s for s in ready if len(s.tokens) == shortest]
        out.decode = sorted(ready, key=lambda s: s.slot if s.slot is not None else -1)
        return out

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        """Drops a running sequence's cache; it goes back to the head of the queue with its tokens
        (prompt and output so far), which are prefilled again when it is readmitted."""
        seq.status = SeqStatus.WAITING
        seq.num_cached = 0
        seq.share_from = None
        seq.num_preemptions += 1
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
        out.copies.append((src, seq, n))
        seq.num_cached, seq.share_from = n, None
        return True
