"""The KV cache pool: one preallocated slot per running sequence, and the batch view of a step.

Each sequence owns one slot (a row of every layer's [slots, Hk, P, hd] cache tensors) from
admission until it finishes or is aborted; which one is decided by the scheduler's CacheManager
(engine/cache_manager.py), this module only holds the tensors. A step reads and writes the slots
in place through a `BatchView`; nothing is concatenated or split per token.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
from dataclasses import dataclass

import torch

from ..models.layers import BatchView, PrefillSegment, decode_mask, prefill_mask

# NOTE: slots are zeroed lazily, this many positions at a time, the first time a step reads that far.
# Masked-out keys still enter attention as 0 * value, so never-written memory must not hold NaNs;
# zeroing on demand keeps the resident size proportional to what sequences actually used.
_ZERO_CHUNK = 256

log = logging.getLogger("mistralrs.engine")


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class PoolPlan:
    """How big the pool is: `slots` slots of `slot_len` positions, of which at most `capacity_tokens`
    hold keys at once (what the scheduler budgets; preemption keeps running sequences within it)."""

    slots: int
    slot_len: int
    capacity_tokens: int


def plan_pool(
    shape: CacheShape,
    dtype: torch.dtype,
    device: torch.device,
    max_seqs: int,
    max_len: int,
    streams: int = 1,
    kv_cache_mb: float | None = None,
) -> PoolPlan:
    """Sizes the pool from `--kv-cache-mb`, or by default from the memory the device has left.

    NOTE: on the CPU the slots are virtual (pages are mapped on first write and handed back when a
    sequence ends), so the budget is enforced by the scheduler and all `max_seqs` slots exist. On a
    GPU the slots are allocated up front, so the budget decides how many full-length slots exist,
    and when not even one fits, how long a slot (and so the served context) can be."""
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
    capacity = max(1, budget // per_token)
    if capacity < 16:
        raise RuntimeError(
            f"a KV cache of {budget / 2**20:.1f} MiB holds {capacity} tokens of this model "
            f"({per_token / 1024:.0f} KiB each); raise --kv-cache-mb"
        )
    slots, slot_len = max_seqs, max_len
    if device.type == "cuda" and slots * slot_len > capacity:
        slots = max(1, min(max_seqs, capacity // slot_len))
        slot_len = min(slot_len, capacity // slots)
        log.warning(
            "the KV cache budget (%.0f MiB) holds %d tokens: %d slot(s) of %d positions instead of "
            "%d x %d; set --kv-cache-mb, --max-seqs or --max-model-len to choose",
            budget / 2**20,
            capacity,
            slots,
            slot_len,
            max_seqs,
            max_len,
        )
    return PoolPlan(slots, slot_len, min(capacity, slots * slot_len))


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


class KVStream:
    """Per-layer cache tensors k[i], v[i]: [slots, Hk, P, hd] (what the model reads and writes)."""

    def __init__(self, shape: CacheShape, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        # NOTE: torch.empty maps pages without touching them on the CPU; see _ZERO_CHUNK.
        self.k = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.v = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]


class KVCachePool(KVStream):
    """Stream 0 is the pool itself (`pool.k`, `pool.v`); `pool.streams[i]` are further streams that
    share the slot of each sequence (X-LoRA keeps its scaling pass's cache in stream 1)."""

    def __init__(
        self,
        shape: CacheShape,
        num_slots: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
        streams: int = 1,
        capacity_tokens: int | None = None,
        scratch_slot: bool = False,
    ):
        self.shape, self.num_slots, self.max_len = shape, num_slots, max_len
        self.capacity_tokens = min(capacity_tokens or num_slots * max_len, num_slots * max_len)
        self.dtype, self.device = dtype, torch.device(device)
        # NOTE: the scratch slot (CUDA graphs) takes the keys of padding rows; no sequence owns it.
        self.scratch_slot = num_slots if scratch_slot else None
        dims = (num_slots + scratch_slot, shape.num_kv_heads, max_len, shape.head_dim)
        super().__init__(shape, dims, dtype, self.device)
        self.streams: list[KVStream] = [self, *(KVStream(shape, dims, dtype, self.device) for _ in range(streams - 1))]
        self._zeroed = [0] * (num_slots + scratch_slot)
        self._dirty: set[int] = set()  # slots written since they were last released

    @classmethod
    def for_pipeline(cls, pipe, slots: int, **kw) -> "KVCachePool":
        """A pool shaped for `pipe`'s model: `slots` slots of its whole context, its cache streams."""
        c = pipe.config
        shape = CacheShape(c.num_layers, c.num_kv_heads, c.head_dim)
        kw.setdefault("streams", pipe.cache_streams)
        return cls(shape, slots, pipe.max_model_len, pipe.dtype, pipe.device, **kw)

    # ---- slots ----------------------------------------------------------------------------
    def release(self, slot: int) -> None:
        """A slot's sequence ended (the scheduler freed the slot).

        NOTE: on the CPU its pages go back to the OS, so the resident cache follows the tokens in
        use (what --kv-cache-mb budgets), not every slot's longest sequence; they read as zero after."""
        if self.device.type != "cpu" or slot not in self._dirty:
            return
        self._dirty.discard(slot)
        for stream in self.streams:
            for t in (*stream.k, *stream.v):
                release_pages(t[slot])
        self._zeroed[slot] = 0

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copies the first n cached positions of slot `src` into slot `dst` (every stream, layer)."""
        self._dirty.add(dst)
        for stream in self.streams:
            for t in (*stream.k, *stream.v):
                t[dst, :, :n].copy_(t[src, :, :n])

    def bytes_in_use(self, tokens_in_use: int) -> int:
        return tokens_in_use * self.shape.bytes_per_token(self.dtype) * len(self.streams)

    def _ensure_zeroed(self, slots: list[int], written: list[int], upto: int) -> None:
        """Makes positions [0, upto) of each slot finite; the first `written` ones hold this sequence's keys."""
        upto = min(self.max_len, -(-upto // _ZERO_CHUNK) * _ZERO_CHUNK)
        for s, w in zip(slots, written):
            start = max(self._zeroed[s], w)
            if self._zeroed[s] < upto:
                for stream in self.streams:
                    for t in (*stream.k, *stream.v):
                        t[s, :, start:upto].zero_()
                self._zeroed[s] = upto

    def prepare_decode(self, slots: list[int], positions: list[int], upto: int) -> None:
        """For a step that reads `upto` positions of each slot (CUDA graphs' length buckets)."""
        self._dirty.update(slots)
        self._ensure_zeroed(slots, positions, upto)

    # ---- batch views ------------------------------------------------------------------------
    def build_view(
        self,
        decode: list[tuple[int, int]],
        prefill: list[tuple[int, int, int]],
        window: int | None,
        want_prefill_logits: list[bool | str],
    ) -> BatchView:
        """decode: (slot, position) per decoding sequence; prefill: (slot, start_pos, n) per chunk.

        Logits are wanted for every decode row and for the last row of each prefill chunk whose
        flag in `want_prefill_logits` is set (the chunk that ends the prompt), or for every row of
        a chunk whose flag is "all" (a prompt whose logprobs are asked for)."""
        dev = self.device
        positions: list[int] = [p for _, p in decode]
        row_slots: list[int] = [s for s, _ in decode]
        logit_rows: list[int] = list(range(len(decode)))
        segments: list[PrefillSegment] = []
        row = len(decode)
        self._dirty.update(row_slots)
        for (slot, start, n), want in zip(prefill, want_prefill_logits):
            self._dirty.add(slot)
            positions.extend(range(start, start + n))
            row_slots.extend([slot] * n)
            seg = PrefillSegment(row, row + n, slot, start, prefill_mask(start, n, window, dev))
            if seg.mask is not None:
                self._ensure_zeroed([slot], [start], start + n)
            segments.append(seg)
            row += n
            if want == "all":
                logit_rows.extend(range(row - n, row))
            elif want:
                logit_rows.append(row - 1)
        fields: dict = {}
        if decode:
            slots = [s for s, _ in decode]
            lengths = [p + 1 for _, p in decode]
            L = max(lengths)
            lo, hi = min(slots), max(slots) + 1
            contiguous = hi - lo == len(slots) and slots == sorted(slots)
            self._ensure_zeroed(slots, [p for _, p in decode], L)
            fields.update(
                num_decode=len(decode),
                decode_len=L,
                decode_slot_range=(lo, hi) if contiguous else None,
                decode_slots=torch.tensor(slots, dtype=torch.long, device=dev),
            )
            if len(decode) == 1 and contiguous:
                # NOTE: one sequence needs no mask: it reads exactly its own keys (the last W of
                # them under a sliding window), which also lets attention take its unmasked path.
                fields["decode_start"] = max(0, L - window) if window else 0
            else:
                fields["decode_mask"] = decode_mask(torch.tensor(lengths, device=dev), L, window)
        if len(decode) + len(prefill) == 1:
            fields["write_run"] = (decode[0][0], decode[0][1]) if decode else (prefill[0][0], prefill[0][1])
        # NOTE: decode rows here have distinct slots and real positions (no padding rows), what
        # the fused CPU op requires (--compile's padded views pass their scratch slot to skip).
        view = BatchView(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            row_slots=torch.tensor(row_slots, dtype=torch.long, device=dev),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            prefills=segments,
            window=window,
            **fields,
        )
        return view
