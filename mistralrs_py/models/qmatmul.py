"""Hand-written CPU quantized matmuls (``csrc/qmatmul.cpp``): 4- and 8-bit weights times
int8-quantized activations with AVX-512 VNNI, or AVX2 where the CPU has no VNNI, the way llama.cpp
multiplies them.

The op ``mistralrs::qmm`` is built with our other kernels (``kernels.py``). Without a compiler, on a
CPU with neither AVX-512 VNNI nor AVX2 (with FMA and F16C), or with ``MISTRALRS_QMATMUL=0`` (or ``MISTRALRS_KERNELS=0``),
``available()`` is False and ``QuantLinear`` keeps torch's own int4/int8 kernels.

Packing (see the layout comment at the top of qmatmul.cpp):
  * ``pack_q4(codes, S, Z)``: w = S * code + Z per 32-block, codes 0..15 -> (qs, d, mw).
  * ``pack_q8(q, S)``: w = S * q per 32-block, q int8 -> (qs, d, mw).
"""

from __future__ import annotations

import os

import torch

from . import kernels


def available() -> bool:
    """Whether ``mistralrs::qmm`` serves: the kernels built (``kernels.available()``, which
    compiles them on first call), a CPU with AVX-512 VNNI or AVX2, and ``MISTRALRS_QMATMUL`` not 0.
    Never raises."""
    return not why_unavailable()


def why_unavailable() -> str:
    if os.environ.get("MISTRALRS_QMATMUL", "1") == "0":
        return "MISTRALRS_QMATMUL=0"
    if not kernels.available():
        return kernels.why_unavailable()
    if not torch.ops.mistralrs.qmm_supported():
        return "this CPU has neither AVX-512 VNNI nor AVX2"
    return ""


def isa() -> str:
    """The instruction set the kernels were built for: "avx512-vnni", "avx2", or "" when off."""
    return torch.ops.mistralrs.qmm_isa() if available() else ""


def pack_q4(codes: torch.Tensor, S: torch.Tensor, Z: torch.Tensor):
    """codes [N, K] 0..15, S/Z [N, K/32] float32 with w = S * code + Z -> (qs, d, mw) in the
    kernel's layout, or None when S or Z do not fit float16."""
    N, K = codes.shape
    c = codes.to(torch.uint8).view(N // 16, 16, K // 8, 2, 4).permute(0, 2, 1, 4, 3)  # [g, c, i, t, lo/hi]
    qs = (c[..., 0] | (c[..., 1] << 4)).reshape(N // 16, K * 8).contiguous()
    d, mw = S.to(torch.float16), Z.to(torch.float16)
    if not (_fits_half(S, d) and _fits_half(Z, mw)):
        return None
    return qs, _groups(d), _groups(mw)


def pack_q8(q: torch.Tensor, S: torch.Tensor):
    """q [N, K] int8, S [N, K/32] float32 with w = S * q -> (qs, d, mw) in the kernel's layout, or
    None when S does not fit float16 (round S to float16 before quantizing against it)."""
    N, K = q.shape
    d = S.to(torch.float16)
    if not _fits_half(S, d):
        return None
    # NOTE: mw undoes the kernel's +128 on the activations: sum (xq + 128) w = sum xq w + 128 sum w
    mw = -128.0 * d.float() * q.view(N, K // 32, 32).sum(-1, dtype=torch.int32).float()
    qs = q.view(N // 16, 16, K // 4, 4).permute(0, 2, 1, 3).reshape(N // 16, K * 16).contiguous()
    return qs, _groups(d), _groups(mw)


def _groups(t: torch.Tensor) -> torch.Tensor:  # [N, NB] -> [N/16, NB, 16]
    N, NB = t.shape
    return t.view(N // 16, 16, NB).transpose(1, 2).contiguous()


def _rows(t: torch.Tensor) -> torch.Tensor:  # [N/16, NB, 16] -> [N, NB] float32
    G, NB, _ = t.shape
    return t.transpose(1, 2).reshape(G * 16, NB).float()


def dequantize(qs: torch.Tensor, d: torch.Tensor, mw: torch.Tensor, bits: int) -> torch.Tensor:
    """The effective weight [N, K] float32 of a packed (qs, d, mw): what qmm multiplies by, up to
    the activations' own quantization."""
    G, NB = d.shape[0], d.shape[1]
    N, K = G * 16, NB * 32
    if bits == 4:
        b = qs.view(G, K // 8, 16, 4)
        codes = torch.stack([b & 15, b >> 4], -1).permute(0, 2, 1, 4, 3).reshape(N, NB, 32)
        return (codes.float() * _rows(d)[..., None] + _rows(mw)[..., None]).view(N, K)
    q = qs.view(G, K // 4, 16, 4).permute(0, 2, 1, 3).reshape(N, NB, 32)
    return (q.float() * _rows(d)[..., None]).view(N, K)


def _fits_half(x: torch.Tensor, h: torch.Tensor) -> bool:
    # finite, and rounded to float16's precision (GGUF's own fp16 scales convert exactly; tiny
    # products such as a K-quant's d * sc may land on fp16 subnormals, off by at most 2^-25)
    hf = h.float()
    return bool(torch.isfinite(hf).all()) and bool(((hf - x).abs() <= x.abs() * 2.0**-10 + 2.0**-24).all())
