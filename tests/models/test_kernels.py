"""Tests for our fused CPU ops (models/csrc: rms_norm, silu_mul, linear, decode_attention) and
the build around them (models/kernels.py).

References are float64 torch computations on the same (rounded) inputs; tolerances are the output
dtype's rounding (bf16 2^-8, fp16 2^-11 relative) plus float32 accumulation. Shapes cover the
vectorised 16-lane path and the scalar tails (dims that are not multiples of 16).
"""
import pytest
import torch
import torch.nn.functional as F

from mistralrs_py.models import kernels
from mistralrs_py.models.layers import apply_rotary

torch.set_num_threads(1)
pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"CPU kernels off: {kernels.why_unavailable()}")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ROUND = {torch.bfloat16: 2**-8, torch.float16: 2**-11, torch.float32: 2**-22}
ops = torch.ops.mistralrs if kernels.available() else None


def close(out, ref, dtype, atol=1e-6):
    assert out.dtype == dtype
    err = (out.double() - ref).abs()
    bound = ref.abs() * ROUND[dtype] * 1.01 + atol
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 576), (3, 7), (2, 3, 64), (1, 20)])
def test_rms_norm(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    w = torch.randn(shape[-1], generator=g).to(dtype)
    ref = F.rms_norm(x.double(), (shape[-1],), w.double(), 1e-5)
    close(ops.rms_norm(x, w, 1e-5), ref, dtype, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 2 * 576), (4, 14), (2, 2, 40)])
def test_silu_mul(dtype, shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 4).to(dtype)  # wide range: exp over and underflow both tested
    x.view(-1)[0] = -100.0
    gate, up = x.double().chunk(2, -1)
    y = ops.silu_mul(x)
    assert y.shape == (*shape[:-1], shape[-1] // 2)
    close(y, F.silu(gate) * up, dtype, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,K,N", [(1, 576, 300), (3, 100, 33), (9, 64, 70), (17, 48, 16)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(dtype, M, K, N, with_bias):
    g = torch.Generator().manual_seed(M * K + N)
    x, w = torch.randn(M, K, generator=g).to(dtype), torch.randn(N, K, generator=g).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if with_bias else None
    ref = x.double() @ w.double().T + (b.double() if with_bias else 0)
    bound = 2**-20 * (x.double().abs() @ w.double().abs().T) + 1e-5  # float32 accumulation only
    y = ops.linear(x, w, b, True)
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert bool(((y.double() - ref).abs() <= bound).all())
    y = ops.linear(x, w, b)  # the same, rounded once to x's dtype
    assert y.dtype == dtype and torch.equal(y, ops.linear(x, w, b, True).to(dtype))
    close(y, ref, dtype, atol=1e-4 + bound.max().item())


def test_linear_module_uses_the_kernel_for_decode_rows():
    from mistralrs_py.models.layers import Linear

    lin = Linear(64, 48, bias=True, dtype=torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()
    with torch.inference_mode():
        assert torch.equal(lin(x), ops.linear(x, lin.weight, lin.bias))  # <= 8 rows: ours
        xs = torch.randn(40, 64).bfloat16()
        assert torch.equal(lin(xs), F.linear(xs, lin.weight, lin.bias))  # prompt rows: torch's GEMM


def ref_decode(q, k, v, cos, sin, kc, vc, slots, pos, window):
    """float64: rope, cache write (rounded to the cache dtype), attention over the visible keys."""
    kc, vc = kc.clone(), vc.clone()
    qr = apply_rotary(q.double(), cos.double()[:, None], sin.double()[:, None])
    kr = apply_rotary(k.double(), cos.double()[:, None], sin.double()[:, None])
    H, Hk, hd = q.shape[1], k.shape[1], q.shape[2]
    outs = []
    for b, (s, p) in enumerate(zip(slots, pos)):
        kc[s, :, p], vc[s, :, p] = kr[b].to(kc.dtype), v[b]
        lo = max(0, p + 1 - window) if window else 0
        K = kc[s, :, lo : p + 1].double().repeat_interleave(H // Hk, 0)  # [H, n, hd]
        V = vc[s, :, lo : p + 1].double().repeat_interleave(H // Hk, 0)
        probs = torch.softmax((qr[b][:, None] @ K.transpose(1, 2))[:, 0] / hd**0.5, -1)  # [H, n]
        outs.append((probs[:, None] @ V)[:, 0])
    return torch.stack(outs), kc, vc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hd,H,Hk,window", [(64, 9, 3, 0), (16, 4, 2, 5), (128, 4, 4, 0), (20, 6, 2, 0), (8, 2, 1, 30)])
def test_decode_attention(dtype, hd, H, Hk, window):
    g = torch.Generator().manual_seed(hd * H + window)
    S, P = 5, 70
    kc, vc = torch.randn(S, Hk, P, hd, generator=g).to(dtype), torch.randn(S, Hk, P, hd, generator=g).to(dtype)
    kc0, vc0 = kc.clone(), vc.clone()
    qkv = torch.randn(3, (H + 2 * Hk) * hd, generator=g).to(dtype)  # q, k, v as strided views, as the model passes
    q = qkv[:, : H * hd].view(3, H, hd)
    k = qkv[:, H * hd : (H + Hk) * hd].view(3, Hk, hd)
    v = qkv[:, (H + Hk) * hd :].view(3, Hk, hd)
    ang = torch.rand(3, hd // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([-ang.sin(), ang.sin()], -1)
    slots, pos = [3, 0, 4], [0, 17, 69]  # position 0, a middle one, the slot's last
    out = ops.decode_attention(q, k, v, cos.to(dtype), sin.to(dtype), kc, vc, torch.tensor(slots), torch.tensor(pos),
                               window, hd**-0.5)
    assert out.shape == (3, H, hd)
    # the tables as passed (rounded to dtype) are what rope used; the reference used them unrounded
    tol = 1e-5 if dtype == torch.float32 else ROUND[dtype] * 4
    ref, rk, rv = ref_decode(q, k, v, cos.to(dtype).float(), sin.to(dtype).float(), kc0, vc0, slots, pos, window)
    assert (out.double() - ref).abs().max().item() <= tol * (1 + ref.abs().max().item())
    assert (kc.double() - rk.double()).abs().max().item() <= ROUND[dtype] * 2 * rk.abs().max().item()
    assert torch.equal(vc, rv)  # v is copied bit for bit
    written = torch.zeros(S, P, dtype=torch.bool)
    written[slots, pos] = True
    assert torch.equal(kc.transpose(1, 2)[~written], kc0.transpose(1, 2)[~written])  # nothing else touched


def test_decode_attention_matches_the_torch_path_on_a_window_batch():
    """The op against the model's own torch path (layers.attend with a decode mask)."""
    from mistralrs_py.engine.kv_cache import CacheShape, KVCachePool
    from mistralrs_py.models.layers import attend

    g = torch.Generator().manual_seed(7)
    H, Hk, hd, W = 4, 2, 32, 6
    pool = KVCachePool(CacheShape(1, Hk, hd), 4, 40, torch.float32, torch.device("cpu"))
    for t in (pool.k[0], pool.v[0]):
        t.copy_(torch.randn(t.shape, generator=g))
    view = pool.build_view([(2, 9), (0, 30), (3, 3)], [], W, [])
    assert view.fused_decode and view.window == W
    q, k, v = torch.randn(3, H, hd, generator=g), torch.randn(3, Hk, hd, generator=g), torch.randn(3, Hk, hd, generator=g)
    ang = torch.rand(3, hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([-ang.sin(), ang.sin()], -1)[:, None]
    kc, vc = pool.k[0].clone(), pool.v[0].clone()
    ref = attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, kc, vc, view)
    out = ops.decode_attention(q, k, v, cos[:, 0], sin[:, 0], pool.k[0], pool.v[0], view.decode_slots,
                               view.positions, W, hd**-0.5)
    assert (out - ref).abs().max().item() < 1e-5
    assert (pool.k[0] - kc).abs().max().item() < 1e-6 and torch.equal(pool.v[0], vc)


def test_bad_arguments_raise_not_crash():
    kc = torch.zeros(2, 1, 8, 16)
    q, k = torch.zeros(1, 2, 16), torch.zeros(1, 1, 16)
    cs = torch.zeros(1, 16)
    one, zero = torch.tensor([1]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="outside a cache"):
        ops.decode_attention(q, k, k, cs, cs, kc, kc.clone(), one, torch.tensor([8]), 0, 0.25)
    with pytest.raises(RuntimeError, match="outside a cache"):
        ops.decode_attention(q, k, k, cs, cs, kc, kc.clone(), torch.tensor([2]), zero, 0, 0.25)
    with pytest.raises(RuntimeError, match="twice"):
        ops.decode_attention(q.expand(2, 2, 16), k.expand(2, 1, 16), k.expand(2, 1, 16), cs.expand(2, 16),
                             cs.expand(2, 16), kc, kc.clone(), torch.tensor([1, 1]), torch.tensor([0, 1]), 0, 0.25)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.decode_attention(q.bfloat16(), k, k, cs, cs, kc, kc.clone(), one, zero, 0, 0.25)
    with pytest.raises(RuntimeError, match="query heads"):
        ops.decode_attention(torch.zeros(1, 3, 16), torch.zeros(1, 2, 16), torch.zeros(1, 2, 16), cs, cs,
                             torch.zeros(2, 2, 8, 16), torch.zeros(2, 2, 8, 16), one, zero, 0, 0.25)
    with pytest.raises(RuntimeError, match="weight must be"):
        ops.rms_norm(torch.zeros(2, 8), torch.zeros(7), 1e-5)
    with pytest.raises(RuntimeError, match="even"):
        ops.silu_mul(torch.zeros(2, 7))
    with pytest.raises(RuntimeError, match="share one dtype"):
        ops.linear(torch.zeros(2, 8), torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="bias must be"):
        ops.linear(torch.zeros(2, 8), torch.zeros(3, 8), torch.zeros(4))
    with pytest.raises(RuntimeError):
        ops.rms_norm(torch.zeros(2, 8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64), 1e-5)


def test_ops_trace_under_compile():
    """The fake implementations let torch.compile trace every op (aot_eager: no C++ codegen)."""
    x, w = torch.randn(2, 32), torch.randn(32)

    def f(x, w):
        return ops.silu_mul(ops.rms_norm(x, w, 1e-5)), ops.linear(x, torch.ones(5, 32), None, True)

    a, b = torch.compile(f, backend="aot_eager", fullgraph=True)(x, w)
    ea, eb = f(x, w)
    assert torch.equal(a, ea) and torch.equal(b, eb) and b.dtype == torch.float32


def test_switch_turns_every_kernel_off(monkeypatch):
    monkeypatch.setattr(kernels, "_state", {})
    monkeypatch.setenv("MISTRALRS_KERNELS", "0")
    assert not kernels.available() and not kernels.ready() and kernels.why_unavailable() == "MISTRALRS_KERNELS=0"
    from mistralrs_py.models import qmatmul

    assert not qmatmul.available()


def test_decode_attention_skips_padding_rows_of_the_scratch_slot():
    """--compile pads a batch with rows in the scratch slot: they are skipped (zero output, no write),
    so the slot may repeat, and the real rows are unaffected."""
    g = torch.Generator().manual_seed(11)
    H, Hk, hd, S, P = 4, 2, 16, 4, 12
    kc, vc = torch.randn(S, Hk, P, hd, generator=g), torch.randn(S, Hk, P, hd, generator=g)
    kc0, vc0 = kc.clone(), vc.clone()
    q, k, v = torch.randn(4, H, hd, generator=g), torch.randn(4, Hk, hd, generator=g), torch.randn(4, Hk, hd, generator=g)
    ang = torch.rand(4, hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([-ang.sin(), ang.sin()], -1)
    slots, pos = torch.tensor([1, 0, 3, 3]), torch.tensor([5, 2, 0, 0])  # rows 2 and 3: padding in slot 3
    out = ops.decode_attention(q, k, v, cos, sin, kc, vc, slots, pos, 0, hd**-0.5, 3)
    ref, _, _ = ref_decode(q[:2], k[:2], v[:2], cos[:2], sin[:2], kc0, vc0, [1, 0], [5, 2], 0)
    assert (out[:2].double() - ref).abs().max().item() < 1e-5
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    assert torch.equal(kc[3], kc0[3]) and torch.equal(vc[3], vc0[3])
    with pytest.raises(RuntimeError, match="twice"):  # without the skip, the repeated slot is refused
        ops.decode_attention(q, k, v, cos, sin, kc, vc, slots, pos, 0, hd**-0.5)


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lam_parts", [None, 1, 3])
def test_lora_add(wdtype, lam_parts):
    """y += (scale * (x @ a.T)) @ bt, float32 inside, for float32 or bf16 adapters, with the
    scalings broadcast over a fused projection's parts (lam [M, 1 or P, R]) or a constant."""
    g = torch.Generator().manual_seed(5 + (lam_parts or 0))
    M, K, N, P, R = 3, 40, 70, 3, 4
    x, y = torch.randn(M, K, generator=g).bfloat16(), torch.randn(M, N, generator=g).bfloat16()
    a, bt = torch.randn(P * R, K, generator=g).to(wdtype), torch.randn(P * R, N, generator=g).to(wdtype)
    lam = None if lam_parts is None else torch.randn(M, lam_parts, R, generator=g)
    scale = torch.full((M, P * R), 0.7, dtype=torch.float64) if lam is None else lam.double().expand(M, P, R).reshape(M, -1)
    ref = y.double() + ((x.double() @ a.double().T) * scale) @ bt.double()
    out = y.clone()
    ops.lora_add_(out, x, a, bt, lam, 0.7)
    delta = ((x.double().abs() @ a.double().abs().T) * scale.abs()) @ bt.double().abs()
    assert bool(((out.double() - ref).abs() <= ref.abs() * 2**-8 + delta * 2**-20 + 1e-6).all())
    with pytest.raises(RuntimeError, match="lam must be"):
        ops.lora_add_(out, x, a, bt, torch.zeros(M, 2, R), 0.0)
