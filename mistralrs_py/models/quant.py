"""GGUF weights kept quantized in memory, with our own or torch's quantized matmul kernels.

Layers:
  * ``dequantize(raw, qtype, shape)`` -- vectorised torch port of ``gguf.quants.dequantize``
    (bit-identical float32; works on any device).
  * ``QuantLinear`` -- linear layer whose weight stays quantized; picks a kernel per
    (qtype, compute dtype, device) and reports it in ``.kind``.
  * ``QuantEmbedding`` -- embedding table kept as raw GGUF bytes; dequantizes gathered rows.

Kernel choice on CPU (measured, torch 2.13, AVX512, 1 thread; see ``__main__``):
  * compute bf16/fp16 on a CPU with AVX-512 VNNI (``qmatmul.available()``; prefer "auto"/"fast"):
      our own kernels (qmatmul.cpp): int8 activations per 32-block against 4-bit codes (Q4_0/Q4_1/
      Q4_K, exact) or int8 codes (Q8_0 exact; other formats requantized per 32-block under the
      same error rule as below). 4-5x torch's int4 kernel at one row, ahead of dense bf16 up to
      prompt-sized batches. Needs out_features % 16 == 0.  Otherwise torch's kernels:
  * compute bf16:
      Q4_0 / Q4_1 / Q4_K -> ``_weight_int4pack_mm_for_cpu`` (group 32).  The mapping is exact;
        only the per-group scale/zero are rounded to bf16 (the kernel wants them in x's dtype).
        Needs out_features % 16 == 0, else dense bf16.
      Q5_0 / Q5_1 / Q5_K / Q8_0 / Q2_K / Q3_K / Q6_K -> ``_weight_int8pack_mm`` after a one-off
        requantization to int8 with one scale per output row (lossy: |err| <= ~rowmax/254),
        *if* that adds at most the format's own rounding error (rms), else dense bf16.  In
        practice Q5_x/Q2_K/Q3_K -> int8, Q6_K -> int8 unless rows have strong outliers, Q8_0 ->
        dense (per-32 scales always beat a per-row scale).  ``prefer="fast"`` always
        requantizes, ``"exact"`` never does.
      F32 / F16 / BF16 -> dense bf16 ``F.linear``.
  * compute float32 / float16: dense ``F.linear`` on the exact dequantized weight.
    NOTE: torch's int4/int8 CPU kernels only have a vectorised path for bfloat16; for
    float32/float16 they run a scalar loop that is 20-50x slower than a dense matmul.
  * NOTE: the int kernels re-dequantize the weight for every 4 rows of x with fp32 FMAs, so
    they beat dense bf16 only for M <= ~4 (decode: 1.4x on 576x1536, 3x on 4096x4096); at
    M = 8 they are ~0.7x, and ~0.4x for prefill-sized M. So from 8 rows on, int8 weights are
    converted to bf16 one cache-sized block at a time and multiplied densely (~2x the int8 kernel
    at 16 rows); int4pack has no such way out (its packed layout is opaque).
CUDA: Q4_0/Q4_1/Q4_K with bf16 -> tinygemm ``_weight_int4pack_mm`` (self-checked at load against
the dequantized weight, falls back if it disagrees); everything else keeps the raw GGUF bytes on
the GPU and dequantizes per call ("dequant-per-call").  Other devices: dequant-per-call.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from . import qmatmul

GGML_SUPPORTED: frozenset[int] = frozenset(int(t) for t in (
    T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0,
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K))
_DENSE = {int(T.F32): torch.float32, int(T.F16): torch.float16, int(T.BF16): torch.bfloat16}
# Types that map exactly onto the int4pack kernel: stored nibble = v + offset, group 32.
_INT4_OFFSET = {int(T.Q4_0): 8, int(T.Q4_1): 0, int(T.Q4_K): 0}
# NOTE: the *_for_cpu int4 ops appeared in torch 2.6 (pyproject allows >= 2.4): probe, don't assume
_HAS_INT4_CPU = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
_HAS_INT8_CPU = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_CHUNK_BLOCKS = 1 << 14  # dequantize in chunks to bound temporaries
_CHUNK_WEIGHTS = 1 << 22  # load-time conversion (int4 packing / int8 requant) in row chunks
_INT8_DENSE_ROWS = 8  # from this many rows of x, int8 weights are converted by blocks (see _int8_by_chunks)
_INT8_BLOCK_ROWS = 8192


def _name(qtype: int) -> str:
    return T(qtype).name.lower()


def _to_u8(raw, device=None) -> torch.Tensor:
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


def _check_size(t: torch.Tensor, qtype: int, numel: int) -> None:
    if qtype not in GGML_SUPPORTED:
        raise NotImplementedError(f"GGML type {qtype} not supported")
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    if numel % bs or t.numel() != numel // bs * ts:
        raise ValueError(f"{_name(qtype)}: {t.numel()} bytes do not hold {numel} values")


# ----------------------------------------------------------------------------------------------
# Block decoders.  Each maps blocks b: [nb, type_size] uint8 to (v, S, Z) with
#   v: [nb, nsub, sub] int16 integer codes, S: [nb, nsub] f32 scale, Z: [nb, nsub] f32 or None
# such that  w = S * v (+ Z).  NOTE: S and Z are computed with exactly the float32 operations
# (and order) gguf.quants uses, so the dequantized result is bit-identical.
# ----------------------------------------------------------------------------------------------
def _f16(b: torch.Tensor, i: int) -> torch.Tensor:  # -> [nb, 1] f32
    return b[:, i:i + 2].contiguous().view(torch.float16).float()


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


def _decode(b: torch.Tensor, qtype: int):
    nb = b.shape[0]
    if qtype == T.Q4_0:  # d f16 | qs[16]
        return _q4(b[:, 2:], nb, 1).short() - 8, _f16(b, 0), None
    if qtype == T.Q4_1:  # d | m | qs[16]
        return _q4(b[:, 4:], nb, 1).short(), _f16(b, 0), _f16(b, 2)
    if qtype in (T.Q5_0, T.Q5_1):  # d | (m) | qh u32 | qs[16]
        o = 2 if qtype == T.Q5_0 else 4
        q = _q4(b[:, o + 4:], nb, 1) | (_qh32(b[:, o:o + 4], nb) << 4).view(nb, 1, 32)
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


def _dequant_t(t: torch.Tensor, qtype: int, numel: int, own_sq: list | None = None) -> torch.Tensor:
    """t: 1-D uint8 raw bytes (any device) -> [numel] float32, bit-identical to gguf.
    own_sq: if given, own_sq[0] += sum over weights of S^2/12, the variance of the format's own
    rounding error (uniform in +-S/2), used to judge the int8 requantization error."""
    _check_size(t, qtype, numel)
    if qtype in _DENSE:
        return t.view(_DENSE[qtype]).float()
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    blocks = t.view(-1, ts)
    out = torch.empty(blocks.shape[0], bs, dtype=torch.float32, device=t.device)
    for i in range(0, blocks.shape[0], _CHUNK_BLOCKS):
        v, S, Z = _decode(blocks[i:i + _CHUNK_BLOCKS], qtype)
        w = S.unsqueeze(-1) * v.float()  # same op order as gguf: scale * q (+ min)
        if Z is not None:
            w = w + Z.unsqueeze(-1)
        if own_sq is not None:
            own_sq[0] += S.double().square().sum().item() * v.shape[-1] / 12
        out[i:i + _CHUNK_BLOCKS] = w.reshape(w.shape[0], bs)
    return out.view(-1)


def dequantize(raw: np.ndarray, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """raw GGUF bytes -> float32 tensor of ``shape`` (torch order), equal to gguf.quants.dequantize."""
    return _dequant_t(_to_u8(raw), int(qtype), math.prod(shape)).view(*shape)


def _int4_parts(t: torch.Tensor, qtype: int, N: int, K: int):
    """Q4_0/Q4_1/Q4_K -> codes [N, K] int32 in 0..15, scale [N, K/32], zero [N, K/32] (f32)
    in the int4pack convention  w = (code - 8) * scale + zero  (exact rewrite of S*v + Z)."""
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    v, S, Z = _decode(t.view(-1, ts), qtype)
    c = _INT4_OFFSET[qtype]
    codes = (v + c).reshape(N, K).int()
    S = S.reshape(N, K // 32)
    zero = (8 - c) * S  # (code-8)*S + zero == v*S + Z  with code = v + c
    if Z is not None:
        zero = zero + Z.reshape(N, K // 32)
    return codes, S, zero


def _row_chunks(t: torch.Tensor, qtype: int, N: int, K: int):
    """Yield (rows, raw bytes) over chunks of ~4M weights to bound load-time temporaries.
    NOTE: chunks are multiples of 64 rows: the CPU int4 packing lays out independent 64-row
    blocks contiguously, so packing chunks and concatenating equals packing the whole."""
    bs, ts = GGML_QUANT_SIZES[T(qtype)]
    rb, step = K // bs * ts, max(64, _CHUNK_WEIGHTS // K // 64 * 64)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        yield r1 - r0, t[r0 * rb:r1 * rb]


class QuantLinear(torch.nn.Module):
    """y = x @ W.T (+ bias) with W kept quantized.  Build it on its target device; do not
    ``.to()`` it afterwards (the packed formats are device specific).  Attributes:
    ``in_features``, ``out_features``, ``kind`` (kernel description), ``compute_dtype``."""

    def __init__(self, in_features: int, out_features: int, compute_dtype: torch.dtype,
                 bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else bias.detach().to(compute_dtype)
        self.kind = ""
        self._mode = ""  # dense | qmm | int4 | int4cuda | int8 | deq

    @classmethod
    def from_gguf(cls, raw: np.ndarray, qtype: int, shape: tuple[int, int],
                  compute_dtype: torch.dtype, device: torch.device,
                  bias: torch.Tensor | None = None, *, prefer: str = "auto", keep_raw: bool = True) -> "QuantLinear":
        """raw: GGUF bytes of a [out, in] weight.  prefer: "auto" (int4pack where exact; int8
        requantization only where its error is <= the format's own rounding error (rms), else
        dense), "fast" (always requantize to int8 when no exact kernel), "exact" (never
        requantize), "dense" (always dense), "kernel" ("fast" even for float32 -- slow on CPU,
        for tests).  keep_raw=False drops the reference to `raw` kept for dequantized() of packed
        int4 weights, so a memory-mapped file can be unmapped once the model is loaded."""
        qtype, device = int(qtype), torch.device(device)
        if prefer not in ("auto", "fast", "exact", "dense", "kernel"):
            raise ValueError(f"prefer={prefer!r}")
        N, K = shape
        self = cls(K, N, compute_dtype, None if bias is None else bias.to(device))
        t = _to_u8(raw)  # CPU, shares memory with raw
        _check_size(t, qtype, N * K)
        self._qtype, name, cdt = qtype, _name(qtype), compute_dtype
        dt = str(cdt).replace("torch.", "")
        fast_dtype = cdt == torch.bfloat16 or prefer == "kernel"
        if qtype in _DENSE or prefer == "dense":
            self._set_dense(t, device, f"{name}->dense {dt}")
        elif device.type != "cpu":
            self._build_gpu(t, device, keep_raw)
        elif (prefer in ("auto", "fast") and cdt in (torch.bfloat16, torch.float16) and N % 16 == 0 and K % 32 == 0
              and qmatmul.available() and self._build_qmm(t, prefer)):
            pass  # NOTE: the hand-written kernels (qmatmul.cpp) are 4-5x torch's at decode sizes
        elif not fast_dtype:
            self._set_dense(t, device, f"{name}->dense {dt} (exact; cpu int kernels have no fast {dt} path)")
        elif qtype in _INT4_OFFSET and N % 16 == 0 and _HAS_INT4_CPU:
            # x: [M, K] @ packed [N, K/2] uint8 with scales_and_zeros [K/32, N, 2]
            packed, sz = [], []
            for n, tb in _row_chunks(t, qtype, N, K):
                codes, S, zero = _int4_parts(tb, qtype, n, K)  # codes: [n, K] int32 in 0..15
                packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
                sz.append(torch.stack([S, zero], -1))  # [n, K/32, 2]
            self._qweight = torch.cat(packed)  # opaque uint8 [N, K/2]
            self._sz = torch.cat(sz).transpose(0, 1).contiguous().to(cdt)
            self._raw = t if keep_raw else None  # kept (by reference) only for dequantized()
            self._mode = "int4"
            self.kind = f"{name}->int4pack(g32)" + ("" if cdt == torch.float32 else f" (scale/zero in {dt})")
        elif qtype in _INT4_OFFSET or prefer == "exact" or K % 16 or not _HAS_INT8_CPU:
            # NOTE: int4pack needs N % 16 == 0; the bf16 int8 kernel returns garbage (or
            # segfaults) when K % 16 != 0 (never the case for GGUF block sizes, but guard anyway)
            why = ("N%16!=0" if _HAS_INT4_CPU else "no int4 kernel") if qtype in _INT4_OFFSET else \
                ("exact" if prefer == "exact" else "no int8 kernel")
            self._set_dense(t, device, f"{name}->dense {dt} ({why})")
        else:
            w8, s8, own_sq, err_sq = [], [], [0.0], 0.0
            for n, tb in _row_chunks(t, qtype, N, K):
                W = _dequant_t(tb, qtype, n * K, own_sq).view(n, K)
                # NOTE: round the scale to the compute dtype *before* quantizing against it
                s = (W.abs().amax(1) / 127).to(cdt).float()
                s = torch.where(s > 0, s, torch.ones_like(s))
                q = torch.round(W / s[:, None]).clamp_(-128, 127)
                err_sq += (q * s[:, None] - W).double().square().sum().item()
                w8.append(q.to(torch.int8))
                s8.append(s.to(cdt))
            # ratio = rms(requant error) / rms(format's own rounding error).  "auto" accepts
            # <= 1 (at most one more rounding of the file's own size: total error <= 1.41x).
            # NOTE: per-row int8 is coarser than per-block scales when rows have outliers.
            # Simulated ratios (gaussian .. heavy-tailed/outlier columns, K=576..14336):
            # Q8_0 1.4..5 (always dense), Q6_K 0.4..1.5, Q5_x 0.2..0.8, Q3_K/Q2_K < 0.2.
            ratio = math.sqrt(err_sq / own_sq[0]) if own_sq[0] > 0 else (0.0 if err_sq == 0 else math.inf)
            if prefer == "auto" and ratio > 1.0:
                self._set_dense(t, device, f"{name}->dense {dt} (int8 requant err {ratio:.2f}x own)")
                return self
            self._w8, self._s8 = torch.cat(w8), torch.cat(s8)  # [N, K] int8, [N]
            self._mode = "int8"
            self.kind = f"{name}->int8(per-channel, requantized; err {ratio:.2f}x own)"
        return self

    def _build_qmm(self, t: torch.Tensor, prefer: str) -> bool:
        """The hand-written VNNI kernels: Q4_0/Q4_1/Q4_K as 4-bit codes with a float16 scale and
        offset per 32-block (exact for Q4_0/Q4_1); Q8_0 as its own int8 codes (exact); other
        formats requantized to int8 per 32-block, if ("auto") that adds at most the format's own
        rounding error. False when a scale does not fit float16 or the error check fails."""
        qtype, N, K, name = self._qtype, self.out_features, self.in_features, _name(self._qtype)
        bs, ts = GGML_QUANT_SIZES[T(qtype)]
        parts, own_sq, err_sq = [], [0.0], 0.0
        for n, tb in _row_chunks(t, qtype, N, K):
            if qtype in _INT4_OFFSET:
                v, S, Z = _decode(tb.view(-1, ts), qtype)  # w = S * v (+ Z), v + offset in 0..15
                c = _INT4_OFFSET[qtype]
                S = S.reshape(n, K // 32)
                mw = (Z.reshape(n, K // 32) if Z is not None else torch.zeros_like(S)) - c * S  # exact for Q4_0/Q4_1
                p = qmatmul.pack_q4((v + c).reshape(n, K), S, mw)
            elif qtype == T.Q8_0:
                v, S, _ = _decode(tb.view(-1, ts), qtype)
                p = qmatmul.pack_q8(v.reshape(n, K).to(torch.int8), S.reshape(n, K // 32))
            else:
                W = _dequant_t(tb, qtype, n * K, own_sq).view(n, K // 32, 32)
                # NOTE: round the scale to float16 *before* quantizing against it
                s = (W.abs().amax(-1) / 127).half().float()
                s = torch.where(s > 0, s, torch.ones_like(s))
                q = torch.round(W / s[..., None]).clamp_(-128, 127)
                err_sq += (q * s[..., None] - W).double().square().sum().item()
                p = qmatmul.pack_q8(q.to(torch.int8).view(n, K), s)
            if p is None:
                return False
            parts.append(p)
        ratio = math.sqrt(err_sq / own_sq[0]) if own_sq[0] > 0 else (0.0 if err_sq == 0 else math.inf)
        if prefer == "auto" and ratio > 1.0:
            return False
        self._qs, self._qd, self._qmw = (torch.cat([p[i] for p in parts]) for i in range(3))
        self._bits = 4 if qtype in _INT4_OFFSET else 8
        self._mode = "qmm"
        how = "" if qtype in _INT4_OFFSET or qtype == T.Q8_0 else f"; requantized per 32-block, err {ratio:.2f}x own"
        self.kind = f"{name}->qmm{self._bits} (avx512-vnni, int8 activations{how})"
        return True

    def _set_dense(self, t: torch.Tensor, device: torch.device, kind: str) -> None:
        N, K, r = self.out_features, self.in_features, 0
        self._weight = torch.empty(N, K, dtype=self.compute_dtype, device=device)  # [N, K]
        for n, tb in _row_chunks(t, self._qtype, N, K):  # bounded fp32 temporaries
            self._weight[r:r + n] = _dequant_t(tb.to(device), self._qtype, n * K).view(n, K)
            r += n
        self._mode, self.kind = "dense", kind

    def _build_gpu(self, t: torch.Tensor, device: torch.device, keep_raw: bool = True) -> None:
        N, K, cdt, name = self.out_features, self.in_features, self.compute_dtype, _name(self._qtype)
        self._raw = t.to(device)
        if device.type == "cuda" and self._qtype in _INT4_OFFSET and cdt == torch.bfloat16 and N % 8 == 0:
            try:  # tinygemm: uint8 [N, K/2] with the even-k element in the high nibble
                codes, S, zero = _int4_parts(self._raw, self._qtype, N, K)
                self._raw = t if keep_raw else None  # CPU reference, only for dequantized(): no second GPU copy
                inner = 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2
                u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
                self._qweight = torch.ops.aten._convert_weight_to_int4pack(u8, inner)
                self._sz = torch.stack([S, zero], -1).transpose(0, 1).contiguous().to(cdt)
                self._mode = "int4cuda"
                # self-check once at load: the packing convention is not testable here
                x = torch.randn(4, K, device=device, dtype=cdt)
                ref = x.float() @ self.dequantized().T
                err = (self._mm(x).float() - ref).abs().max()
                if err <= 2e-2 * ref.abs().max() + 1e-6:
                    self.kind = f"{name}->int4pack(g32, cuda tinygemm; scale/zero in bfloat16)"
                    return
            except Exception:  # op missing for this GPU/build, or shape rejected
                pass
        self._qweight = self._sz = None
        self._raw = t.to(device)
        self._mode, self.kind = "deq", f"{name}->dequant-per-call {str(cdt).replace('torch.', '')}"

    def _mm(self, x: torch.Tensor) -> torch.Tensor:  # x: [M, K] contiguous -> [M, N]
        m = self._mode
        if m == "qmm":  # NOTE: first: the usual CPU case, called ~100x per token
            return torch.ops.mistralrs.qmm(x, self._qs, self._qd, self._qmw, self._bits)
        if m == "dense":
            return F.linear(x, self._weight)
        if m == "int4":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self._qweight, 32, self._sz)
        if m == "int8":
            if x.shape[0] >= _INT8_DENSE_ROWS and x.device.type == "cpu":
                return self._int8_by_chunks(x)
            return torch.ops.aten._weight_int8pack_mm(x, self._w8, self._s8)
        if m == "int4cuda":
            return torch.ops.aten._weight_int4pack_mm(x, self._qweight, 32, self._sz)
        # deq: raw GGUF bytes live on the device; dequantize the whole weight each call
        W = _dequant_t(self._raw, self._qtype, self.out_features * self.in_features)
        return F.linear(x, W.view(self.out_features, -1).to(self.compute_dtype))

    def _int8_by_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """x: [M, K] -> [M, N]: the int8 rows converted to the compute dtype a block at a time (the
        block stays in cache) and multiplied densely, then scaled per row. NOTE: the int8 kernel
        redoes its conversion for every 4 rows of x; for 16 rows (a batch of 16 decoding
        sequences through a 49k-row output head) this is ~2x faster, for 8 rows ~1.3x."""
        N = self.out_features
        # NOTE: no out= (torch.compile would break the graph there); the cat is one small copy
        parts = [torch.mm(x, self._w8[i : i + _INT8_BLOCK_ROWS].to(x.dtype).t()) for i in range(0, N, _INT8_BLOCK_ROWS)]
        return torch.cat(parts, dim=1).mul_(self._s8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: decode calls this ~100x per token; every avoided op saves ~1-2 us
        if self._mode == "qmm" and self.bias is None and x.dim() == 2 and x.dtype == self.compute_dtype:
            return torch.ops.mistralrs.qmm(x, self._qs, self._qd, self._qmw, self._bits)  # the usual CPU case
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        if self._mode == "dense":
            return F.linear(x, self._weight, self.bias)  # x: [..., K] -> [..., N]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # x2: [M, K]; the kernels want it 2-D contiguous
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self._mm(x2) if x2.shape[0] else x2.new_empty(0, self.out_features)  # y: [M, N]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, self.out_features)

    def forward_f32(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with float32 output; our kernels then skip the rounding to bf16 (the output
        head: see CausalLM.logits)."""
        if self._mode == "qmm" and self.bias is None and x.dim() == 2:
            return torch.ops.mistralrs.qmm(x.to(self.compute_dtype), self._qs, self._qd, self._qmw, self._bits, True)
        return self(x).float()

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 effective weight (what forward multiplies by)."""
        N, K, m = self.out_features, self.in_features, self._mode
        if m == "dense":
            return self._weight.float()
        if m == "int8":
            return self._w8.float() * self._s8.float()[:, None]
        if m == "qmm":
            return qmatmul.dequantize(self._qs, self._qd, self._qmw, self._bits)
        if m in ("int4", "int4cuda"):
            if self._raw is None:
                raise RuntimeError("dequantized() needs the raw blocks: build with keep_raw=True")
            codes, _, _ = _int4_parts(self._raw, self._qtype, N, K)  # codes: [N, K]
            sz = self._sz.float().to(codes.device)  # [K/32, N, 2], rounded as the kernel sees it
            w = (codes - 8).float().view(N, K // 32, 32) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
            return w.view(N, K).to(self._sz.device)
        return _dequant_t(self._raw, self._qtype, N * K).view(N, K).to(self.compute_dtype).float()


class QuantEmbedding(torch.nn.Module):
    """Embedding table kept as raw GGUF bytes ([V, row_bytes] uint8 on ``device``; on CPU it
    shares memory with ``raw``, e.g. the GGUF memmap).  forward(ids [...]) -> [..., dim] in
    compute_dtype, dequantizing only the gathered rows (bit-exact, then cast).
    Tied lm_head: ``as_linear()`` builds a QuantLinear from the same bytes.  NOTE: the kernel
    formats are not row-gatherable, so the lm_head holds its own packed copy (~0.6 B/param
    for Q4, 1 B/param for int8) next to these raw bytes -- still below one dense bf16 copy."""

    def __init__(self, raw_rows: torch.Tensor, qtype: int, num_embeddings: int, dim: int,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.raw, self.qtype = raw_rows, qtype  # raw: [V, row_bytes] uint8
        self.num_embeddings, self.embedding_dim, self.compute_dtype = num_embeddings, dim, compute_dtype

    @classmethod
    def from_gguf(cls, raw, qtype, shape: tuple[int, int], compute_dtype: torch.dtype,
                  device: torch.device) -> "QuantEmbedding":
        V, D = shape
        t = _to_u8(raw, torch.device(device))
        _check_size(t, int(qtype), V * D)
        return cls(t.view(V, -1), int(qtype), V, D, compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(self.raw.device)
        rows = self.raw.index_select(0, flat)  # rows: [n, row_bytes]
        w = _dequant_t(rows.reshape(-1), self.qtype, flat.numel() * self.embedding_dim)
        return w.view(*ids.shape, self.embedding_dim).to(self.compute_dtype)

    def dequantized(self) -> torch.Tensor:  # [V, dim] float32
        V, D = self.num_embeddings, self.embedding_dim
        return _dequant_t(self.raw.reshape(-1), self.qtype, V * D).view(V, D)

    def as_linear(self, bias: torch.Tensor | None = None, **kw) -> QuantLinear:
        return QuantLinear.from_gguf(self.raw.cpu().numpy(), self.qtype,
                                     (self.num_embeddings, self.embedding_dim),
                                     self.compute_dtype, self.raw.device, bias, **kw)


if __name__ == "__main__":  # timing: python -m mistralrs_py.models.quant
    import time
    import gguf

    torch.set_num_threads(1)
    torch.manual_seed(0)

    def bench(f, n):  # best of 5 rounds (the machine is shared): microseconds per call
        for _ in range(5):
            f()
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                f()
            best = min(best, (time.perf_counter() - t0) / (n // 5) * 1e6)
        return best

    cases = [(T.Q4_1, 576, 1536, "auto"), (T.Q4_1, 1536, 576, "auto"), (T.Q4_K, 576, 1536, "auto"),
             (T.Q5_0, 576, 1536, "auto"), (T.Q8_0, 576, 1536, "auto"), (T.Q8_0, 576, 1536, "fast"),
             (T.Q6_K, 576, 1536, "auto"), (T.Q4_1, 4096, 4096, "auto")]
    for qt, N, K, prefer in cases:
        W = torch.randn(N, K) * 0.02
        if qt in (T.Q4_K, T.Q6_K):  # no python quantizer for K-quants: random blocks, sane d/dmin
            bs, ts = GGML_QUANT_SIZES[qt]
            raw = np.random.randint(0, 256, (N * K // bs, ts), dtype=np.uint8)
            for p in ((0, 2) if qt == T.Q4_K else (208,)):
                raw[:, p:p + 2] = np.full((len(raw), 1), 1e-3, np.float16).view(np.uint8)
        else:
            raw = gguf.quants.quantize(W.numpy(), qt)
        ql = QuantLinear.from_gguf(raw, qt, (N, K), torch.bfloat16, torch.device("cpu"), prefer=prefer)
        Wd = dequantize(raw, qt, (N, K)).to(torch.bfloat16)
        for M in (1, 8):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            n = 20 if N * K > 4e6 else 200
            tq, td = bench(lambda: ql(x), n), bench(lambda: F.linear(x, Wd), n)
            print(f"{qt.name:4s} W[{N}x{K}] x[{M}x{K}]: {ql.kind:52s} {tq:7.1f} us | "
                  f"dense bf16 F.linear {td:7.1f} us | speed-up {td / tq:4.2f}x")
