"""The KV cache: a pool of fixed-size blocks, and the batch view of a step.

A block holds `block_size` consecutive positions of one sequence, for every layer and stream; a
sequence's keys are found through its block table. Which block belongs to whom is decided by the
scheduler's BlockManager (engine/block_manager.py); this module holds the tensors: one buffer
[blocks, streams, layers, 2, Hk, block_size, hd], so that a block is one contiguous run of memory
(zeroed in one call when handed out, its pages handed back to the OS in one call when freed on the
CPU), and per-layer views k[i], v[i]: [blocks, Hk, block_size, hd] of it.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import os
from dataclasses import dataclass

import torch

from ..models.layers import BatchView, PrefillSegment, decode_mask, prefill_mask

log = logging.getLogger("mistralrs.engine")

# NOTE: measured on the CPU (AVX2, 2 threads, the embedded model): 16 and 32 decode at the same
# speed at 1 and 16 streams; 16 halves what a partial last block wastes and what a prefix hit
# leaves to recompute.
DEFAULT_BLOCK_SIZE = 16


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PoolPlan:
    """`num_blocks` blocks of `block_size` positions (what the scheduler hands out); at most
    `retain_blocks` of them stay cached once freed (the prefix cache; None: all of them)."""

    num_blocks: int
    block_size: int
    retain_blocks: int | None = None

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size


# NOTE: the CPU's default prefix cache: what freed blocks may keep resident for later prompts
PREFIX_CACHE_BYTES = 1 << 30
PREFIX_CACHE_MODELS = 4


def plan_pool(
    shape: CacheShape,
    dtype: torch.dtype,
    device: torch.device,
    max_seqs: int,
    max_len: int,
    streams: int = 1,
    kv_cache_mb: float | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    weights_bytes: int = 0,
) -> PoolPlan:
    """Sizes the pool from `--kv-cache-mb`, or by default from the memory the device has left.

    NOTE: on the CPU the pool is virtual (pages are mapped on first write and handed back when a
    block is freed), so by default it holds every sequence's whole context plus a bounded prefix
    cache (PREFIX_CACHE_BYTES, or PREFIX_CACHE_MODELS times the weights if that is less): its
    resident size follows the blocks in use and never passes that sum, which the ready line prints.
    On a GPU it is allocated up front: the budget is its size, and all of it may cache prefixes."""
    per_token = shape.bytes_per_token(dtype) * streams
    if kv_cache_mb is not None:
        budget = round(kv_cache_mb * 2**20)
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # NOTE: like vLLM's gpu_memory_utilization: 90% of what is free once the weights are loaded,
        # less room for the activations and logits of a prefill chunk.
        budget = int(free * 0.9) - 512 * 2**20
    else:
        budget = _cpu_available_bytes() // 2
    blocks = max(0, budget // (per_token * block_size))
    if blocks * block_size < 16:
        raise RuntimeError(
            f"a KV cache of {budget / 2**20:.1f} MiB holds {blocks * block_size} tokens of this model "
            f"({per_token / 1024:.0f} KiB each); raise --kv-cache-mb"
        )
    if kv_cache_mb is None and device.type != "cuda":
        prefix_bytes = min(PREFIX_CACHE_BYTES, PREFIX_CACHE_MODELS * weights_bytes or PREFIX_CACHE_BYTES)
        prefix = prefix_bytes // (per_token * block_size)
        blocks = min(blocks, max_seqs * -(-max_len // block_size) + prefix)
        return PoolPlan(blocks, block_size, min(prefix, blocks))
    return PoolPlan(blocks, block_size)


def _cpu_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int), ctypes.c_int
    return fn


_MADVISE = _madvise() if hasattr(mmap, "MADV_DONTNEED") else None


def release_pages(t: torch.Tensor) -> bool:
    """Hands the whole pages inside a contiguous CPU tensor back to the OS (they read as zero after).

    NOTE: only pages entirely inside the tensor are released, so neighbouring data and the
    allocator's own headers are never touched; the partial pages at both ends keep their bytes."""
    if _MADVISE is None or t.device.type != "cpu" or not t.is_contiguous():
        return False
    page = mmap.PAGESIZE
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    a, b = -(-start // page) * page, end // page * page
    return b > a and _MADVISE(a, b - a, mmap.MADV_DONTNEED) == 0


def _page_aligned(dims: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zero-filled CPU tensor on anonymous mapped memory: it starts on a page boundary (a block
    whose size is a whole number of pages hands all of its pages back when released) and its pages
    become resident only when written.

    NOTE: the tensor owns its whole storage at offset 0. A view into a larger allocation (aligning
    by a storage offset) made torch.compile's fake tensors size the storage by the view and fail
    whenever the allocator's address needed an offset; and set_ rather than .view() so that the
    result is not a view of a flat tensor either (torch.compile then takes it, and the per-layer
    views of it, as an input of its own shape)."""
    size = torch.empty((), dtype=dtype).element_size()
    numel = math.prod(dims)
    # NOTE: private, not mmap's default shared mapping: MADV_DONTNEED on shared anonymous memory
    # keeps the pages (and their bytes) in the page cache
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)
    memory = mmap.mmap(-1, numel * size, **({"flags": flags} if flags else {}))
    storage = torch.frombuffer(memory, dtype=dtype, count=numel).untyped_storage()  # keeps `memory` alive
    return torch.empty(0, dtype=dtype).set_(storage, 0, dims)


class KVStream:
    """Per-layer cache views k[i], v[i]: [blocks, Hk, block_size, hd] (what the model reads and writes)."""

    def __init__(self, k: list[torch.Tensor], v: list[torch.Tensor]):
        self.k, self.v = k, v


class KVCachePool(KVStream):
    """Stream 0 is the pool itself (`pool.k`, `pool.v`); `pool.streams[i]` are further streams that
    share each block (X-LoRA keeps its scaling pass's cache in stream 1). The last block is a
    scratch block that no sequence owns: padding rows of bucketed batches (CUDA graphs, --compile)
    write there."""

    def __init__(
        self,
        shape: CacheShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        streams: int = 1,
        num_slots: int = 1,
    ):
        # NOTE: num_slots: how many sequences run at once (pipelines size per-sequence state by it)
        self.shape, self.num_blocks, self.block_size, self.num_slots = shape, num_blocks, block_size, num_slots
        self.dtype, self.device = dtype, torch.device(device)
        self.scratch_block = num_blocks
        dims = (num_blocks + 1, streams, shape.num_layers, 2, shape.num_kv_heads, block_size, shape.head_dim)
        # NOTE: on the CPU torch.empty maps pages without touching them: resident memory follows the
        # blocks written. Blocks are zeroed when handed out to a model that reads whole blocks
        # (zero_blocks); on a GPU all at once here.
        if self.device.type == "cuda":
            self.buffer = torch.zeros(dims, dtype=dtype, device=self.device)
        else:
            self.buffer = _page_aligned(dims, dtype)
        self.buffer[num_blocks].zero_()
        layers = range(shape.num_layers)
        self.streams: list[KVStream] = []
        for s in range(streams):
            k = [self.buffer[:, s, i, 0] for i in layers]
            v = [self.buffer[:, s, i, 1] for i in layers]
            self.streams.append(self if s == 0 else KVStream(k, v))
            if s == 0:
                super().__init__(k, v)
        self._slot_blocks = None  # identity tables (for_pipeline)
        self._unzeroed: set[int] = set()

    @classmethod
    def for_pipeline(cls, pipe, slots: int, block_size: int = DEFAULT_BLOCK_SIZE, **kw) -> "KVCachePool":
        """A pool shaped for `pipe`'s model with room for `slots` sequences of its whole context, slot s
        owning blocks [s * M, (s + 1) * M): for callers that run sequences without a scheduler
        (perplexity, tests), through build_view's slot tables."""
        c = pipe.held_config  # NOTE: the heads this process holds (tensor parallelism: its share)
        shape = CacheShape(c.num_layers, c.num_kv_heads, c.head_dim)
        kw.setdefault("streams", pipe.cache_streams)
        per_slot = -(-pipe.max_model_len // block_size)
        pool = cls(shape, slots * per_slot, block_size, pipe.dtype, pipe.device, num_slots=slots, **kw)
        pool._slot_blocks = per_slot
        pool._unzeroed = set(range(slots * per_slot))  # NOTE: zeroed when a view first reaches them
        return pool

    @property
    def max_len(self) -> int:
        return self.num_blocks * self.block_size

    def slot_table(self, slot: int) -> list[int]:
        if self._slot_blocks is None:
            raise ValueError("this pool has no slot tables: pass the block tables (tables=)")
        return list(range(slot * self._slot_blocks, (slot + 1) * self._slot_blocks))

    # ---- blocks ------------------------------------------------------------------------------
    def zero_blocks(self, blocks) -> None:
        """Blocks handed to a sequence: attention reads whole blocks (masking the positions not yet
        written), and masked keys still enter as 0 * value, so stale memory must be finite."""
        blocks = list(blocks)
        if blocks:
            idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
            self.buffer.index_fill_(0, idx, 0)

    def release_blocks(self, blocks) -> None:
        """Freed blocks that leave the cache: on the CPU their pages go back to the OS, so resident
        memory follows the blocks in use and cached (what --kv-cache-mb budgets)."""
        if self.device.type != "cpu":
            return
        for b in blocks:
            release_pages(self.buffer[b])

    def bytes_per_block(self) -> int:
        return self.buffer[0].numel() * self.buffer.element_size()

    def bytes_in_use(self, blocks: int) -> int:
        return blocks * self.bytes_per_block()

    # ---- batch views ------------------------------------------------------------------------
    def build_view(
        self,
        decode: list[tuple[int, int]],
        prefill: list[tuple[int, int, int]],
        window: int | None,
        want_prefill_logits: list[bool | str],
        tables: dict[int, list[int]] | None = None,
    ) -> BatchView:
        """decode: (slot, position) per decoding sequence; prefill: (slot, start_pos, n) per chunk;
        tables: each slot's block table (default: the pool's slot tables, see for_pipeline).

        Logits are wanted for every decode row and for the last row of each prefill chunk whose
        flag in `want_prefill_logits` is set (the chunk that ends the prompt), or for every row of
        a chunk whose flag is "all" (a prompt whose logprobs are asked for)."""
        dev, bs = self.device, self.block_size
        table = tables.__getitem__ if tables is not None else self.slot_table
        positions: list[int] = [p for _, p in decode]
        row_slots: list[int] = [s for s, _ in decode]
        write_blocks: list[int] = [table(s)[p // bs] for s, p in decode]
        logit_rows: list[int] = list(range(len(decode)))
        segments: list[PrefillSegment] = []
        row = len(decode)
        for (slot, start, n), want in zip(prefill, want_prefill_logits):
            t = table(slot)
            positions.extend(range(start, start + n))
            row_slots.extend([slot] * n)
            write_blocks.extend(t[p // bs] for p in range(start, start + n))
            blocks = torch.tensor(t[: -(-(start + n) // bs)], dtype=torch.long, device=dev)
            segments.append(PrefillSegment(row, row + n, slot, start, prefill_mask(start, n, window, dev), blocks))
            row += n
            if want == "all":
                logit_rows.extend(range(row - n, row))
            elif want:
                logit_rows.append(row - 1)
        fields: dict = {}
        if decode:
            lengths = [p + 1 for _, p in decode]
            L = max(lengths)
            T = -(-L // bs)
            # NOTE: rows shorter than the longest read the scratch block past their own blocks
            # (masked); the fused CPU op reads only a row's own
            rows = [(table(s)[: -(-(p + 1) // bs)] + [self.scratch_block] * T)[:T] for s, p in decode]
            fields.update(
                num_decode=len(decode),
                decode_len=L,
                decode_slots=torch.tensor(row_slots[: len(decode)], dtype=torch.long, device=dev),
                decode_tables=torch.tensor(rows, dtype=torch.long, device=dev),
            )
            if len(decode) == 1:
                # NOTE: one sequence needs no mask: it reads exactly its own keys (the last W of
                # them under a sliding window), which also lets attention take its unmasked path.
                fields["decode_start"] = max(0, L - window) if window else 0
            else:
                fields["decode_mask"] = decode_mask(torch.tensor(lengths, device=dev), T * bs, window)
        if tables is None and self._unzeroed:
            reached = {
                b for s, p in [*decode, *((s, a + n - 1) for s, a, n in prefill)] for b in table(s)[: p // bs + 1]
            }
            self.zero_blocks(reached & self._unzeroed)
            self._unzeroed -= reached
        pos = torch.tensor(positions, dtype=torch.long, device=dev)
        return BatchView(
            positions=pos,
            row_slots=torch.tensor(row_slots, dtype=torch.long, device=dev),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            write_blocks=torch.tensor(write_blocks, dtype=torch.long, device=dev),
            write_offsets=pos % bs,
            block_size=bs,
            prefills=segments,
            window=window,
            scratch_block=self.scratch_block,
            **fields,
        )
