"""Building blocks of the decoder: RMSNorm, rotary embeddings, the batch view and cache-aware attention.

Shapes: N = tokens in the step (all sequences flattened), D = hidden size, H = query heads,
Hk = key/value heads, hd = head dim, B = decoding sequences, L = cache positions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig

# NOTE: up to this many rows (decode steps) our matrix-vector kernel beats torch's bf16 matmul,
# which reads the weight at well under the memory's speed; prompt chunks stay on torch's GEMM
# where the CPU multiplies bf16 natively. Without (AVX2, most AVX-512), torch's bf16 matmul runs
# at a few GFLOP/s and ours, 4x as fast at every row count, takes all of them (rows_for_kernel).
_GEMV_ROWS = 8


@functools.cache
def rows_for_kernel() -> int:
    """The most rows a bf16/fp16 projection sends to our kernel on this CPU (decided once)."""
    from .kernels import native_bf16

    return _GEMV_ROWS if native_bf16() else 1 << 62


class Linear(nn.Linear):
    """nn.Linear whose decode-sized bf16/fp16 calls run our CPU kernel (csrc/linear.cpp) when
    `cpu_ops` is set (llama.use_cpu_kernels)."""

    cpu_ops: bool = False

    def forward(self, x: Tensor) -> Tensor:
        # x: [M, K] -> [M, N]
        if (
            self.cpu_ops
            and x.dim() == 2
            and x.shape[0] <= rows_for_kernel()
            and x.dtype in (torch.bfloat16, torch.float16)
            and x.dtype == self.weight.dtype
        ):
            return torch.ops.mistralrs.linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    cpu_ops: bool = False  # our fused kernel (llama.use_cpu_kernels)

    def __init__(self, dim: int, eps: float, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        # NOTE: one fused kernel (float32 inside, rounded once); torch's CPU rms_norm is several ops
        # in bf16 (~13 us for one row against ~1 us), and this runs twice per layer per token.
        if self.cpu_ops:
            return torch.ops.mistralrs.rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if not s:
        return inv_freq
    if s["rope_type"] == "linear":
        return inv_freq / float(s["factor"])
    if s["rope_type"] == "llama3":
        factor = float(s["factor"])
        low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
        old_ctx = float(s.get("original_max_position_embeddings", 8192))
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"unsupported rope type {s['rope_type']!r}")


class Rotary(nn.Module):
    """cos/sin tables for every position the cache can hold, gathered by position per token."""

    def __init__(self, cfg: ModelConfig, max_positions: int, device=None):
        super().__init__()
        inv_freq = rope_inv_freq(cfg).to(device)
        t = torch.arange(max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # [P, hd/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [P, hd]
        # NOTE: rotate_half(x) * sin == roll(x, hd/2) * [-sin, sin]: the sign lives in the table,
        # so applying rope is three ops (roll, mul, addcmul).
        signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", signed_sin, persistent=False)

    def tables(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [N] -> cos, signed sin: [N, 1, hd]
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x: [N, heads, hd]; NOTE: rotate-half (GPT-NeoX) layout, as in HF checkpoints. GGUF files store
    # q/k rows interleaved for llama.cpp's rope; the GGUF loader un-permutes them at load time.
    return torch.addcmul(x * cos, torch.roll(x, x.shape[-1] // 2, dims=-1), sin)


@dataclass
class PrefillSegment:
    """Several prompt tokens of one sequence: rows [start_row, end_row) of the step, at positions
    [start_pos, start_pos + n) of the sequence in state slot `slot`."""

    start_row: int
    end_row: int
    slot: int
    start_pos: int
    mask: Tensor | None = None  # [1, 1, n, start_pos + n] bool, None when plain causal suffices
    blocks: Tensor | None = None  # [T] long: its block table up to start_pos + n


@dataclass
class BatchView:
    """What one forward step reads and writes in the cache. Built by the engine's cache pool.

    The cache is paged: per layer [blocks, Hk, block_size, hd]; row r's keys are written at block
    `write_blocks[r]`, offset `write_offsets[r]`, and each sequence reads its keys through its block
    table. Rows [0, num_decode) are single decode tokens; the prefill segments follow.
    """

    positions: Tensor  # [N] long: position of each token in its sequence
    row_slots: Tensor  # [N] long: the state slot of each token's sequence (per-sequence pipeline state)
    logit_rows: Tensor  # [S] long: rows whose logits are wanted (last token of each sequence)
    write_blocks: Tensor | None = None  # [N] long: the block each row's keys go to
    write_offsets: Tensor | None = None  # [N] long: their position in it (positions % block_size)
    block_size: int = 16
    num_decode: int = 0
    decode_slots: Tensor | None = None  # [B] long: state slots of the decode rows
    decode_tables: Tensor | None = None  # [B, T] long: each decode row's blocks (scratch past its own)
    decode_len: int = 0  # L: longest cache length among decoding sequences, this token included
    decode_mask: Tensor | None = None  # [B, 1, 1, T * block_size] bool: True where a key may be attended
    decode_start: int = 0  # one decoding sequence and no mask: it attends to positions [decode_start, L)
    prefills: list[PrefillSegment] = field(default_factory=list)
    # NOTE: built by engine/graphs.py on static, bucketed buffers (the only views --compile runs)
    static: bool = False
    # NOTE: for attention modules that run our fused CPU op (decode_attention_cpu): the sliding
    # window it applies (the masks above encode it for the torch path), and the scratch block of
    # padding rows in bucketed batches (--compile), which it skips.
    window: int | None = None
    scratch_block: int = -1

    @property
    def num_tokens(self) -> int:
        return int(self.positions.shape[0])


def static_decode_view(
    positions: Tensor,
    slots: Tensor,
    tables: Tensor,
    mask: Tensor,
    logit_rows: Tensor,
    cache,
    window: int | None,
    static: bool = False,
) -> BatchView:
    """A decode-only view made of tensors alone (CUDA graphs' static buffers, --compile's inputs):
    where each row writes is computed on the device from its table. tables: [B, T]; mask: [B, 1, 1, T * bs]."""
    bs = cache.block_size
    blocks = tables.gather(1, torch.div(positions, bs, rounding_mode="floor")[:, None])[:, 0]
    return BatchView(
        positions=positions,
        row_slots=slots,
        logit_rows=logit_rows,
        write_blocks=blocks,
        write_offsets=positions % bs,
        block_size=bs,
        num_decode=positions.shape[0],
        decode_slots=slots,
        decode_tables=tables,
        decode_len=mask.shape[-1],
        decode_mask=mask,
        static=static,
        window=window,
        scratch_block=cache.scratch_block,
    )


def decode_attention_cpu(
    q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, view: BatchView
) -> Tensor:
    """The decode rows [0, B) of a step in one op (models/csrc/attention.cpp): rope on q and k, the
    cache write, and each query attending to its own keys through its block table (the last
    `view.window` of them).

    q: [N, H, hd], k, v: [N, Hk, hd] before rope; cos, sin: [N, 1, hd] (float32: rope without
    rounding). Returns [B, H, hd]."""
    B, positions = view.num_decode, view.positions
    if B < q.shape[0]:  # NOTE: slicing costs ~1 us an op; a decode-only step needs none
        q, k, v, cos, sin, positions = q[:B], k[:B], v[:B], cos[:B], sin[:B], positions[:B]
    return torch.ops.mistralrs.decode_attention(
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        view.decode_tables,
        positions,
        view.window or 0,
        q.shape[-1] ** -0.5,
        view.scratch_block,
    )


def gather_blocks(cache: Tensor, blocks: Tensor) -> Tensor:
    """cache [blocks, Hk, bs, hd] read through tables `blocks` [..., T] -> [..., Hk, T * bs, hd]."""
    g = cache[blocks]  # [..., T, Hk, bs, hd]
    *lead, T, Hk, bs, hd = g.shape
    return g.transpose(-4, -3).reshape(*lead, Hk, T * bs, hd)


def attend(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, view: BatchView, skip_decode: bool = False
) -> Tensor:
    """Writes this step's k/v into the cache and attends every query to its own sequence's keys.

    q: [N, H, hd]; k, v: [N, Hk, hd]; k_cache, v_cache: [blocks, Hk, bs, hd]. Returns [N, H, hd], or
    only the prefill rows' [N - B, H, hd] with `skip_decode` (decode_attention_cpu took the others).
    """
    # NOTE: one scatter for all rows; (block, :, offset) advanced indexing puts N first.
    if skip_decode:
        nd = view.num_decode
        k_cache[view.write_blocks[nd:], :, view.write_offsets[nd:]] = k[nd:]
        v_cache[view.write_blocks[nd:], :, view.write_offsets[nd:]] = v[nd:]
    else:
        k_cache[view.write_blocks, :, view.write_offsets] = k
        v_cache[view.write_blocks, :, view.write_offsets] = v
    gqa = q.shape[1] != k.shape[1]
    outs = []
    if view.num_decode and not skip_decode:
        kk, vv = gather_blocks(k_cache, view.decode_tables), gather_blocks(v_cache, view.decode_tables)
        if view.decode_mask is None:
            kk, vv = kk[:, :, view.decode_start : view.decode_len], vv[:, :, view.decode_start : view.decode_len]
        qd = q[: view.num_decode]  # [B, H, hd]
        outs.append(decode_attention(qd, kk, vv, view.decode_mask))
    for seg in view.prefills:
        n = seg.end_row - seg.start_row
        end = seg.start_pos + n
        qs = q[seg.start_row : seg.end_row].transpose(0, 1).unsqueeze(0)  # [1, H, n, hd]
        if seg.mask is None:
            # NOTE: a fresh prompt with no window: attend to the new keys directly (no cache read).
            ks = k[seg.start_row : seg.end_row].transpose(0, 1).unsqueeze(0)
            vs = v[seg.start_row : seg.end_row].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=gqa)
        else:
            ks = gather_blocks(k_cache, seg.blocks)[None, :, :end]
            vs = gather_blocks(v_cache, seg.blocks)[None, :, :end]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=seg.mask, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def decode_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """One query per sequence. q: [B, H, hd]; k, v: [B, Hk, L, hd]; mask: [B, 1, 1, L] or None -> [B, H, hd].

    NOTE: written out with batched matmuls because torch's CPU flash-attention kernel is 1.5-17x
    slower for single-query rows (L = 64..2000, measured on torch 2.13): it is built for long
    query blocks. Query heads are grouped under their kv head (GQA without repeating keys)."""
    B, H, hd = q.shape
    Hk, L = k.shape[1], k.shape[2]
    qg = q.view(B, Hk, H // Hk, hd)  # [B, Hk, G, hd]
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(hd**-0.5)  # [B, Hk, G, L]
    if mask is not None:
        scores = scores.masked_fill_(~mask.view(B, 1, 1, L), float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v).view(B, H, hd)


def prefill_mask(start_pos: int, n: int, window: int | None, device) -> Tensor | None:
    """[1, 1, n, start_pos + n] bool mask for n new tokens after start_pos cached ones, or None.

    NOTE: query i (absolute position start_pos + i) sees key j when j <= start_pos + i and, with a
    sliding window W, when j > start_pos + i - W (W keys including itself), as transformers' Mistral.
    """
    if start_pos == 0 and (window is None or n <= window):
        return None
    q_pos = torch.arange(start_pos, start_pos + n, device=device)[:, None]
    k_pos = torch.arange(start_pos + n, device=device)[None, :]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask[None, None]


def decode_mask(lengths: Tensor, max_len: int, window: int | None) -> Tensor:
    """[B, 1, 1, L] bool: key j is visible to the new token of a sequence of length l (this token
    included) when j < l and, with a sliding window W, j >= l - W."""
    k_pos = torch.arange(max_len, device=lengths.device)[None, :]
    mask = k_pos < lengths[:, None]
    if window is not None:
        mask &= k_pos >= (lengths[:, None] - window)
    return mask[:, None, None, :]
