"""Who holds which KV cache blocks, and which blocks hold a cached prefix. No tensors.

The cache is a pool of fixed-size blocks (`block_size` positions each); a sequence's keys live in
the blocks of its block table, in order. The scheduler owns one BlockManager (vLLM's and
nano-vllm's shape) and is the only code that allocates, shares and frees blocks; the model runner
applies what it decided to the tensors (engine/kv_cache.py).

Automatic prefix caching: a full block whose keys are computed is identified by a hash chained over
every token before it (blake2b of the previous block's hash and its own tokens, and a salt for
whatever else changes the keys). A new sequence reuses the longest chain of cached blocks that
starts its tokens, shared by reference count with the sequences still using them; a freed block
keeps its hash and stays cached (evictable) until a new block is needed, least recently used first.
A block is only ever written by the one sequence that allocated it, before it is full and hashed;
blocks that are hashed never change.

Each sequence also holds a slot: a small integer (< max_seqs) under which pipelines keep
per-sequence state (X-LoRA's scalings).
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from .sequence import Sequence


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up in the cache (once per request)
    hits: int = 0  # of those, tokens found cached


def block_hash(parent: bytes | None, tokens, salt: bytes = b"") -> bytes:
    """The identity of a full block: its tokens, everything before them (the parent's hash) and `salt`."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    h.update(salt)
    return h.digest()


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        num_slots: int,
        prefix_caching: bool = True,
        retain_blocks: int | None = None,
        salt: bytes = b"",
        cache_decoded: bool = True,
    ):
        """`retain_blocks`: how many freed blocks may stay cached (None: all of them); beyond it the
        least recently used are forgotten and their pages handed back (see `take_released`).
        `cache_decoded`: whether blocks holding generated tokens are cached too (False when a
        pipeline computes different keys for a token in a decode step than in a prompt)."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a KV cache needs at least one block of at least one position")
        self.num_blocks, self.block_size, self.num_slots = num_blocks, block_size, num_slots
        self.prefix_caching, self.salt, self.cache_decoded = prefix_caching, salt, cache_decoded
        self.retain_blocks = num_blocks if retain_blocks is None else retain_blocks
        self.ref = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # hash -> block holding it
        # NOTE: free blocks with nothing worth keeping: a stack, so recently freed (resident) pages
        # are reused first
        self._clean: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached: oldest first
        self._released: list[int] = []  # blocks whose pages may be handed back (the runner's job)
        self._fresh: list[int] = []  # blocks handed out since the runner last zeroed them
        self._slots = list(range(num_slots))  # a heap: the lowest free slot first
        self.num_seqs = 0
        self.stats = PrefixCacheStats()

    # ---- counts ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks a sequence can be given: never used, freed, or cached but unused (evictable)."""
        return len(self._clean) + len(self._evictable)

    @property
    def num_cached_free(self) -> int:
        return len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_free_slots(self) -> int:
        return len(self._slots)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # ---- slots -------------------------------------------------------------------------------
    def take_slot(self, seq: Sequence) -> int:
        if not self._slots:
            raise RuntimeError("no free sequence slot (the scheduler admitted past --max-seqs)")
        seq.slot = heapq.heappop(self._slots)
        self.num_seqs += 1
        return seq.slot

    # ---- prefix cache ------------------------------------------------------------------------
    def hashes(self, seq: Sequence, upto: int) -> list[bytes]:
        """The chained hashes of the sequence's full blocks within its first `upto` tokens (kept on
        the sequence and extended as it grows: its tokens before `upto` never change)."""
        have, bs = seq.block_hashes, self.block_size
        for i in range(len(have), upto // bs):
            have.append(block_hash(have[-1] if have else None, seq.tokens[i * bs : (i + 1) * bs], self.salt))
        return have[: upto // bs]

    def match(self, seq: Sequence) -> list[int]:
        """The cached blocks that start this sequence's tokens (the longest chain). At least its
        last token is left to compute, which gives the logits of the next one."""
        if not self.prefix_caching or seq.wants_prompt_logprobs:
            return []  # NOTE: prompt logprobs need every prompt row computed
        out = []
        for h in self.hashes(seq, len(seq.tokens) - 1):
            b = self.cached.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def admit_cost(self, seq: Sequence, hit: list[int]) -> int:
        """Free blocks the whole of `seq`'s tokens take when admitted with `hit` shared: its new
        blocks, and the cached blocks it revives from the evictable pool."""
        revived = sum(1 for b in hit if self.ref[b] == 0)
        return self.blocks_for(len(seq.tokens)) - len(hit) + revived

    def admit(self, seq: Sequence, hit: list[int]) -> None:
        """A waiting sequence becomes running: a slot, and the `hit` blocks as its cached prefix."""
        self.take_slot(seq)
        for b in hit:
            self._take(b)
        seq.block_table = list(hit)
        seq.num_cached = len(hit) * self.block_size
        if seq.cached_prompt_tokens is None:
            # NOTE: what the client is told (usage.prompt_tokens_details.cached_tokens): the first
            # admission's, not a readmission after preemption; counted once per request (choice 0)
            seq.cached_prompt_tokens = seq.num_cached
            if seq.index == 0:
                self.stats.queries += len(seq.tokens)
                self.stats.hits += seq.num_cached

    def share(self, seq: Sequence, src: Sequence, n_blocks: int) -> None:
        """n > 1: the choice `seq` takes `src`'s first n_blocks (its prompt's) by reference."""
        assert not seq.block_table, "sharing into a sequence that holds blocks"
        seq.block_table = list(src.block_table[:n_blocks])
        for b in seq.block_table:
            self._take(b)
        seq.num_cached = n_blocks * self.block_size

    def commit(self, seq: Sequence) -> None:
        """Registers the sequence's full blocks whose keys are computed (the steps that computed
        them succeeded), so that later sequences can share them."""
        if not self.prefix_caching:
            return
        upto = seq.num_cached if self.cache_decoded else min(seq.num_cached, seq.prompt_len)
        hashes = self.hashes(seq, upto)
        for i in range(seq.num_committed, len(hashes)):
            b, h = seq.block_table[i], hashes[i]
            if self.hash_of[b] is None and h not in self.cached:
                self.hash_of[b] = h
                self.cached[h] = b
        seq.num_committed = max(seq.num_committed, len(hashes))

    # ---- allocation ------------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, tokens: int) -> int:
        """New blocks `seq` needs to hold `tokens` tokens."""
        return max(0, self.blocks_for(tokens) - len(seq.block_table))

    def grow(self, seq: Sequence, tokens: int) -> None:
        """Gives `seq` blocks until its table holds `tokens` positions (the caller checked room)."""
        while len(seq.block_table) * self.block_size < tokens:
            seq.block_table.append(self._new())

    def free(self, seq: Sequence) -> int | None:
        """Takes back the sequence's slot and blocks (its cached tokens are gone for it; the hashed
        blocks stay cached). Returns the freed slot, or None if it held none."""
        slot = seq.slot
        if slot is None:
            return None
        # NOTE: the tail first, so that a chain's last blocks are evicted before its first ones,
        # which more sequences share
        for b in reversed(seq.block_table):
            self._drop(b)
        seq.block_table, seq.num_cached, seq.num_committed, seq.slot = [], 0, 0, None
        heapq.heappush(self._slots, slot)
        self.num_seqs -= 1
        self._trim()
        return slot

    def tokens_in_use(self) -> int:
        return self.num_used * self.block_size

    # ---- the runner's side ---------------------------------------------------------------------
    def take_fresh(self) -> list[int]:
        """Blocks handed out since the last call: their stale contents must be zeroed before a step
        reads them (attention reads whole blocks, masking the positions not yet written)."""
        out, self._fresh = self._fresh, []
        return out

    def take_released(self) -> list[int]:
        """Free blocks whose memory may be handed back to the OS (they read as zero after)."""
        out, self._released = self._released, []
        return out

    # ---- internals ---------------------------------------------------------------------------
    def _take(self, b: int) -> None:
        if self.ref[b] == 0:
            del self._evictable[b]
        self.ref[b] += 1

    def _new(self) -> int:
        if self._clean:
            b = self._clean.pop()
        elif self._evictable:
            b, _ = self._evictable.popitem(last=False)  # least recently used
            self._forget(b)
        else:
            raise RuntimeError("no free KV cache block (the scheduler allocated past the budget)")
        self.ref[b] = 1
        self._fresh.append(b)
        return b

    def _drop(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] > 0:
            return
        if self.hash_of[b] is not None:
            self._evictable[b] = None  # most recently used
        else:
            self._clean.append(b)
            self._released.append(b)

    def _forget(self, b: int) -> None:
        h = self.hash_of[b]
        if h is not None:
            del self.cached[h]
            self.hash_of[b] = None

    def _trim(self) -> None:
        while len(self._evictable) > self.retain_blocks:
            b, _ = self._evictable.popitem(last=False)
            self._forget(b)
            self._clean.append(b)
            self._released.append(b)
