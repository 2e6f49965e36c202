"""Who holds which KV cache slot, and how many cached tokens the budget has left. No tensors.

The scheduler owns one CacheManager (nano-vllm's BlockManager shape, with one slot per sequence
where a paged cache would have a list of blocks): it is the only code that hands out and takes back
slots. The model runner applies what the scheduler decided to the tensors (engine/kv_cache.py).
"""

from __future__ import annotations

import heapq

from .sequence import Sequence


class CacheManager:
    def __init__(self, num_slots: int, capacity_tokens: int | None = None):
        self.num_slots = num_slots
        # NOTE: the budget (--kv-cache-mb) in tokens; without one, every slot may fill up.
        self.capacity_tokens = capacity_tokens if capacity_tokens is not None else 2**62
        self._free = list(range(num_slots))  # a heap: the lowest free slot is handed out first
        self._owner: dict[int, Sequence] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._owner)

    def cached_tokens(self) -> int:
        """Tokens held in the cache by the sequences that own slots."""
        # NOTE: list() copies the values in one C call, so other threads (/health) may read this
        # while the engine thread changes the dict
        return sum(s.num_cached for s in list(self._owner.values()))

    def allocate(self, seq: Sequence) -> int:
        # NOTE: lowest free slot first, so a running batch tends to be one contiguous slot range,
        # which attention reads as a view instead of gathering.
        if not self._free:
            raise RuntimeError("no free KV cache slot (the scheduler admitted past --max-seqs)")
        slot = heapq.heappop(self._free)
        self._owner[slot] = seq
        seq.slot = slot
        return slot

    def free(self, seq: Sequence) -> int | None:
        """Takes the sequence's slot back (its cached tokens are gone); the freed slot, or None."""
        slot = seq.slot
        if slot is None or self._owner.get(slot) is not seq:
            return None
        del self._owner[slot]
        heapq.heappush(self._free, slot)
        seq.slot = None
        seq.num_cached = 0
        return slot
