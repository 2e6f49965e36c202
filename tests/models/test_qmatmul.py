"""Tests for the hand-written CPU quantized matmuls (models/csrc/qmatmul.cpp) behind QuantLinear.

References:
  * the gguf package's dequantizer gives the file's weights W;
  * an independent torch emulation of the activation quantization (per 32-block, scale amax/127,
    round half to even) gives xq; the kernel must equal xq @ W_eff.T in float64 up to float32
    accumulation and the output dtype's rounding.
Tolerances:
  * output rounding: unit roundoff of the output dtype (bf16 2^-8, fp16 2^-11) times |ref|;
  * float32 accumulation: 2^-16 * (|xq| + 128 dx) @ |W_eff|.T (the +128 covers the 8-bit kernel's
    offset term, which cancels in float32);
  * activation quantization: |x - xq| <= dx / 2 per element, so |y - x @ W.T| <= (dx/2) @ |W|.T.
"""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from mistralrs_py.models import kernels, qmatmul
from mistralrs_py.models.fusion import fuse_linears
from mistralrs_py.models.quant import QuantLinear
from mistralrs_py.models.quant_kernels import Qmm
from tests.models.test_quant import group_max, make_raw, ref_dequant

torch.set_num_threads(1)
CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    not qmatmul.available(), reason=f"hand-written kernels off: {qmatmul.why_unavailable()}"
)
Q4 = [T.Q4_0, T.Q4_1, T.Q4_K]
Q8 = [T.Q8_0, T.Q5_0, T.Q5_1, T.Q2_K, T.Q3_K, T.Q5_K, T.Q6_K]
EXACT = {T.Q4_0, T.Q4_1, T.Q8_0}  # the packed weight equals the file's weight
ROUND = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-22}


def quantized_x(x: torch.Tensor):
    """-> (x as the kernel sees it, float64 [M, K]; dx per element)"""
    M, K = x.shape
    xb = x.float().view(M, K // 32, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127  # float32, like the kernel
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(xb * inv)  # half to even, like nearbyint
    return (q.double() * d.double()).view(M, K), d.expand(M, K // 32, 32).reshape(M, K).double()


def build(qt, shape, seed=0, dtype=torch.bfloat16):
    raw = make_raw(qt, shape, seed)
    ql = QuantLinear.from_gguf(raw, qt, shape, dtype, CPU, prefer="fast")
    assert ql.kind.startswith(f"{qt.name.lower()}->qmm{4 if qt in Q4 else 8}"), ql.kind
    return ql, ref_dequant(raw, qt, shape)


@pytest.mark.parametrize("qt", Q4 + Q8, ids=lambda t: t.name)
def test_packed_weight_is_the_files(qt):
    ql, W = build(qt, (48, 256))
    Weff = ql.dequantized()
    if qt in EXACT:
        assert torch.equal(Weff, W)
    elif qt == T.Q4_K:  # scale d*sc and offset dmin*m rounded to float16 (2^-11 each)
        assert ((Weff - W).abs() <= 2**-9 * group_max(W) + 2**-20).all()
    else:  # int8 per 32-block: half a step of amax/127, with the float16-rounded step
        assert ((Weff - W).abs() <= group_max(W) / 254 * (1 + 2**-10) + 2**-24).all()


# NOTE: K = 96 covers K % 64 == 32; K-quants need K % 256 == 0 (their super-blocks)
CASES = [
    (qt, shape)
    for shape in [(48, 96), (64, 256), (32, 512)]
    for qt in Q4 + Q8
    if shape[1] % 256 == 0 or qt in EXACT | {T.Q5_0, T.Q5_1}
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("qt,shape", CASES, ids=str)
def test_equals_int8_activation_reference(qt, shape, dtype):
    # float32 activations: the op itself (QuantLinear keeps float32 layers dense and exact)
    ql, _ = build(qt, shape, dtype=torch.bfloat16 if dtype == torch.float32 else dtype)
    Weff = ql.dequantized().double()
    for M in (1, 3, 8, 9, 17):  # row tiles of 8: full, partial, and more than one
        x = (torch.randn(M, shape[1]) * torch.rand(M, 1) * 4).to(dtype)
        xq, dx = quantized_x(x)
        ref = xq @ Weff.T
        got = (
            ql(x)
            if dtype != torch.float32
            else torch.ops.mistralrs.qmm(x, ql.kernel.qs, ql.kernel.d, ql.kernel.mw, ql.kernel.bits)
        )
        assert got.dtype == dtype and got.shape == (M, shape[0])
        slack = 2**-16 * ((xq.abs() + 128 * dx) @ Weff.abs().T)
        assert ((got.double() - ref).abs() <= ROUND[dtype] * ref.abs() + slack + 1e-6).all(), (qt, M)


@pytest.mark.parametrize("qt", Q4 + [T.Q8_0, T.Q6_K], ids=lambda t: t.name)
def test_close_to_the_gguf_reference(qt):
    """Against the gguf package's weights: the only error is the activations' own rounding
    (plus, for the requantized formats, the packed weight's, bounded in the first test)."""
    ql, W = build(qt, (64, 512), seed=1)
    x = torch.randn(5, 512).to(torch.bfloat16)
    xq, dx = quantized_x(x)
    Weff = ql.dequantized().double()
    ref = x.double() @ W.double().T
    bound = (dx / 2) @ W.double().abs().T + xq.abs() @ (Weff - W.double()).abs().T
    got = ql(x).double()
    assert ((got - ref).abs() <= bound + 2**-8 * got.abs() + 1e-5).all()
    # and it is not trivially loose: the activation rounding is a small fraction of the output
    assert float(((got - ref).norm() / ref.norm())) < 0.02


def test_zero_blocks_empty_batch_and_threads():
    ql, W = build(T.Q4_1, (64, 256))
    x = torch.randn(4, 256).to(torch.bfloat16)
    x[1, 32:64] = 0  # a block with amax 0: scale 0, no division by zero
    x[2] = 0
    y = ql(x)
    assert torch.isfinite(y).all() and torch.equal(y[2], torch.zeros(64, dtype=torch.bfloat16))
    assert ql(x[:0]).shape == (0, 64)
    torch.set_num_threads(2)
    try:  # rows are split across threads; each output is computed by one thread the same way
        assert torch.equal(ql(x), y)
    finally:
        torch.set_num_threads(1)


def test_3d_input():
    ql, _ = build(T.Q4_0, (32, 128))
    x = torch.randn(2, 3, 128).to(torch.bfloat16)
    assert torch.equal(ql(x), ql(x.view(6, 128)).view(2, 3, 32))


def test_fused_projections_concatenate():
    parts = [build(qt, (n, 256), seed=i)[0] for i, (qt, n) in enumerate([(T.Q4_1, 64), (T.Q4_1, 32), (T.Q4_1, 32)])]
    fused = fuse_linears(parts)
    assert fused is not None and isinstance(fused.kernel, Qmm) and fused.out_features == 128
    x = torch.randn(3, 256).to(torch.bfloat16)
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert fuse_linears([parts[0], build(T.Q8_0, (32, 256))[0]]) is None  # 4-bit with 8-bit: kept apart


def test_traced_by_torch_compile():
    """The op has a fake (shape) implementation, so torch.compile traces through it."""
    ql, _ = build(T.Q4_1, (64, 256))
    x = torch.randn(2, 256).to(torch.bfloat16)
    compiled = torch.compile(ql, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), ql(x))


def test_bad_arguments_raise_instead_of_crashing():
    ql, _ = build(T.Q4_1, (64, 256))
    x = torch.randn(2, 256).to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="bits"):
        torch.ops.mistralrs.qmm(x, ql.kernel.qs, ql.kernel.d, ql.kernel.mw, 5)
    with pytest.raises(RuntimeError, match="packed weight"):
        torch.ops.mistralrs.qmm(torch.randn(2, 128).to(torch.bfloat16), ql.kernel.qs, ql.kernel.d, ql.kernel.mw, 4)
    with pytest.raises(RuntimeError, match="offsets"):
        torch.ops.mistralrs.qmm(x, ql.kernel.qs, ql.kernel.d, ql.kernel.mw.float(), 4)


def test_unsupported_shapes_keep_torch_kernels():
    raw = make_raw(T.Q4_1, (40, 256))  # N % 16 != 0
    assert "qmm" not in QuantLinear.from_gguf(raw, T.Q4_1, (40, 256), torch.bfloat16, CPU).kind
    raw = make_raw(T.Q4_1, (64, 256))
    assert "qmm" not in QuantLinear.from_gguf(raw, T.Q4_1, (64, 256), torch.bfloat16, CPU, prefer="exact").kind
    # float32 activations: our kernels by default, exact dense weights when asked (--dtype float32)
    assert "qmm4" in QuantLinear.from_gguf(raw, T.Q4_1, (64, 256), torch.float32, CPU).kind
    assert "dense" in QuantLinear.from_gguf(raw, T.Q4_1, (64, 256), torch.float32, CPU, prefer="dense").kind


def test_build_failure_and_switch_fall_back(monkeypatch):
    def boom(cxx):
        raise RuntimeError("compiler exploded")

    real_compile = kernels._compile
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_compile", boom)
    assert not qmatmul.available() and "compiler exploded" in qmatmul.why_unavailable()
    assert not kernels.ready() and "compiler exploded" in kernels.why_unavailable()
    raw = make_raw(T.Q4_1, (64, 256))
    assert "int4pack" in QuantLinear.from_gguf(raw, T.Q4_1, (64, 256), torch.bfloat16, CPU).kind
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setattr(kernels, "_compile", real_compile)  # the cached build loads again
    monkeypatch.setenv("MISTRALRS_QMATMUL", "0")
    assert not qmatmul.available() and qmatmul.why_unavailable() == "MISTRALRS_QMATMUL=0"
    assert kernels.available()  # NOTE: the switch turns off the matmuls only, not the other kernels


def test_float32_output_is_the_unrounded_result():
    """forward_f32 (the output head) returns the kernel's float32 accumulators: rounding them gives
    forward()'s bf16 output exactly, and they carry more than bf16's 8 bits."""
    raw = make_raw(T.Q8_0, (64, 256))
    lin = QuantLinear.from_gguf(raw, T.Q8_0, (64, 256), torch.bfloat16, CPU)
    assert "qmm" in lin.kind
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    y = lin.forward_f32(x)
    assert y.dtype == torch.float32 and torch.equal(y.bfloat16(), lin(x))
    assert not torch.equal(y, y.bfloat16().float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_activation_quantization_is_exact(dtype):
    """Through an identity weight (4-bit codes 0/1, scale 1, offset 0) the float32 output is each
    activation as the kernel quantized it, q * dx, so it must equal the emulation bit for bit:
    ties round half to even, a zero block stays zero, amax maps to 127."""
    K = 96
    codes = torch.eye(K, dtype=torch.uint8)
    qs, d, mw = qmatmul.pack_q4(codes, torch.ones(K, K // 32), torch.zeros(K, K // 32))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(7, K, generator=g) * torch.logspace(-3, 3, 7)[:, None]
    x[0, :32] = torch.arange(-16, 16) + 0.5  # amax 16.5: steps of 16.5/127, and exact ties below
    x[1, :32] = torch.tensor([127.0, -2.5, 2.5, -3.5, 3.5, 0.5, -0.5, 1.5] * 4)  # dx = 1: ties at .5
    x[2, 32:64] = 0
    x = x.to(dtype)
    xf = x.float().view(7, K // 32, 32)
    dx = xf.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xf * torch.where(dx > 0, 1 / dx, torch.zeros_like(dx)))
    assert (q[1, 0, 1:3] == torch.tensor([-2.0, 2.0])).all()  # the ties did round to even
    want = (q * dx).view(7, K)
    got = torch.ops.mistralrs.qmm(x, qs, d, mw, 4, True)
    assert got.dtype == torch.float32 and torch.equal(got, want)
