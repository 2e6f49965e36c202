"""XLoraLinear against the per-adapter formula of the spec (§4.1), plain and fused, in two dtypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mistralrs_py.lora.linear import Scalings, XLoraLinear

G = torch.Generator().manual_seed(0)


def naive(x, base, parts, lam, g=1.0):
    """parts: per output part, (rows, [(A_i, B_i, scale_i)], layer index); lam: [N, L, n]."""
    y = base(x)
    outs, off = [], 0
    for rows, adapters, layer in parts:
        part = y[:, off : off + rows].clone()
        for i, (a, b, scale) in enumerate(adapters):
            part += ((x * lam[:, layer, i : i + 1]) @ a.T) @ b.T * scale * g
        outs.append(part)
        off += rows
    return torch.cat(outs, dim=1)


def make(in_f, part_rows, ranks, layers, layerwise, dtype=torch.float32, lora_dtype=torch.float32, small_rows_op=None):
    base = nn.Linear(in_f, sum(part_rows), bias=True).to(dtype)
    nn.init.normal_(base.weight, generator=G)
    parts, a_all, b_blocks = [], [], []
    R = sum(ranks)
    b = torch.zeros(sum(part_rows), R * len(part_rows))
    off = 0
    for j, (rows, layer) in enumerate(zip(part_rows, layers)):
        adapters = [(torch.randn(r, in_f, generator=G), torch.randn(rows, r, generator=G), 0.5 + i) for i, r in enumerate(ranks)]
        parts.append((rows, adapters, layer))
        a_all.append(torch.cat([a for a, _, _ in adapters]))
        b[off : off + rows, j * R : (j + 1) * R] = torch.cat([bb * s for _, bb, s in adapters], dim=1)
        off += rows
    sc = Scalings()
    lin = XLoraLinear(base, torch.cat(a_all).to(lora_dtype), b.to(lora_dtype), sc,
                      rows=list(layers) if layerwise else [0] * len(layers), indices=list(layers), small_rows_op=small_rows_op)
    rank_index = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
    return lin, base, parts, sc, rank_index


def cpu_op(name):
    """None: torch ops; "lora_add_": decode rows through our CPU op (models/csrc/linear.cpp)."""
    if name is None:
        return None
    from mistralrs_py.models import kernels

    if not kernels.available():
        pytest.skip(f"CPU kernels off: {kernels.why_unavailable()}")
    return lambda x: True


@pytest.mark.parametrize("op", [None, "lora_add_"])
@pytest.mark.parametrize("layers", [[3], [2, 3, 4], [4, 0, 2]], ids=["single", "fused-consecutive", "fused-gather"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_matches_per_adapter_formula(layers, layerwise, op):
    lin, base, parts, sc, rank_index = make(6, [5, 3, 3][: len(layers)], [2, 3, 1], layers, layerwise,
                                            small_rows_op=cpu_op(op))
    x = torch.randn(4, 6, generator=G)
    lam = torch.randn(4, 5 if layerwise else 1, 3, generator=G)  # [N, rows, n]
    sc.set_rank(lam.index_select(-1, rank_index))
    full = lam if layerwise else lam.expand(4, 5, 3)
    assert torch.allclose(lin(x), naive(x, base, parts, full), atol=1e-4)
    sc.set_constant(0.0)
    assert torch.equal(lin(x), base(x))  # the adapters are skipped
    sc.set_constant(0.3)
    assert torch.allclose(lin(x), naive(x, base, parts, torch.full((4, 5, 3), 0.3)), atol=1e-4)


@pytest.mark.parametrize("op", [None, "lora_add_"])
def test_float32_adapters_on_a_bf16_base(op):
    lin, base, parts, sc, rank_index = make(8, [6], [2, 2], [0], True, dtype=torch.bfloat16, small_rows_op=cpu_op(op))
    x = torch.randn(3, 8, generator=G).to(torch.bfloat16)
    lam = torch.rand(3, 1, 2, generator=G)
    sc.set_rank(lam.index_select(-1, rank_index))
    y = lin(x)
    assert y.dtype == torch.bfloat16
    want = naive(x.float(), lambda z: base(z.to(torch.bfloat16)).float(), parts, lam)
    assert torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())
