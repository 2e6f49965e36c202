"""Tests for mistralrs_py.models.quant, quant_kernels and ggml_blocks (GGUF quantized weights +
torch kernels).

The hand-written kernels (models/qmatmul.cpp) are switched off here so that torch's int4/int8
kernels, the fallback on machines without a compiler or AVX-512 VNNI, stay covered; they have their
own tests in test_qmatmul.py.

Tolerances (all derived, not tuned):
  * fp32 paths: |y - ref| <= 1e-5 * (|x| @ |W|.T).  fp32 dot products of length K=512 have a
    worst-case relative error ~K*eps = 3e-5 of that absolute sum and a typical one ~sqrt(K)*eps
    ~ 1e-6; the int4pack rewrite w = (q-8)*s + z adds <= 2 ulp per weight.
  * bf16 output: + 2^-8 * |ref| (bf16 keeps 8 significant bits: unit roundoff 2^-8).
  * int4pack with bf16 scale/zero: each weight moves by <= 2^-8 * (8|s| + |z|), and for these
    formats 8|s| <= 16/15 * groupmax and |z| <= groupmax, so <= 2^-7 * groupmax.
  * int8 per-channel requantization: |W_eff - W| <= (rowmax / 254) * (1 + 2^-8) <= rowmax / 250.
"""

import warnings

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from mistralrs_py.models import ggml_blocks, qmatmul, quant_kernels
from mistralrs_py.models.ggml_blocks import GGML_SUPPORTED, dequantize
from mistralrs_py.models.quant import QuantEmbedding, QuantLinear

torch.set_num_threads(1)
CPU = torch.device("cpu")
TYPES = [T(t) for t in sorted(GGML_SUPPORTED)]
SHAPES = [(64, 256), (32, 512)]


@pytest.fixture(autouse=True)
def torch_kernels(monkeypatch):
    monkeypatch.setattr(qmatmul, "available", lambda: False)


# byte offsets of the fp16 super-block scales (d, dmin) of the types gguf cannot quantize
_F16_POS = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def make_raw(qt: T, shape, seed=0) -> np.ndarray:
    """Valid GGUF bytes [rows, row_bytes] for a weight of `shape`."""
    rng = np.random.default_rng(seed + int(qt))
    N, K = shape
    if qt in _F16_POS:  # no python quantizer: random blocks with sane, finite fp16 scales
        bs, ts = GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, (N * K // bs, ts), dtype=np.uint8)
        for p in _F16_POS[qt]:
            raw[:, p : p + 2] = rng.uniform(1e-3, 1e-2, (len(raw), 1)).astype(np.float16).view(np.uint8)
        return raw.reshape(N, -1)
    w = (rng.standard_normal((N, K)) * 0.05).astype(np.float32)
    w[:, :3] *= 8  # a few outlier columns, like real weights
    return np.ascontiguousarray(gguf.quants.quantize(w, qt)).view(np.uint8).reshape(N, -1)


def ref_dequant(raw, qt, shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw, qt), np.float32)).view(shape)


def group_max(W: torch.Tensor, g=32) -> torch.Tensor:  # [N, K] -> per-element max|w| of its group
    N, K = W.shape
    return W.abs().view(N, K // g, g).amax(-1, keepdim=True).expand(N, K // g, g).reshape(N, K)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact(qt, shape):
    raw = make_raw(qt, shape)
    ref = ref_dequant(raw, qt, shape)
    assert torch.isfinite(ref).all()
    out = dequantize(raw, qt, shape)
    assert out.dtype == torch.float32 and out.shape == shape
    assert torch.equal(out, ref)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_linear_fp32_exact(qt, shape):
    raw, (N, K) = make_raw(qt, shape), shape
    W = ref_dequant(raw, qt, shape)
    bias = torch.randn(N)
    ql = QuantLinear.from_gguf(raw, qt, shape, torch.float32, CPU, bias=bias)
    assert (ql.in_features, ql.out_features) == (K, N) and "dense" in ql.kind
    assert torch.equal(ql.dequantized(), W)  # fp32 keeps the exact weight
    x = torch.randn(2, 3, K)
    y = ql(x)
    assert y.shape == (2, 3, N) and y.dtype == torch.float32
    bound = 1e-5 * (x.abs() @ W.abs().T) + 1e-6
    assert ((y - bias - x @ W.T).abs() <= bound).all()


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_linear_kernels_fp32(qt):
    """prefer="kernel" runs the int kernels in fp32 (slow on CPU but precise): checks the
    int4pack mapping is exact and that forward == x @ dequantized().T."""
    shape = (32, 512)
    raw, (N, K) = make_raw(qt, shape), shape
    W = ref_dequant(raw, qt, shape)
    bias = torch.randn(N)
    ql = QuantLinear.from_gguf(raw, qt, shape, torch.float32, CPU, bias=bias, prefer="kernel")
    x3 = torch.randn(5, 2, K).transpose(0, 1)  # non-contiguous 3-D input
    y3 = ql(x3)
    assert y3.shape == (2, 5, N)
    x, y = x3.reshape(10, K), y3.reshape(10, N) - bias
    Weff = ql.dequantized()
    bound = 1e-5 * (x.abs() @ Weff.abs().T) + 1e-6
    assert ((y - x @ Weff.T).abs() <= bound).all(), ql.kind
    if qt in (T.Q4_0, T.Q4_1, T.Q4_K):
        assert ql.kind.startswith(qt.name.lower() + "->int4pack")
        assert torch.allclose(Weff, W, rtol=3e-7, atol=0)  # (q-8)*s + z rewrite: ~1 ulp
        assert ((y - x @ W.T).abs() <= 1e-5 * (x.abs() @ W.abs().T) + 1e-6).all()
    elif qt in (T.F32, T.F16, T.BF16):
        assert "dense" in ql.kind and torch.equal(Weff, W)
    else:
        assert "int8(per-channel, requantized" in ql.kind
        rowmax = W.abs().amax(1, keepdim=True)
        assert ((Weff - W).abs() <= rowmax / 250).all()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_linear_bf16(qt, shape):
    raw, (N, K) = make_raw(qt, shape), shape
    W = ref_dequant(raw, qt, shape)
    ql = QuantLinear.from_gguf(raw, qt, shape, torch.bfloat16, CPU)
    Weff = ql.dequantized()
    for M in (3, 16):  # a decode row or two, and a batch (int8 weights take their by-blocks path)
        x = torch.randn(M, K).to(torch.bfloat16)
        xf = x.float()
        y = ql(x)
        assert y.dtype == torch.bfloat16 and y.shape == (M, N)
        y = y.float()
        ref_eff = xf @ Weff.T
        # forward == x @ dequantized().T up to bf16 output rounding + fp32 accumulation (int8 by
        # blocks rounds twice: the bf16 product, then the per-row scale)
        rel = 2**-7 if M >= 8 and "int8" in ql.kind else 2**-8
        assert ((y - ref_eff).abs() <= rel * ref_eff.abs() + 1e-5 * (xf.abs() @ Weff.abs().T) + 1e-6).all()
    # effective weight vs exact gguf weight
    if qt in (T.Q4_0, T.Q4_1, T.Q4_K):
        assert "int4pack(g32)" in ql.kind
        assert ((Weff - W).abs() <= 2**-7 * group_max(W)).all()
    elif "int8" in ql.kind:
        assert ((Weff - W).abs() <= W.abs().amax(1, keepdim=True) / 250).all()
    else:  # dense bf16: weights rounded to bf16
        assert "dense bfloat16" in ql.kind and torch.equal(Weff, W.to(torch.bfloat16).float())


@pytest.mark.parametrize("qt", [T.Q4_0, T.Q8_0, T.Q6_K], ids=lambda t: t.name)
def test_linear_bf16_exact_mode_and_fallbacks(qt):
    K = 256
    raw = make_raw(qt, (40, K))  # N % 16 != 0: int4pack cannot take it
    W = ref_dequant(raw, qt, (40, K))
    for prefer in ("exact", "dense"):
        ql = QuantLinear.from_gguf(raw, qt, (40, K), torch.bfloat16, CPU, prefer=prefer)
        assert "dense bfloat16" in ql.kind
        assert torch.equal(ql.dequantized(), W.to(torch.bfloat16).float())
    ql = QuantLinear.from_gguf(raw, qt, (40, K), torch.bfloat16, CPU)
    assert ql(torch.zeros(0, K, dtype=torch.bfloat16)).shape == (0, 40)
    x = torch.randn(7, K, dtype=torch.bfloat16)
    ref = x.float() @ ql.dequantized().T
    assert ((ql(x).float() - ref).abs() <= 2**-8 * ref.abs() + 1e-4).all()


def test_auto_requant_policy():
    """ "auto" requantizes to int8 only when that adds <= the format's own rounding error (rms)."""
    shape = (64, 512)
    q5, q8 = make_raw(T.Q5_0, shape), make_raw(T.Q8_0, shape)
    auto5 = QuantLinear.from_gguf(q5, T.Q5_0, shape, torch.bfloat16, CPU)
    assert "int8(per-channel, requantized; err 0." in auto5.kind
    auto8 = QuantLinear.from_gguf(q8, T.Q8_0, shape, torch.bfloat16, CPU)
    assert "dense bfloat16 (int8 requant err" in auto8.kind  # per-32 scales beat per-row int8
    fast8 = QuantLinear.from_gguf(q8, T.Q8_0, shape, torch.bfloat16, CPU, prefer="fast")
    assert "int8(per-channel" in fast8.kind
    W = ref_dequant(q8, T.Q8_0, shape)
    # dense bf16 keeps Q8_0 far closer to the file than per-row int8 does
    assert (auto8.dequantized() - W).norm() * 4 < (fast8.dequantized() - W).norm()
    with pytest.raises(ValueError):
        QuantLinear.from_gguf(q8, T.Q8_0, shape, torch.bfloat16, CPU, prefer="bogus")


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_embedding(qt):
    V, D = 64, 256
    raw = make_raw(qt, (V, D))
    W = ref_dequant(raw, qt, (V, D))
    ids = torch.tensor([[0, 5, 63], [5, 1, 2]])
    emb = QuantEmbedding.from_gguf(raw, qt, (V, D), torch.float32, CPU)
    out = emb(ids)
    assert out.shape == (2, 3, D) and torch.equal(out, W[ids])
    assert torch.equal(emb.dequantized(), W)
    emb16 = QuantEmbedding.from_gguf(raw, qt, (V, D), torch.bfloat16, CPU)
    assert torch.equal(emb16(ids), W[ids].to(torch.bfloat16))
    head = emb16.as_linear()  # tied lm_head from the same bytes
    assert head.kind == QuantLinear.from_gguf(raw, qt, (V, D), torch.bfloat16, CPU).kind
    h = torch.randn(2, D, dtype=torch.bfloat16)
    ref = h.float() @ head.dequantized().T
    assert ((head(h).float() - ref).abs() <= 2**-8 * ref.abs() + 1e-4).all()


@pytest.mark.parametrize("qt", [T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_chunked_conversion(qt, monkeypatch):
    """Load-time conversion runs in 64-row chunks; result must equal the one-shot conversion."""
    shape = (208, 256)  # 64 + 64 + 64 + 16 rows
    raw = make_raw(qt, shape)
    whole = QuantLinear.from_gguf(raw, qt, shape, torch.bfloat16, CPU)
    monkeypatch.setattr(ggml_blocks, "_CHUNK_WEIGHTS", 64 * 256)
    chunked = QuantLinear.from_gguf(raw, qt, shape, torch.bfloat16, CPU)
    assert torch.equal(whole.dequantized(), chunked.dequantized())
    x = torch.randn(2, 256, dtype=torch.bfloat16)
    assert torch.equal(whole(x), chunked(x))


def test_readonly_input_no_copy_no_warning():
    raw = make_raw(T.Q4_1, (32, 256))
    raw.setflags(write=False)  # like a GGUFReader memmap
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ql = QuantLinear.from_gguf(raw, T.Q4_1, (32, 256), torch.bfloat16, CPU)
        emb = QuantEmbedding.from_gguf(raw, T.Q4_1, (32, 256), torch.float32, CPU)
        assert torch.equal(emb(torch.tensor([3])), dequantize(raw, T.Q4_1, (32, 256))[3:4])
    assert ql(torch.randn(1, 256, dtype=torch.bfloat16)).shape == (1, 32)
    assert emb.raw.data_ptr() == raw.ctypes.data  # embedding shares the caller's bytes


def test_bad_sizes():
    raw = make_raw(T.Q4_0, (32, 256))
    with pytest.raises(ValueError):
        dequantize(raw, T.Q4_0, (32, 512))
    with pytest.raises(NotImplementedError):
        dequantize(raw, T.IQ2_XXS, (32, 256))


def test_int8_by_blocks_spans_block_edges():
    """16 rows through an int8 weight taller than one conversion block: equals the int8 kernel."""
    N, K = quant_kernels._INT8_BLOCK_ROWS + 48, 64
    raw = make_raw(T.Q5_0, (N, K))
    ql = QuantLinear.from_gguf(raw, T.Q5_0, (N, K), torch.bfloat16, CPU, prefer="fast")
    assert "int8" in ql.kind
    x = torch.randn(16, K, dtype=torch.bfloat16)
    kernel = torch.ops.aten._weight_int8pack_mm(x, ql.kernel.w8, ql.kernel.s8).float()
    ref = x.float() @ ql.dequantized().T
    got = ql(x).float()
    assert ((got - ref).abs() <= 2**-7 * ref.abs() + 1e-2).all()
    assert ((got - kernel).abs() <= 2**-7 * kernel.abs() + 1e-2).all()
