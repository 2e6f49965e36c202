"""Fusing linear layers that read the same input (q/k/v, gate/up) into one module and one matmul."""

from __future__ import annotations

import torch
from torch import nn

from .layers import Linear
from .quant import QuantLinear


def fuse_linears(mods: list[nn.Module]) -> nn.Module | None:
    """One module whose output is the concatenation of `mods`' outputs, or None when they cannot
    be joined (different kinds, kernels or dtypes). The result is checked against the parts on a
    random input, so a packed format that does not concatenate row-wise is never fused."""
    if all(type(m) in (nn.Linear, Linear) for m in mods):
        fused = _fuse_dense(mods)
    elif all(isinstance(m, QuantLinear) for m in mods):
        fused = _fuse_quant(mods)
    else:
        return None
    if fused is None or not _agrees(fused, mods):
        return None
    return fused


def _fuse_dense(mods: list[nn.Linear]) -> nn.Linear | None:
    w = mods[0].weight
    if any(
        m.weight.dtype != w.dtype or m.weight.device != w.device or m.in_features != mods[0].in_features for m in mods
    ):
        return None
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return None
    out = Linear(mods[0].in_features, sum(m.out_features for m in mods), bias=all(has_bias), device="meta")
    out.weight = nn.Parameter(torch.cat([m.weight for m in mods]), requires_grad=False)
    if all(has_bias):
        out.bias = nn.Parameter(torch.cat([m.bias for m in mods]), requires_grad=False)
    return out


def _fuse_quant(mods: list[QuantLinear]) -> QuantLinear | None:
    first = mods[0]
    kernel_type = type(first.kernel)
    if any(
        type(m.kernel) is not kernel_type
        or m.compute_dtype != first.compute_dtype
        or m.in_features != first.in_features
        for m in mods
    ):
        return None
    has_bias = [m.bias is not None for m in mods]
    if any(has_bias) and not all(has_bias):
        return None
    bias = torch.cat([m.bias for m in mods]) if all(has_bias) else None
    kernel = kernel_type.cat([m.kernel for m in mods])  # None where the packed layout cannot be joined
    return None if kernel is None else QuantLinear(kernel, bias)


def _dtype_device(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    if isinstance(m, nn.Linear):
        return m.weight.dtype, m.weight.device
    return m.compute_dtype, m.kernel.device


@torch.inference_mode()
def _agrees(fused: nn.Module, mods: list[nn.Module]) -> bool:
    dtype, device = _dtype_device(mods[0])
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(3, mods[0].in_features, generator=g).to(device=device, dtype=dtype)
    want = torch.cat([m(x) for m in mods], dim=-1).float()
    got = fused(x).float()
    # NOTE: kernels may block a wider matmul differently (last-bit differences); a wrong layout
    # would be off by the size of the values themselves.
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-2, atol=1e-3 * float(want.abs().max())))
