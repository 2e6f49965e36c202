"""GGUF weights kept quantized in memory: the layers the GGUF loader builds.

  * ``QuantLinear`` -- linear layer whose weight stays quantized; the kernel (quant_kernels.py) is
    chosen once, per (qtype, compute dtype, device), and reported in ``.kind``.
  * ``QuantEmbedding`` -- embedding table kept as raw GGUF bytes; dequantizes gathered rows.

The block formats themselves (decoding, bit-exact dequantization) live in ggml_blocks.py.
"""

from __future__ import annotations

import numpy as np
import torch

from . import qmatmul
from .ggml_blocks import DENSE_TYPES, INT4_OFFSET, check_size, dequantize_bytes, to_u8, type_name
from .quant_kernels import (
    HAS_INT4_CPU,
    HAS_INT8_CPU,
    Dense,
    DequantPerCall,
    Int4Cpu,
    Int4Cuda,
    Int8,
    Qmm,
    QuantKernel,
)

_PREFER = ("auto", "fast", "exact", "dense", "kernel")


class QuantLinear(torch.nn.Module):
    """y = x @ W.T (+ bias) with W kept quantized in `kernel`.  Build it on its target device; do
    not ``.to()`` it afterwards (the packed formats are device specific).  Attributes:
    ``in_features``, ``out_features``, ``kind`` (kernel description), ``compute_dtype``."""

    def __init__(self, kernel: QuantKernel, bias: torch.Tensor | None = None):
        super().__init__()
        self.kernel = kernel
        self.in_features, self.out_features = kernel.in_features, kernel.out_features
        self.compute_dtype = kernel.compute_dtype
        self.bias = None if bias is None else bias.detach().to(self.compute_dtype)
        # NOTE: the decode hot path (the usual CPU case, called ~100x per token): our qmm op's
        # arguments when it is the kernel and there is no bias, so forward checks one attribute
        # and calls the op.
        self._qmm = (kernel.qs, kernel.d, kernel.mw, kernel.bits) if isinstance(kernel, Qmm) and bias is None else None

    @property
    def kind(self) -> str:
        return self.kernel.kind

    @classmethod
    def from_gguf(
        cls,
        raw: np.ndarray,
        qtype: int,
        shape: tuple[int, int],
        compute_dtype: torch.dtype,
        device: torch.device,
        bias: torch.Tensor | None = None,
        *,
        prefer: str = "auto",
        keep_raw: bool = True,
    ) -> "QuantLinear":
        """raw: GGUF bytes of a [out, in] weight.  prefer: "auto" (our int8-activation kernels
        where the CPU has them, in any compute dtype; else int4pack where exact; int8
        requantization only where its error is <= the format's own rounding error (rms), else
        dense), "fast" (always requantize to int8 when no exact kernel), "exact" (never
        requantize), "dense" (always dense), "kernel" ("fast" even for float32 -- slow on CPU,
        for tests).  keep_raw=False drops the reference to `raw` kept for dequantized() of packed
        int4 weights, so a memory-mapped file can be unmapped once the model is loaded."""
        qtype, device = int(qtype), torch.device(device)
        if prefer not in _PREFER:
            raise ValueError(f"prefer={prefer!r}")
        N, K = shape
        t = to_u8(raw)  # CPU, shares memory with raw
        check_size(t, qtype, N * K)
        kernel = choose_kernel(t, qtype, N, K, compute_dtype, device, prefer, keep_raw)
        return cls(kernel, None if bias is None else bias.to(device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: decode calls this ~100x per token; every avoided op saves ~1-2 us
        qmm = self._qmm
        if qmm is not None and x.dim() == 2 and x.dtype == self.compute_dtype:
            return torch.ops.mistralrs.qmm(x, *qmm)  # x: [M, K] -> [M, N]
        if x.dtype != self.compute_dtype:
            x = x.to(self.compute_dtype)
        return self.kernel.linear(x, self.bias)  # x: [..., K] -> [..., N]

    def forward_f32(self, x: torch.Tensor) -> torch.Tensor:
        """forward() with float32 output; our kernels then skip the rounding to bf16 (the output
        head: see CausalLM.logits)."""
        if self.kernel.f32_out and self.bias is None and x.dim() == 2:
            return self.kernel.mm_f32(x.to(self.compute_dtype))
        return self(x).float()

    def dequantized(self) -> torch.Tensor:
        """[out, in] float32 effective weight (what forward multiplies by)."""
        return self.kernel.dequantized()


class QuantEmbedding(torch.nn.Module):
    """Embedding table kept as raw GGUF bytes ([V, row_bytes] uint8 on ``device``; on CPU it
    shares memory with ``raw``, e.g. the GGUF memmap).  forward(ids [...]) -> [..., dim] in
    compute_dtype, dequantizing only the gathered rows (bit-exact, then cast).
    Tied lm_head: ``as_linear()`` builds a QuantLinear from the same bytes.  NOTE: the kernel
    formats are not row-gatherable, so the lm_head holds its own packed copy (~0.6 B/param
    for Q4, 1 B/param for int8) next to these raw bytes -- still below one dense bf16 copy."""

    def __init__(self, raw_rows: torch.Tensor, qtype: int, num_embeddings: int, dim: int, compute_dtype: torch.dtype):
        super().__init__()
        self.raw, self.qtype = raw_rows, qtype  # raw: [V, row_bytes] uint8
        self.num_embeddings, self.embedding_dim, self.compute_dtype = num_embeddings, dim, compute_dtype

    @classmethod
    def from_gguf(
        cls, raw, qtype, shape: tuple[int, int], compute_dtype: torch.dtype, device: torch.device
    ) -> "QuantEmbedding":
        V, D = shape
        t = to_u8(raw, torch.device(device))
        check_size(t, int(qtype), V * D)
        return cls(t.view(V, -1), int(qtype), V, D, compute_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).to(self.raw.device)
        rows = self.raw.index_select(0, flat)  # rows: [n, row_bytes]
        w = dequantize_bytes(rows.reshape(-1), self.qtype, flat.numel() * self.embedding_dim)
        return w.view(*ids.shape, self.embedding_dim).to(self.compute_dtype)

    def dequantized(self) -> torch.Tensor:  # [V, dim] float32
        V, D = self.num_embeddings, self.embedding_dim
        return dequantize_bytes(self.raw.reshape(-1), self.qtype, V * D).view(V, D)

    def as_linear(self, bias: torch.Tensor | None = None, **kw) -> QuantLinear:
        return QuantLinear.from_gguf(
            self.raw.cpu().numpy(),
            self.qtype,
            (self.num_embeddings, self.embedding_dim),
            self.compute_dtype,
            self.raw.device,
            bias,
            **kw,
        )


def choose_kernel(
    t: torch.Tensor,
    qtype: int,
    N: int,
    K: int,
    compute_dtype: torch.dtype,
    device: torch.device,
    prefer: str,
    keep_raw: bool,
) -> QuantKernel:
    """The kernel for a GGUF weight [N, K] (t: its raw bytes on the CPU), as quant_kernels' docstring
    lays out; `prefer` as QuantLinear.from_gguf takes it."""
    cdt, name = compute_dtype, type_name(qtype)
    dt = str(cdt).replace("torch.", "")
    if qtype in DENSE_TYPES or prefer == "dense":
        return Dense.build(t, qtype, N, K, cdt, device, f"{name}->dense {dt}")
    if device.type != "cpu":
        k = None
        if device.type == "cuda" and qtype in INT4_OFFSET and cdt == torch.bfloat16 and N % 8 == 0:
            k = Int4Cuda.build(t, qtype, N, K, cdt, device, keep_raw)
        return k if k is not None else DequantPerCall(t.to(device), qtype, N, K, cdt)
    if (
        prefer in ("auto", "fast")
        and cdt in (torch.bfloat16, torch.float16, torch.float32)
        and N % 16 == 0
        and K % 32 == 0
        and qmatmul.available()
    ):
        k = Qmm.build(t, qtype, N, K, cdt, prefer)
        if k is not None:
            return k  # NOTE: the hand-written kernels (qmatmul.cpp) are 4-5x torch's at decode sizes
    if not (cdt == torch.bfloat16 or prefer == "kernel"):
        return Dense.build(
            t, qtype, N, K, cdt, device, f"{name}->dense {dt} (exact; cpu int kernels have no fast {dt} path)"
        )
    if qtype in INT4_OFFSET and N % 16 == 0 and HAS_INT4_CPU:
        return Int4Cpu.build(t, qtype, N, K, cdt, keep_raw)
    if qtype in INT4_OFFSET or prefer == "exact" or K % 16 or not HAS_INT8_CPU:
        # NOTE: int4pack needs N % 16 == 0; the bf16 int8 kernel returns garbage (or
        # segfaults) when K % 16 != 0 (never the case for GGUF block sizes, but guard anyway)
        why = (
            ("N%16!=0" if HAS_INT4_CPU else "no int4 kernel")
            if qtype in INT4_OFFSET
            else ("exact" if prefer == "exact" else "no int8 kernel")
        )
        return Dense.build(t, qtype, N, K, cdt, device, f"{name}->dense {dt} ({why})")
    return Int8.build(t, qtype, N, K, cdt, device, prefer)
