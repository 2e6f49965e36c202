"""GGML block formats: which GGUF tensor types we read, their bytes, and their values.

* ``dequantize(raw, qtype, shape)`` -- vectorised torch port of ``gguf.quants.dequantize``
  (bit-identical float32; works on any device), and ``dequantize_bytes`` for raw byte tensors;
* ``decode_blocks`` -- blocks -> (integer codes, scale, offset) per sub-block, the form the
  quantized kernels (quant_kernels.py) repack;
* ``int4_parts`` -- Q4_0/Q4_1/Q4_K as 4-bit codes with a scale and zero per 32 weights;
* ``row_chunks`` -- a tensor's rows in chunks, to bound load-time temporaries.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

GGML_SUPPORTED: frozenset[int] = frozenset(
    int(t)
    for t in (T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
)
DENSE_TYPES = {int(T.F32): torch.float32, int(T.F16): torch.float16, int(T.BF16): torch.bfloat16}
# Types that map exactly onto the int4pack kernel: stored nibble = v + offset, group 32.
INT4_OFFSET = {int(T.Q4_0): 8, int(T.Q4_1): 0, int(T.Q4_K): 0}
_CHUNK_BLOCKS = 1 << 14  # dequantize in chunks to bound temporaries
_CHUNK_WEIGHTS = 1 << 22  # load-time conversion (int4 packing / int8 requant) in row chunks


def type_name(qtype: int) -> str:
    return T(qtype).name.lower()


def to_u8(raw, device=None) -> torch.Tensor:
    """Raw bytes (numpy, any dtype/shape, rows contiguous) -> 1-D uint8 torch tensor.
    On CPU this shares memory with ``raw`` (zero-copy even for a read-only GGUF memmap)."""
    if isinstance(raw, torch.Tensor):
        t = raw.reshape(-1)
        t = t if t.dtype == torch.uint8 else t.contiguous().view(torch.uint8)
    else:
        arr = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
        with warnings.catch_warnings():  # NOTE: read-only memmap; we never write to it
            warnings.simplefilter("ignore")
            t = torch.from_numpy(arr)
    return t if device is None else t.to(device)


def check_size(t: torch.Tensor, qtype: int, numel: int) -> None:
    if qtype not in GGML_SUPPORTED:
        raise NotImplementedError(f"GGML type {qtype} not supported")
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    if numel % bs or t.numel() != numel // bs * ts:
        raise ValueError(f"{type_name(qtype)}: {t.numel()} bytes do not hold {numel} values")


# ----------------------------------------------------------------------------------------------
# Block decoders.  Each maps blocks b: [nb, type_size] uint8 to (v, S, Z) with
#   v: [nb, nsub, sub] int16 integer codes, S: [nb, nsub] f32 scale, Z: [nb, nsub] f32 or None
# such that  w = S * v (+ Z).  NOTE: S and Z are computed with exactly the float32 operations
# (and order) gguf.quants uses, so the dequantized result is bit-identical.
# ----------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, i: int) -> torch.Tensor:  # -> [nb, 1] f32
    return b[:, i : i + 2].contiguous().view(torch.float16).float()


def _bits(x: torch.Tensor, shifts, mask: int) -> torch.Tensor:
    # x: [nb, g, n] uint8 -> [nb, g, len(shifts), n]: (x >> shift) & mask
    sh = torch.tensor(shifts, dtype=torch.uint8, device=x.device).view(1, 1, -1, 1)
    return (x.unsqueeze(2) >> sh) & mask


def _q4(qs: torch.Tensor, nb: int, groups: int) -> torch.Tensor:
    # qs: [nb, groups*n] -> [nb, groups, 2n]: per group, n low nibbles then n high nibbles
    return _bits(qs.reshape(nb, groups, -1), (0, 4), 15).reshape(nb, groups, -1)


def _qh32(qh: torch.Tensor, nb: int) -> torch.Tensor:
    # qh: [nb, 4] little-endian uint32 -> [nb, 32] bit i of the word
    return _bits(qh.reshape(nb, 1, 4), range(8), 1).transpose(2, 3).reshape(nb, 32)


def _k_scale_min(s: torch.Tensor, nb: int):
    # Q4_K/Q5_K 12-byte packing of eight 6-bit scales and mins -> two [nb, 8] uint8
    s = s.reshape(nb, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([d & 63, (md & 15) | ((d >> 2) & 48)], dim=1)
    mn = torch.cat([m & 63, (md >> 4) | ((m >> 2) & 48)], dim=1)
    return sc, mn


def decode_blocks(b: torch.Tensor, qtype: int):
    nb = b.shape[0]
    if qtype == T.Q4_0:  # d f16 | qs[16]
        return _q4(b[:, 2:], nb, 1).short() - 8, _f16(b, 0), None
    if qtype == T.Q4_1:  # d | m | qs[16]
        return _q4(b[:, 4:], nb, 1).short(), _f16(b, 0), _f16(b, 2)
    if qtype in (T.Q5_0, T.Q5_1):  # d | (m) | qh u32 | qs[16]
        o = 2 if qtype == T.Q5_0 else 4
        q = _q4(b[:, o + 4 :], nb, 1) | (_qh32(b[:, o : o + 4], nb) << 4).view(nb, 1, 32)
        if qtype == T.Q5_0:
            return q.short() - 16, _f16(b, 0), None
        return q.short(), _f16(b, 0), _f16(b, 2)
    if qtype == T.Q8_0:  # d | qs int8[32]
        return b[:, 2:].contiguous().view(torch.int8).short().view(nb, 1, 32), _f16(b, 0), None
    if qtype == T.Q2_K:  # scales[16] (lo: scale, hi: min) | qs[64] | d | dmin
        sc = b[:, :16]
        S = _f16(b, 80) * (sc & 15).float()
        Z = -(_f16(b, 82) * (sc >> 4).float())  # NOTE: a + (-b) == a - b exactly in IEEE
        q = _bits(b[:, 16:80].reshape(nb, 2, 32), (0, 2, 4, 6), 3).reshape(nb, 16, 16)
        return q.short(), S, Z
    if qtype == T.Q3_K:  # hmask[32] | qs[64] | scales[12] (6-bit, packed) | d
        s = b[:, 96:108]
        lo = _bits(s[:, :8].reshape(nb, 1, 8), (0, 4), 15).reshape(nb, 16)
        hi = _bits(s[:, 8:].reshape(nb, 1, 4), (0, 2, 4, 6), 3).reshape(nb, 16)
        S = _f16(b, 108) * ((lo | (hi << 4)).short() - 32).float()
        ql = _bits(b[:, 32:96].reshape(nb, 2, 32), (0, 2, 4, 6), 3).reshape(nb, 16, 16)
        qh = _bits(b[:, :32].reshape(nb, 1, 32), range(8), 1).reshape(nb, 16, 16)
        # NOTE: a *cleared* hmask bit means "subtract 4"
        return ql.short() - ((qh ^ 1) << 2).short(), S, None
    if qtype in (T.Q4_K, T.Q5_K):  # d | dmin | scales[12] | (qh[32]) | qs[128]
        sc, mn = _k_scale_min(b[:, 4:16], nb)
        S = _f16(b, 0) * sc.float()
        Z = -(_f16(b, 2) * mn.float())
        if qtype == T.Q4_K:
            return _q4(b[:, 16:], nb, 4).reshape(nb, 8, 32).short(), S, Z
        qh = _bits(b[:, 16:48].reshape(nb, 1, 32), range(8), 1).reshape(nb, 8, 32)
        return (_q4(b[:, 48:], nb, 4).reshape(nb, 8, 32) | (qh << 4)).short(), S, Z
    if qtype == T.Q6_K:  # ql[128] | qh[64] | scales int8[16] | d
        S = _f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float()
        ql = _bits(b[:, :128].reshape(nb, 2, 64), (0, 4), 15).reshape(nb, 8, 32)
        qh = _bits(b[:, 128:192].reshape(nb, 2, 32), (0, 2, 4, 6), 3).reshape(nb, 8, 32)
        return ((ql | (qh << 4)).short() - 32).reshape(nb, 16, 16), S, None
    raise NotImplementedError(f"GGML type {qtype} not supported")


def dequantize_bytes(t: torch.Tensor, qtype: int, numel: int, own_sq: list | None = None) -> torch.Tensor:
    """t: 1-D uint8 raw bytes (any device) -> [numel] float32, bit-identical to gguf.
    own_sq: if given, own_sq[0] += sum over weights of S^2/12, the variance of the format's own
    rounding error (uniform in +-S/2), used to judge the int8 requantization error."""
    check_size(t, qtype, numel)
    if qtype in DENSE_TYPES:
        return t.view(DENSE_TYPES[qtype]).float()
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    blocks = t.view(-1, ts)
    out = torch.empty(blocks.shape[0], bs, dtype=torch.float32, device=t.device)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        v, S, Z = decode_blocks(blocks[i : i + _CHUNK_BLOCKS], qtype)
        w = S.unsqueeze(-1) * v.float()  # same op order as gguf: scale * q (+ min)
        if Z is not None:
            w = w + Z.unsqueeze(-1)
        if own_sq is not None:
            own_sq[0] += S.double().square().sum().item() * v.shape[-1] / 12
        out[i : i + _CHUNK_BLOCKS] = w.reshape(w.shape[0], bs)
    return out.view(-1)


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """raw GGUF bytes -> float32 tensor of ``shape`` (torch order), equal to gguf.quants.dequantize."""
    return dequantize_bytes(to_u8(raw), int(qtype), math.prod(shape)).view(*shape)


def int4_parts(t: torch.Tensor, qtype: int, N: int, K: int):
    """Q4_0/Q4_1/Q4_K -> codes [N, K] int32 in 0..15, scale [N, K/32], zero [N, K/32] (f32)
    in the int4pack convention  w = (code - 8) * scale + zero  (exact rewrite of S*v + Z)."""
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    v, S, Z = decode_blocks(t.view(-1, ts), qtype)
    c = INT4_OFFSET[qtype]
    codes = (v + c).reshape(N, K).int()
    S = S.reshape(N, K // 32)
    zero = (8 - c) * S  # (code-8)*S + zero == v*S + Z  with code = v + c
    if Z is not None:
        zero = zero + Z.reshape(N, K // 32)
    return codes, S, zero


def row_chunks(t: torch.Tensor, qtype: int, N: int, K: int):
    """Yield (rows, raw bytes) over chunks of ~4M weights to bound load-time temporaries.
    NOTE: chunks are multiples of 64 rows: the CPU int4 packing lays out independent 64-row
    blocks contiguously, so packing chunks and concatenating equals packing the whole."""
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    rb, step = K // bs * ts, max(64, _CHUNK_WEIGHTS // K // 64 * 64)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        yield r1 - r0, t[r0 * rb : r1 * rb]
