"""The kernels a `QuantLinear` multiplies with: one class per way of keeping a GGUF weight W [N, K],
each owning its packed tensors; `quant.choose_kernel` picks one, once, at load.

Each kernel has `mm(x)` (x: [M, K] contiguous in the compute dtype, M >= 1 -> [M, N]), `linear(x,
bias)` (any leading shape), `dequantized()` (the effective [N, K] float32 weight), `cat(parts)`
(the row-wise concatenation of several, for fused projections; None where the layout does not
allow it), `kind` (what the layer reports), and `mm_f32(x)` where `f32_out` (float32 output).

Kernel choice on CPU (measured, torch 2.13, AVX512, 1 thread; see ``bench/quant_kernels.py``):
  * on a CPU with AVX-512 VNNI or AVX2 (``qmatmul.available()``; prefer "auto"/"fast"), any compute
      dtype (float32 activations too, as llama.cpp's CPU path): our own kernels (qmatmul.cpp,
      `Qmm`): int8 activations per 32-block against 4-bit codes (Q4_0/Q4_1/Q4_K, exact) or int8
      codes (Q8_0 exact; other formats requantized per 32-block under the same error rule as
      below). VNNI: 4-5x torch's int4 kernel at one row; AVX2 (vpmaddubsw): 4x torch's int4 kernel
      at every batch size and ahead of dense bf16 and float32 from one row to prompt-sized
      batches. Needs out_features % 16 == 0. prefer "dense" (the pipelines' `--dtype float32`)
      keeps every layer exact instead.  Otherwise torch's kernels:
  * compute bf16:
      Q4_0 / Q4_1 / Q4_K -> ``_weight_int4pack_mm_for_cpu`` (group 32, `Int4Cpu`).  The mapping is
        exact; only the per-group scale/zero are rounded to bf16 (the kernel wants them in x's
        dtype).  Needs out_features % 16 == 0, else dense bf16.
      Q5_0 / Q5_1 / Q5_K / Q8_0 / Q2_K / Q3_K / Q6_K -> ``_weight_int8pack_mm`` (`Int8`) after a
        one-off requantization to int8 with one scale per output row (lossy: |err| <= ~rowmax/254),
        *if* that adds at most the format's own rounding error (rms), else dense bf16.  In
        practice Q5_x/Q2_K/Q3_K -> int8, Q6_K -> int8 unless rows have strong outliers, Q8_0 ->
        dense (per-32 scales always beat a per-row scale).  ``prefer="fast"`` always
        requantizes, ``"exact"`` never does.
      F32 / F16 / BF16 -> dense bf16 ``F.linear`` (`Dense`).
  * compute float32 / float16 without our kernels: dense ``F.linear`` on the exact dequantized weight.
    NOTE: torch's int4/int8 CPU kernels only have a vectorised path for bfloat16; for
    float32/float16 they run a scalar loop that is 20-50x slower than a dense matmul.
  * NOTE: the int kernels re-dequantize the weight for every 4 rows of x with fp32 FMAs, so
    they beat dense bf16 only for M <= ~4 (decode: 1.4x on 576x1536, 3x on 4096x4096); at
    M = 8 they are ~0.7x, and ~0.4x for prefill-sized M. So from 8 rows on, int8 weights are
    converted to bf16 one cache-sized block at a time and multiplied densely (~2x the int8 kernel
    at 16 rows); int4pack has no such way out (its packed layout is opaque).
CUDA: Q4_0/Q4_1/Q4_K with bf16 -> tinygemm ``_weight_int4pack_mm`` (`Int4Cuda`, self-checked at
load against the dequantized weight, falls back if it disagrees); everything else keeps the raw
GGUF bytes on the GPU and dequantizes per call (`DequantPerCall`).  Other devices: dequant-per-call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from torch import Tensor

from . import qmatmul
from .ggml_blocks import INT4_OFFSET, decode_blocks, dequantize_bytes, int4_parts, row_chunks, type_name

# NOTE: the *_for_cpu int4 ops appeared in torch 2.6 (pyproject allows >= 2.4): probe, don't assume
HAS_INT4_CPU = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
HAS_INT8_CPU = hasattr(torch.ops.aten, "_weight_int8pack_mm")
_INT8_DENSE_ROWS = 8  # from this many rows of x, int8 weights are converted by blocks (see Int8._by_blocks)
_INT8_BLOCK_ROWS = 8192


class QuantKernel:
    """y = x @ W.T for one packed form of W [N, K] on one device, in `compute_dtype`."""

    f32_out = False  # whether mm_f32 exists: the float32 accumulators, not rounded to the compute dtype

    def __init__(
        self, out_features: int, in_features: int, compute_dtype: torch.dtype, device: torch.device, kind: str
    ):
        self.out_features, self.in_features, self.compute_dtype = out_features, in_features, compute_dtype
        self.device, self.kind = device, kind

    def mm(self, x: Tensor) -> Tensor:  # x: [M, K] contiguous, M >= 1 -> [M, N]
        raise NotImplementedError

    def mm_f32(self, x: Tensor) -> Tensor:  # mm() with float32 output (only where f32_out)
        raise NotImplementedError

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        """x: [..., K] in the compute dtype -> [..., N] (+ bias)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # x2: [M, K]; the kernels want it 2-D contiguous
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        y = self.mm(x2) if x2.shape[0] else x2.new_empty(0, self.out_features)  # y: [M, N]
        if bias is not None:
            y = y + bias
        return y.view(*lead, self.out_features)

    def dequantized(self) -> Tensor:  # [N, K] float32: the weight mm multiplies by
        raise NotImplementedError

    @classmethod
    def cat(cls, parts: list["QuantKernel"]) -> "QuantKernel | None":
        """One kernel whose output is the parts' outputs side by side (parts of this class, same K
        and compute dtype), or None when the packed layout does not concatenate by rows."""
        return None

    def tensors(self) -> list[Tensor]:
        """The tensors this kernel holds (memory accounting)."""
        return [v for v in vars(self).values() if isinstance(v, Tensor)]


class Dense(QuantKernel):
    """The exactly dequantized weight in the compute dtype, through F.linear."""

    def __init__(self, weight: Tensor, kind: str):
        N, K = weight.shape
        super().__init__(N, K, weight.dtype, weight.device, kind)
        self.weight = weight  # [N, K]

    @classmethod
    def build(
        cls, t: Tensor, qtype: int, N: int, K: int, compute_dtype: torch.dtype, device: torch.device, kind: str
    ) -> "Dense":
        weight, r = torch.empty(N, K, dtype=compute_dtype, device=device), 0
        for n, tb in row_chunks(t, qtype, N, K):  # bounded fp32 temporaries
            weight[r : r + n] = dequantize_bytes(tb.to(device), qtype, n * K).view(n, K)
            r += n
        return cls(weight, kind)

    def linear(self, x: Tensor, bias: Tensor | None) -> Tensor:
        return F.linear(x, self.weight, bias)  # x: [..., K] -> [..., N]

    def mm(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)

    def dequantized(self) -> Tensor:
        return self.weight.float()

    @classmethod
    def cat(cls, parts: list["Dense"]) -> "Dense":
        return cls(torch.cat([p.weight for p in parts]), parts[0].kind)


class Qmm(QuantKernel):
    """Our AVX-512 VNNI / AVX2 kernels (qmatmul.cpp): 4- or 8-bit codes with float16 scales and offsets per
    32-block, times int8-quantized activations. (qs, d, mw) as qmatmul.pack_q4/pack_q8 make them."""

    f32_out = True

    def __init__(self, qs: Tensor, d: Tensor, mw: Tensor, bits: int, compute_dtype: torch.dtype, kind: str):
        super().__init__(d.shape[0] * 16, d.shape[1] * 32, compute_dtype, qs.device, kind)
        self.qs, self.d, self.mw, self.bits = qs, d, mw, bits

    @classmethod
    def build(cls, t: Tensor, qtype: int, N: int, K: int, compute_dtype: torch.dtype, prefer: str) -> "Qmm | None":
        """Q4_0/Q4_1/Q4_K as 4-bit codes with a float16 scale and offset per 32-block (exact for
        Q4_0/Q4_1); Q8_0 as its own int8 codes (exact); other formats requantized to int8 per
        32-block, if ("auto") that adds at most the format's own rounding error. None when a scale
        does not fit float16 or the error check fails."""
        name, ts = type_name(qtype), GGML_QUANT_SIZES[T(qtype)][1]
        parts, own_sq, err_sq = [], [0.0], 0.0
        for n, tb in row_chunks(t, qtype, N, K):
            if qtype in INT4_OFFSET:
                v, S, Z = decode_blocks(tb.view(-1, ts), qtype)  # w = S * v (+ Z), v + offset in 0..15
                c = INT4_OFFSET[qtype]
                S = S.reshape(n, K // 32)
                mw = (Z.reshape(n, K // 32) if Z is not None else torch.zeros_like(S)) - c * S  # exact for Q4_0/Q4_1
                p = qmatmul.pack_q4((v + c).reshape(n, K), S, mw)
            elif qtype == T.Q8_0:
                v, S, _ = decode_blocks(tb.view(-1, ts), qtype)
                p = qmatmul.pack_q8(v.reshape(n, K).to(torch.int8), S.reshape(n, K // 32))
            else:
                W = dequantize_bytes(tb, qtype, n * K, own_sq).view(n, K // 32, 32)
                # NOTE: round the scale to float16 *before* quantizing against it
                s = (W.abs().amax(-1) / 127).half().float()
                s = torch.where(s > 0, s, torch.ones_like(s))
                q = torch.round(W / s[..., None]).clamp_(-128, 127)
                err_sq += (q * s[..., None] - W).double().square().sum().item()
                p = qmatmul.pack_q8(q.to(torch.int8).view(n, K), s)
            if p is None:
                return None
            parts.append(p)
        ratio = math.sqrt(err_sq / own_sq[0]) if own_sq[0] > 0 else (0.0 if err_sq == 0 else math.inf)
        if prefer == "auto" and ratio > 1.0:
            return None
        qs, d, mw = (torch.cat([p[i] for p in parts]) for i in range(3))
        bits = 4 if qtype in INT4_OFFSET else 8
        how = "" if qtype in INT4_OFFSET or qtype == T.Q8_0 else f"; requantized per 32-block, err {ratio:.2f}x own"
        return cls(qs, d, mw, bits, compute_dtype, f"{name}->qmm{bits} ({qmatmul.isa()}, int8 activations{how})")

    def mm(self, x: Tensor) -> Tensor:
        return torch.ops.mistralrs.qmm(x, self.qs, self.d, self.mw, self.bits)

    def mm_f32(self, x: Tensor) -> Tensor:
        return torch.ops.mistralrs.qmm(x, self.qs, self.d, self.mw, self.bits, True)

    def dequantized(self) -> Tensor:
        return qmatmul.dequantize(self.qs, self.d, self.mw, self.bits)

    @classmethod
    def cat(cls, parts: list["Qmm"]) -> "Qmm | None":
        first = parts[0]
        if any(p.bits != first.bits for p in parts):
            return None
        # NOTE: the packed layout keeps whole groups of 16 rows: rows concatenate
        qs, d, mw = (torch.cat([getattr(p, a) for p in parts]) for a in ("qs", "d", "mw"))
        return cls(qs, d, mw, first.bits, first.compute_dtype, first.kind)


class _Int4(QuantKernel):
    """torch's int4pack kernels (group 32): 4-bit codes with a scale and zero per group, w = (code - 8)
    * scale + zero. `raw` (the GGUF bytes, by reference) is kept only for dequantized()."""

    def __init__(self, qweight: Tensor, sz: Tensor, raw: Tensor | None, qtype: int, N: int, K: int, kind: str):
        super().__init__(N, K, sz.dtype, qweight.device, kind)
        self.qweight, self.sz = qweight, sz  # opaque packed uint8; sz: [K/32, N, 2] in the compute dtype
        self.raw, self.qtype = raw, qtype

    def dequantized(self) -> Tensor:
        N, K = self.out_features, self.in_features
        if self.raw is None:
            raise RuntimeError("dequantized() needs the raw blocks: build with keep_raw=True")
        codes, _, _ = int4_parts(self.raw, self.qtype, N, K)  # codes: [N, K]
        sz = self.sz.float().to(codes.device)  # [K/32, N, 2], rounded as the kernel sees it
        w = (codes - 8).float().view(N, K // 32, 32) * sz[..., 0].T[..., None] + sz[..., 1].T[..., None]
        return w.view(N, K).to(self.sz.device)

    @classmethod
    def cat(cls, parts: list["_Int4"]) -> "_Int4":
        # NOTE: packed rows are concatenated; fusion.fuse_linears checks the result against the parts
        first = parts[0]
        qweight, sz = torch.cat([p.qweight for p in parts]), torch.cat([p.sz for p in parts], dim=1)
        return cls(qweight, sz, None, first.qtype, sum(p.out_features for p in parts), first.in_features, first.kind)


class Int4Cpu(_Int4):
    @classmethod
    def build(cls, t: Tensor, qtype: int, N: int, K: int, compute_dtype: torch.dtype, keep_raw: bool) -> "Int4Cpu":
        # x: [M, K] @ packed [N, K/2] uint8 with scales_and_zeros [K/32, N, 2]
        packed, sz = [], []
        for n, tb in row_chunks(t, qtype, N, K):
            codes, S, zero = int4_parts(tb, qtype, n, K)  # codes: [n, K] int32 in 0..15
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2))
            sz.append(torch.stack([S, zero], -1))  # [n, K/32, 2]
        dt = str(compute_dtype).replace("torch.", "")
        kind = f"{type_name(qtype)}->int4pack(g32)" + (
            "" if compute_dtype == torch.float32 else f" (scale/zero in {dt})"
        )
        return cls(
            torch.cat(packed),
            torch.cat(sz).transpose(0, 1).contiguous().to(compute_dtype),
            t if keep_raw else None,
            qtype,
            N,
            K,
            kind,
        )

    def mm(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.qweight, 32, self.sz)


class Int4Cuda(_Int4):
    @classmethod
    def build(
        cls, t: Tensor, qtype: int, N: int, K: int, compute_dtype: torch.dtype, device: torch.device, keep_raw: bool
    ) -> "Int4Cuda | None":
        """tinygemm, self-checked once against the dequantized weight (the packing convention is not
        testable without a GPU); None when the op is missing, rejects the shape or disagrees.
        NOTE: the check reads the raw blocks (dequantized()), so with keep_raw=False it fails and
        the weight is dequantized per call instead."""
        try:  # tinygemm: uint8 [N, K/2] with the even-k element in the high nibble
            codes, S, zero = int4_parts(t.to(device), qtype, N, K)
            inner = 8 if K % 128 == 0 else 4 if K % 64 == 0 else 2
            u8 = ((codes[:, ::2] << 4) | codes[:, 1::2]).to(torch.uint8).contiguous()
            qweight = torch.ops.aten._convert_weight_to_int4pack(u8, inner)
            sz = torch.stack([S, zero], -1).transpose(0, 1).contiguous().to(compute_dtype)
            # NOTE: the CPU bytes as reference, only for dequantized(): no second GPU copy
            k = cls(
                qweight,
                sz,
                t if keep_raw else None,
                qtype,
                N,
                K,
                f"{type_name(qtype)}->int4pack(g32, cuda tinygemm; scale/zero in bfloat16)",
            )
            x = torch.randn(4, K, device=device, dtype=compute_dtype)
            ref = x.float() @ k.dequantized().T
            err = (k.mm(x).float() - ref).abs().max()
            if err <= 2e-2 * ref.abs().max() + 1e-6:
                return k
        except Exception:  # op missing for this GPU/build, or shape rejected
            pass
        return None

    def mm(self, x: Tensor) -> Tensor:
        return torch.ops.aten._weight_int4pack_mm(x, self.qweight, 32, self.sz)


class Int8(QuantKernel):
    """int8 codes with one scale per output row (a lossy requantization), torch's int8 kernel."""

    def __init__(self, w8: Tensor, s8: Tensor, kind: str):
        super().__init__(w8.shape[0], w8.shape[1], s8.dtype, w8.device, kind)
        self.w8, self.s8 = w8, s8  # [N, K] int8, [N] in the compute dtype

    @classmethod
    def build(
        cls, t: Tensor, qtype: int, N: int, K: int, compute_dtype: torch.dtype, device: torch.device, prefer: str
    ) -> "Int8 | Dense":
        """Requantized per row; with prefer "auto", dense instead when that adds more error than the
        format's own rounding."""
        w8, s8, own_sq, err_sq = [], [], [0.0], 0.0
        for n, tb in row_chunks(t, qtype, N, K):
            W = dequantize_bytes(tb, qtype, n * K, own_sq).view(n, K)
            # NOTE: round the scale to the compute dtype *before* quantizing against it
            s = (W.abs().amax(1) / 127).to(compute_dtype).float()
            s = torch.where(s > 0, s, torch.ones_like(s))
            q = torch.round(W / s[:, None]).clamp_(-128, 127)
            err_sq += (q * s[:, None] - W).double().square().sum().item()
            w8.append(q.to(torch.int8))
            s8.append(s.to(compute_dtype))
        # ratio = rms(requant error) / rms(format's own rounding error).  "auto" accepts
        # <= 1 (at most one more rounding of the file's own size: total error <= 1.41x).
        # NOTE: per-row int8 is coarser than per-block scales when rows have outliers.
        # Simulated ratios (gaussian .. heavy-tailed/outlier columns, K=576..14336):
        # Q8_0 1.4..5 (always dense), Q6_K 0.4..1.5, Q5_x 0.2..0.8, Q3_K/Q2_K < 0.2.
        ratio = math.sqrt(err_sq / own_sq[0]) if own_sq[0] > 0 else (0.0 if err_sq == 0 else math.inf)
        name, dt = type_name(qtype), str(compute_dtype).replace("torch.", "")
        if prefer == "auto" and ratio > 1.0:
            return Dense.build(
                t, qtype, N, K, compute_dtype, device, f"{name}->dense {dt} (int8 requant err {ratio:.2f}x own)"
            )
        return cls(torch.cat(w8), torch.cat(s8), f"{name}->int8(per-channel, requantized; err {ratio:.2f}x own)")

    def mm(self, x: Tensor) -> Tensor:
        if x.shape[0] >= _INT8_DENSE_ROWS and x.device.type == "cpu":
            return self._by_blocks(x)
        return torch.ops.aten._weight_int8pack_mm(x, self.w8, self.s8)

    def _by_blocks(self, x: Tensor) -> Tensor:
        """x: [M, K] -> [M, N]: the int8 rows converted to the compute dtype a block at a time (the
        block stays in cache) and multiplied densely, then scaled per row. NOTE: the int8 kernel
        redoes its conversion for every 4 rows of x; for 16 rows (a batch of 16 decoding
        sequences through a 49k-row output head) this is ~2x faster, for 8 rows ~1.3x."""
        N = self.out_features
        # NOTE: no out= (torch.compile would break the graph there); the cat is one small copy
        parts = [torch.mm(x, self.w8[i : i + _INT8_BLOCK_ROWS].to(x.dtype).t()) for i in range(0, N, _INT8_BLOCK_ROWS)]
        return torch.cat(parts, dim=1).mul_(self.s8)

    def dequantized(self) -> Tensor:
        return self.w8.float() * self.s8.float()[:, None]

    @classmethod
    def cat(cls, parts: list["Int8"]) -> "Int8":
        return cls(torch.cat([p.w8 for p in parts]), torch.cat([p.s8 for p in parts]), parts[0].kind)


class DequantPerCall(QuantKernel):
    """The raw GGUF bytes on the device, the whole weight dequantized at every call."""

    def __init__(self, raw: Tensor, qtype: int, N: int, K: int, compute_dtype: torch.dtype):
        dt = str(compute_dtype).replace("torch.", "")
        super().__init__(N, K, compute_dtype, raw.device, f"{type_name(qtype)}->dequant-per-call {dt}")
        self.raw, self.qtype = raw, qtype

    def mm(self, x: Tensor) -> Tensor:
        W = dequantize_bytes(self.raw, self.qtype, self.out_features * self.in_features)
        return F.linear(x, W.view(self.out_features, -1).to(self.compute_dtype))

    def dequantized(self) -> Tensor:
        N, K = self.out_features, self.in_features
        return dequantize_bytes(self.raw, self.qtype, N * K).view(N, K).to(self.compute_dtype).float()
