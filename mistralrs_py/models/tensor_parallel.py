"""Tensor parallelism's math: which part of every weight a rank holds, and the collectives the
decoder calls (Megatron's layout, as vLLM lays it out).

Each of `world` ranks holds, per layer, a contiguous run of the key/value head groups (their query
heads with them): q/k/v are split by output rows (column-parallel), o_proj by input columns
(row-parallel, all-reduced); gate/up by rows and down by columns over the MLP's intermediate size
(every expert of a mixture split the same way); the embedding and the output head by vocabulary
rows. Norms, q/k norms and the router are whole on every rank. So the hidden state between layers is
the same on every rank, and a step costs two all-reduces a layer, one for the embedding and one
gather of the logits.

NOTE: uneven counts are split as evenly as they go (the first ranks take one more): 3 key/value heads
on 2 ranks are 2 + 1 (vLLM refuses what does not divide; the embedded model has 3). Quantized
weights split by columns keep their blocks whole: the intermediate size is split on block boundaries,
and a head boundary inside a block is reported by `col_range_fits`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import ConfigError, ModelConfig

# NOTE: intermediate sizes are split on multiples of this (the largest GGUF block, the K-quants' 256),
# where the size allows, so any quantized down_proj splits into whole blocks
_ALIGN = 256


def split(n: int, world: int, rank: int, unit: int = 1) -> tuple[int, int]:
    """[start, end) of rank's share of n items, in whole units, the first ranks taking one unit more."""
    units = n // unit
    base, extra = divmod(units, world)
    start = rank * base + min(rank, extra)
    return start * unit, (start + base + (rank < extra)) * unit


@dataclass(eq=False)
class Shard:
    """What rank `rank` of `world` holds: [start, end) ranges of kv heads, intermediate rows (dense
    MLP and experts) and vocabulary rows. `group`: the torch.distributed process group (None: the
    default one); `comm`: collectives of the ranks' own where set (engine/shm_comm.py: shared memory
    between the processes of one machine), with torch.distributed for what they do not take."""

    rank: int
    world: int
    kv_heads: tuple[int, int]
    group_size: int  # query heads per kv head
    head_dim: int
    intermediate: tuple[int, int]
    moe_intermediate: tuple[int, int]
    vocab: tuple[int, int]
    vocab_per_rank: int  # the largest share: logits are gathered padded to it
    vocab_size: int
    group: object = None
    comm: object = None

    @property
    def q_rows(self) -> tuple[int, int]:
        a, b = self.kv_heads
        return a * self.group_size * self.head_dim, b * self.group_size * self.head_dim

    @property
    def kv_rows(self) -> tuple[int, int]:
        a, b = self.kv_heads
        return a * self.head_dim, b * self.head_dim

    # ---- which part of a weight -------------------------------------------------------------------
    def rule(self, name: str) -> tuple[int, tuple[int, int]] | None:
        """(axis, [start, end)) of our parameter `name` that this rank holds, or None when it holds
        all of it. Axis 0 splits output rows (column-parallel), axis 1 input columns (row-parallel)."""
        parts = name.split(".")
        leaf, owner = parts[-1], parts[-2] if len(parts) > 1 else ""
        inter = self.moe_intermediate if ".experts." in name else self.intermediate
        rows = {
            "q_proj": self.q_rows,
            "k_proj": self.kv_rows,
            "v_proj": self.kv_rows,
            "gate_proj": inter,
            "up_proj": inter,
            "embed_tokens": self.vocab,
            "lm_head": self.vocab,
        }
        if owner in rows:
            return 0, rows[owner]
        if owner == "o_proj" and leaf == "weight":
            return 1, self.q_rows
        if owner == "down_proj" and leaf == "weight":
            return 1, inter
        return None

    def is_row_parallel_bias(self, name: str) -> bool:
        """o_proj's and down_proj's biases are added once, after the all-reduce: rank 0 holds them."""
        return name.endswith(("o_proj.bias", "down_proj.bias"))

    def take(self, name: str, t: Tensor) -> Tensor:
        """This rank's part of a dense tensor (a narrow view: no copy)."""
        rule = self.rule(name)
        if rule is not None:
            axis, (a, b) = rule
            return t.narrow(axis, a, b - a)
        if self.is_row_parallel_bias(name) and self.rank:
            return torch.zeros_like(t)
        return t

    # ---- the collectives the decoder calls -----------------------------------------------------------
    def all_reduce(self, x: Tensor) -> Tensor:
        if self.comm is not None and self.comm.all_reduce(x):
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)
        return x

    def embed(self, embedding, ids: Tensor) -> Tensor:
        """ids: [N] full-vocabulary ids -> [N, D]: each rank looks up the rows it holds, the others
        are zero, and the sum over ranks is the whole lookup."""
        a, b = self.vocab
        local = ids - a
        held = (local >= 0) & (local < b - a)
        x = embedding(torch.where(held, local, torch.zeros_like(local)))
        x = x * held[:, None].to(x.dtype)
        return self.all_reduce(x)

    def gather_logits(self, local: Tensor) -> Tensor:
        """local: [S, this rank's vocabulary rows] -> [S, V] on rank 0, which samples; the other ranks
        only send theirs (and get their own part back, which nobody reads)."""
        import torch.distributed as dist

        width = self.vocab_per_rank
        if local.shape[1] < width:
            local = torch.nn.functional.pad(local, (0, width - local.shape[1]))
        parts = self.comm.gather(local, keep=self.rank == 0) if self.comm is not None else False
        if parts is False:
            parts = [torch.empty_like(local) for _ in range(self.world)] if self.rank == 0 else None
            dist.gather(local.contiguous(), parts, dst=0, group=self.group)
        if self.rank:
            return local
        sizes = [split(self.vocab_size, self.world, r) for r in range(self.world)]
        return torch.cat([p[:, : b - a] for p, (a, b) in zip(parts, sizes)], dim=1)


def plan_shard(cfg: ModelConfig, rank: int, world: int, group=None, align: int = _ALIGN) -> Shard:
    """Rank `rank`'s share of a model with config `cfg`; a ConfigError names what cannot be split."""
    if world > cfg.num_kv_heads:
        raise ConfigError(
            f"--tensor-parallel-size {world} is more than the model's {cfg.num_kv_heads} key/value heads "
            f"(each rank holds whole heads); use at most {cfg.num_kv_heads}"
        )

    def inter_range(n: int) -> tuple[int, int]:
        unit = align if n % align == 0 and n // align >= world else (32 if n % 32 == 0 and n // 32 >= world else 1)
        if n // unit < world:
            raise ConfigError(f"an intermediate size of {n} cannot be split over {world} ranks")
        return split(n, world, rank, unit)

    return Shard(
        rank=rank,
        world=world,
        kv_heads=split(cfg.num_kv_heads, world, rank),
        group_size=cfg.num_heads // cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        intermediate=inter_range(cfg.intermediate_size) if cfg.intermediate_size else (0, 0),
        moe_intermediate=inter_range(cfg.moe_intermediate_size) if cfg.num_experts else (0, 0),
        vocab=split(cfg.vocab_size, world, rank),
        vocab_per_rank=-(-cfg.vocab_size // world),
        vocab_size=cfg.vocab_size,
        group=group,
    )


def local_config(cfg: ModelConfig, shard: Shard) -> ModelConfig:
    """The config of the part a rank holds: its heads, intermediate rows and vocabulary rows."""
    kv = shard.kv_heads[1] - shard.kv_heads[0]

    def width(r: tuple[int, int]) -> int:
        return r[1] - r[0]

    return dataclasses.replace(
        cfg,
        num_heads=kv * shard.group_size,
        num_kv_heads=kv,
        intermediate_size=width(shard.intermediate),
        moe_intermediate_size=width(shard.moe_intermediate),
        vocab_size=width(shard.vocab),
    )


def col_range_fits(start: int, end: int, block: int) -> bool:
    """Whether columns [start, end) of a quantized weight are whole blocks of `block` values."""
    return start % block == 0 and end % block == 0
