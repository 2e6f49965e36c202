"""The KV cache pool: one preallocated slot per running sequence, and the batch view of a step.

Each sequence owns one slot (a row of every layer's [slots, Hk, P, hd] cache tensors) from
admission until it finishes or is aborted. A step reads and writes the slots in place through a
`BatchView`; nothing is concatenated or split per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.layers import BatchView, PrefillSegment, decode_mask, prefill_mask

# NOTE: slots are zeroed lazily, this many positions at a time, the first time a step reads that far.
# Masked-out keys still enter attention as 0 * value, so never-written memory must not hold NaNs;
# zeroing on demand keeps the resident size proportional to what sequences actually used.
_ZERO_CHUNK = 256


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=dtype).element_size()


class KVStream:
    """Per-layer cache tensors k[i], v[i]: [slots, Hk, P, hd] (what the model reads and writes)."""

    def __init__(self, shape: CacheShape, dims: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        # NOTE: torch.empty maps pages without touching them on the CPU; see _ZERO_CHUNK.
        self.k = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]
        self.v = [torch.empty(dims, dtype=dtype, device=device) for _ in range(shape.num_layers)]


class KVCachePool(KVStream):
    """Stream 0 is the pool itself (`pool.k`, `pool.v`); `pool.streams[i]` are further streams that
    share the slot of each sequence (X-LoRA keeps its scaling pass's cache in stream 1)."""

    def __init__(self, shape: CacheShape, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device,
                 streams: int = 1):
        self.shape, self.num_slots, self.max_len = shape, num_slots, max_len
        self.dtype, self.device = dtype, torch.device(device)
        dims = (num_slots, shape.num_kv_heads, max_len, shape.head_dim)
        super().__init__(shape, dims, dtype, self.device)
        self.streams: list[KVStream] = [self, *(KVStream(shape, dims, dtype, self.device) for _ in range(streams - 1))]
        self._zeroed = [0] * num_slots
        self._free = list(range(num_slots))
        self._used: set[int] = set()

    # ---- slots ----------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("KV cache pool exhausted")
        # NOTE: lowest free slot first, so a running batch tends to be one contiguous slot range,
        # which attention reads as a view instead of gathering.
        self._free.sort()
        slot = self._free.pop(0)
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot in self._used:
            self._used.remove(slot)
            self._free.append(slot)

    def copy_prefix(self, src: int, dst: int, n: int) -> None:
        """Copies the first n cached positions of slot `src` into slot `dst` (every stream, layer)."""
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

    # ---- batch views ------------------------------------------------------------------------
    def build_view(
        self,
        decode: list[tuple[int, int]],
        prefill: list[tuple[int, int, int]],
        window: int | None,
        want_prefill_logits: list[bool],
    ) -> BatchView:
        """decode: (slot, position) per decoding sequence; prefill: (slot, start_pos, n) per chunk.

        Logits are wanted for every decode row and for the last row of each prefill chunk whose
        flag in `want_prefill_logits` is set (the chunk that ends the prompt)."""
        dev = self.device
        positions: list[int] = [p for _, p in decode]
        row_slots: list[int] = [s for s, _ in decode]
        logit_rows: list[int] = list(range(len(decode)))
        segments: list[PrefillSegment] = []
        row = len(decode)
        for (slot, start, n), want in zip(prefill, want_prefill_logits):
            positions.extend(range(start, start + n))
            row_slots.extend([slot] * n)
            seg = PrefillSegment(row, row + n, slot, start, prefill_mask(start, n, window, dev))
            if seg.mask is not None:
                self._ensure_zeroed([slot], [start], start + n)
            segments.append(seg)
            row += n
            if want:
                logit_rows.append(row - 1)
        view = BatchView(
            positions=torch.tensor(positions, dtype=torch.long, device=dev),
            row_slots=torch.tensor(row_slots, dtype=torch.long, device=dev),
            logit_rows=torch.tensor(logit_rows, dtype=torch.long, device=dev),
            prefills=segments,
        )
        if decode:
            slots = [s for s, _ in decode]
            lengths = [p + 1 for _, p in decode]
            L = max(lengths)
            lo, hi = min(slots), max(slots) + 1
            contiguous = hi - lo == len(slots) and slots == sorted(slots)
            self._ensure_zeroed(slots, [p for _, p in decode], L)
            view.num_decode = len(decode)
            view.decode_len = L
            view.decode_slots = torch.tensor(slots, dtype=torch.long, device=dev)
            view.decode_slot_range = (lo, hi) if contiguous else None
            view.decode_mask = decode_mask(torch.tensor(lengths, device=dev), L, window)
        return view
