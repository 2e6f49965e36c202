"""CUDA graphs for decode steps: one captured graph per (batch bucket, cache-length bucket).

A decode step of a small model launches hundreds of tiny kernels; on a GPU the launches, not the
math, set the speed. A captured graph replays them all with one launch. Graphs need fixed shapes
and fixed addresses, so:
- inputs live in static buffers (token ids, positions, slots, block tables, lengths), refilled on
  the host side of each step and copied in before the replay;
- the batch is padded up to a bucket (1, 2, 4, 8, 16, ...); padding rows write their keys into a
  scratch block that no sequence owns, at position 0, and their logits are dropped;
- attention reads a bucketed cache length (256, 512, 1024, ...) through the block tables (padded
  with the scratch block) with the mask hiding the rest, so one graph serves every step until the
  longest sequence crosses the bucket.
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

from ..models.layers import BatchView, decode_mask, static_decode_view

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
    pipeline's forward; `pool` is the engine's paged cache (its scratch block takes padding rows)."""

    def __init__(
        self,
        forward: Callable[[Tensor, BatchView, object], Tensor],
        pool,
        max_batch: int,
        max_len: int,
        window: int | None,
        capture: bool = True,
    ):
        self.forward, self.pool, self.window, self.capture = forward, pool, window, capture
        self.max_batch, self.max_len, self.bs = max_batch, max_len, pool.block_size
        self.buckets = batch_buckets(max_batch)
        dev = pool.device
        self.max_blocks = -(-max_len // self.bs)
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.slots = torch.zeros(max_batch, dtype=torch.long, device=dev)
        self.tables = torch.full((max_batch, self.max_blocks), pool.scratch_block, dtype=torch.long, device=dev)
        self.lengths = torch.ones(max_batch, dtype=torch.long, device=dev)
        self.logit_rows = torch.arange(max_batch, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int], tuple[object, Tensor]] = {}
        self.mempool = torch.cuda.graph_pool_handle() if capture else None
        self._host = torch.empty((4, max_batch), dtype=torch.long, pin_memory=capture)
        self._host_tables = torch.empty((max_batch, self.max_blocks), dtype=torch.long, pin_memory=capture)

    def fits(self, batch: int, length: int) -> bool:
        return 0 < batch <= self.max_batch and length <= self.max_len

    def _view(self, b: int, length: int) -> BatchView:
        # NOTE: the mask and where each row writes are computed inside the graph from the static
        # buffers, so a replay needs only the small index buffers copied in.
        T = -(-length // self.bs)
        return static_decode_view(
            self.positions[:b],
            self.slots[:b],
            self.tables[:b, :T],
            decode_mask(self.lengths[:b], T * self.bs, self.window),
            self.logit_rows[:b],
            self.pool,
            self.window,
            static=True,
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

    def run(self, input_ids: list[int], decode: list[tuple[int, int]], tables: list[list[int]]) -> Tensor:
        """input_ids: one token per sequence; decode: (slot, position) per sequence; tables: their
        block tables -> logits [n, V]."""
        n = len(decode)
        b = next(x for x in self.buckets if x >= n)
        length = length_bucket(max(p for _, p in decode) + 1, self.max_len)
        T = -(-length // self.bs)
        host = self._host[:, :b]
        host[0, :n] = torch.tensor(input_ids)
        host[1, :n] = torch.tensor([p for _, p in decode])
        host[2, :n] = torch.tensor([s for s, _ in decode])
        host[3, :n] = host[1, :n] + 1
        ht = self._host_tables[:b, :T]
        scratch = self.pool.scratch_block
        # NOTE: each row's own blocks, then the scratch block up to the bucket (and for padding rows)
        rows = [(t[: -(-(p + 1) // self.bs)] + [scratch] * T)[:T] for (_, p), t in zip(decode, tables)]
        ht[:n] = torch.tensor(rows)
        ht[n:] = scratch
        if b > n:
            host[0, n:], host[1, n:], host[2, n:], host[3, n:] = 0, 0, 0, 1
        for dst, row in zip((self.ids, self.positions, self.slots, self.lengths), host):
            dst[:b].copy_(row, non_blocking=True)
        self.tables[:b, :T].copy_(ht, non_blocking=True)
        if not self.capture:
            return self._run_static(b, length)[:n]
        graph, out = self._graph(b, length)
        graph.replay()
        return out[:n]
