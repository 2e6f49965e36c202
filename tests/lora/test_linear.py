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


class Opaque(nn.Module):
    """A base that is not an nn.Linear (as a quantized one): the adapters then run after it (lora_add_)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def make(
    in_f,
    part_rows,
    ranks,
    layers,
    layerwise,
    dtype=torch.float32,
    lora_dtype=torch.float32,
    cpu_ops=False,
    opaque=False,
):
    base = nn.Linear(in_f, sum(part_rows), bias=True).to(dtype)
    nn.init.normal_(base.weight, generator=G)
    parts, a_all, spans = [], [], []
    R = sum(ranks)
    bt = torch.zeros(R, sum(part_rows))  # B^T compact: each part's columns hold its own B^T
    off = 0
    for rows, layer in zip(part_rows, layers):
        adapters = [
            (torch.randn(r, in_f, generator=G), torch.randn(rows, r, generator=G), 0.5 + i) for i, r in enumerate(ranks)
        ]
        parts.append((rows, adapters, layer))
        a_all.append(torch.cat([a for a, _, _ in adapters]))
        bt[:, off : off + rows] = torch.cat([bb * s for _, bb, s in adapters], dim=1).T
        spans.append((off, off + rows))
        off += rows
    lin = XLoraLinear(
        Opaque(base) if opaque else base,
        torch.cat(a_all).to(lora_dtype),
        bt.to(lora_dtype),
        rows=list(layers) if layerwise else [0] * len(layers),
        indices=list(layers),
        spans=spans,
    )
    lin.cpu_ops = cpu_ops
    rank_index = torch.repeat_interleave(torch.arange(len(ranks)), torch.tensor(ranks))
    return lin, base, parts, rank_index


def cpu_op(name) -> bool:
    """None: torch ops; "lora_linear" / "lora_add_": decode rows through our CPU ops (models/csrc/linear.cpp):
    the base and the adapters in one op, or the adapters after a base that is not an nn.Linear."""
    if name is None:
        return False
    from mistralrs_py.models import kernels

    if not kernels.available():
        pytest.skip(f"CPU kernels off: {kernels.why_unavailable()}")
    return True


OPS = [None, "lora_linear", "lora_add_"]


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("layers", [[3], [2, 3, 4], [4, 0, 2]], ids=["single", "fused-consecutive", "fused-gather"])
@pytest.mark.parametrize("layerwise", [True, False])
def test_matches_per_adapter_formula(layers, layerwise, op):
    lin, base, parts, rank_index = make(
        6, [5, 3, 3][: len(layers)], [2, 3, 1], layers, layerwise, cpu_ops=cpu_op(op), opaque=op == "lora_add_"
    )
    x = torch.randn(4, 6, generator=G)
    lam = torch.randn(4, 5 if layerwise else 1, 3, generator=G)  # [N, rows, n]
    full = lam if layerwise else lam.expand(4, 5, 3)
    assert torch.allclose(
        lin(x, Scalings.per_token(lam.index_select(-1, rank_index))), naive(x, base, parts, full), atol=1e-4
    )
    assert torch.equal(lin(x, Scalings.fixed(0.0)), base(x))  # the adapters are skipped
    assert torch.equal(lin(x), base(x))  # no scalings: the base layer alone
    assert torch.allclose(lin(x, Scalings.fixed(0.3)), naive(x, base, parts, torch.full((4, 5, 3), 0.3)), atol=1e-4)


@pytest.mark.parametrize("op", OPS)
def test_float32_adapters_on_a_bf16_base(op):
    lin, base, parts, rank_index = make(
        8, [6], [2, 2], [0], True, dtype=torch.bfloat16, cpu_ops=cpu_op(op), opaque=op == "lora_add_"
    )
    x = torch.randn(3, 8, generator=G).to(torch.bfloat16)
    lam = torch.rand(3, 1, 2, generator=G)
    y = lin(x, Scalings.per_token(lam.index_select(-1, rank_index)))
    assert y.dtype == torch.bfloat16
    want = naive(x.float(), lambda z: base(z.to(torch.bfloat16)).float(), parts, lam)
    assert torch.allclose(y.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


def ops_called(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("mistralrs::")}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_rows_take_one_op_over_a_dense_base(dtype):
    """A dense base and its adapters run as one lora_linear call; any other base runs itself, then
    lora_add_; prompt-sized inputs stay on torch's matmuls."""
    small = cpu_op("lora_linear")
    x = torch.randn(2, 8, generator=G).to(dtype)
    for opaque, want in [(False, {"mistralrs::lora_linear"}), (True, {"mistralrs::lora_add_"})]:
        lin, _, _, rank_index = make(8, [6, 4], [2, 2], [0, 1], True, dtype=dtype, cpu_ops=small, opaque=opaque)
        lora = Scalings.per_token(torch.rand(2, 2, 2, generator=G).index_select(-1, rank_index))
        with torch.inference_mode():
            assert (
                ops_called(lambda lin=lin, lora=lora: lin(x, lora)) & {"mistralrs::lora_linear", "mistralrs::lora_add_"}
                == want
            )
            big = torch.randn(9, 8).to(dtype)
            assert not ops_called(lambda lin=lin, big=big: lin(big, Scalings.fixed(0.5))) & {
                "mistralrs::lora_linear",
                "mistralrs::lora_add_",
            }
