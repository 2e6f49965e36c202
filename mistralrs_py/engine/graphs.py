"""CUDA graphs for decode steps: one captured graph per (batch bucket, cache-length bucket).

A decode step of a small model launches hundreds of tiny kernels; on a GPU the launches, not the
math, set the speed. A captured graph replays them all with one launch. Graphs need fixed shapes
and fixed addresses, so:
- inputs live in static buffers (token ids, positions, slots, the attention mask), refilled on
  the host side of each step and copied in before the replay;
- the batch is padded up to a bucket (1, 2, 4, 8, 16, ...); padding rows write their keys into a
  scratch slot that no sequence owns, at position 0, and their logits are dropped;
- attention reads a bucketed cache length (256, 512, 1024, ...) with the mask hiding the rest,
  so one graph serves every step until the longest sequence crosses the bucket.
The cache tensors themselves never move (the pool is allocated once), so graphs read and write
them in place.

`capture=False` runs the same static-buffer path without capturing: `--compile` uses it on the CPU
(one compiled graph per batch bucket), and the CPU tests check through it the padding, bucketing
and masks that the GPU graphs rely on.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from ..models.layers import BatchView, decode_mask

log = logging.getLogger("mistralrs.engine")

_MIN_LEN_BUCKET = 256


def batch_buckets(max_batch: int) -> list[int]:
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return [*out, max_batch]


def length_bucket(n: int, max_len: int) -> int:
    b = _MIN_LEN_BUCKET
    while b < n:
        b *= 2
    return min(b, max_len)


class DecodeGraphs:
    """Runs decode-only steps through captured graphs. `forward(input_ids, view, pool)` is the
    pipeline's forward; `pool` must have a scratch slot (`pool.scratch_slot`)."""

    def __init__(
        self,
        forward: Callable[[Tensor, BatchView, object], Tensor],
        pool,
        max_batch: int,
        window: int | None,
        capture: bool = True,
    ):
        if pool.scratch_slot is None:
            raise ValueError("decode graphs need a cache pool with a scratch slot")
        self.forward, self.pool, self.window, self.capture = forward, pool, window, capture
        self.max_batch, self.max_len = max_batch, pool.max_len
        self.buckets = batch_buckets(max_batch)
        dev = pool.device
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.full((max_batch,), pool.scratch_slot, dtype=torch.long, device=dev)
        self.lengths = torch.ones(max_batch, dtype=torch.long, device=dev)
        self.logit_rows = torch.arange(max_batch, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[object, Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self._host = torch.empty((4, max_batch), dtype=torch.long, pin_memory=capture)

    def fits(self, batch: int, length: int) -> bool:
        return 0 < batch <= self.max_batch and length <= self.max_len

    def _view(self, b: int, length: int) -> BatchView:
        # NOTE: the mask is computed inside the graph from the static lengths, so a replay needs
        # only the four small index buffers copied in.
        return BatchView(
            positions=self.positions[:b],
            row_slots=self.slots[:b],
            logit_rows=self.logit_rows[:b],
            num_decode=b,
            decode_slots=self.slots[:b],
            decode_slot_range=None,
            decode_len=length,
            decode_mask=decode_mask(self.lengths[:b], length, self.window),
            static=True,
            # NOTE: for a model whose fused CPU decode op reads them (eager static steps on the CPU)
            window=self.window,
            scratch_slot=self.pool.scratch_slot,
        )

    def _run_static(self, b: int, length: int) -> Tensor:
        return self.forward(self.ids[:b], self._view(b, length), self.pool)

    def _graph(self, b: int, length: int):
        key = (b, length)
        if key not in self.graphs:
            # NOTE: warm up on a side stream first (lazy inits, cuBLAS workspaces), as torch's docs
            # ask. The buffers hold this step's rows: warm-up and capture write the same keys at the
            # same positions as the replay that follows, so the cache ends as after one step.
            stream = torch.cuda.Stream(self.pool.device)
            stream.wait_stream(torch.cuda.current_stream(self.pool.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    self._run_static(b, length)
            torch.cuda.current_stream(self.pool.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.mempool):
                out = self._run_static(b, length)
            self.graphs[key] = (graph, out)
            log.info("captured a decode graph for batch %d, cache length %d", b, length)
        return self.graphs[key]

    def run(self, input_ids: list[int], decode: list[tuple[int, int]]) -> Tensor:
        """input_ids: one token per sequence; decode: (slot, position) per sequence -> logits [n, V]."""
        n = len(decode)
        b = next(x for x in self.buckets if x >= n)
        length = length_bucket(max(p for _, p in decode) + 1, self.max_len)
        pad = b - n
        host = self._host[:, :b]
        host[0, :n] = torch.tensor(input_ids)
        host[1, :n] = torch.tensor([p for _, p in decode])
        host[2, :n] = torch.tensor([s for s, _ in decode])
        host[3, :n] = host[1, :n] + 1
        if pad:
            host[0, n:], host[1, n:], host[2, n:], host[3, n:] = 0, 0, self.pool.scratch_slot, 1
        for dst, row in zip((self.ids, self.positions, self.slots, self.lengths), host):
            dst[:b].copy_(row, non_blocking=True)
        # NOTE: every row reads `length` positions of its slot (the scratch slot too, for padding
        # rows): they must hold finite numbers, since masked keys still enter as 0 * value.
        slots, positions = [s for s, _ in decode], [p for _, p in decode]
        if pad:
            slots, positions = [*slots, self.pool.scratch_slot], [*positions, 0]
        self.pool.prepare_decode(slots, positions, length)
        if not self.capture:
            return self._run_static(b, length)[:n]
        graph, out = self._graph(b, length)
        graph.replay()
        return out[:n]
