"""Tests for our fused CPU ops (models/csrc: rms_norm, silu_mul, linear, decode_attention) and
the build around them (models/kernels.py).

References are float64 torch computations on the same (rounded) inputs; tolerances are the output
dtype's rounding (bf16 2^-8, fp16 2^-11 relative) plus float32 accumulation. Shapes cover the
vectorised paths (16 lanes with AVX-512, 8 with AVX2) and the scalar tails (dims off the width).
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
@pytest.mark.parametrize("M,K,N", [(1, 576, 300), (3, 100, 33), (7, 48, 37), (9, 64, 70), (17, 48, 16)])
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
        assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))  # off unless chosen at load
        lin.cpu_ops = True
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


def paged(kc, bs, g):
    """A logical cache [S, Hk, P, hd] laid out in shuffled blocks of `bs` positions, every block
    contiguous but blocks strided apart (as the engine's block-major buffer's per-layer views).
    -> (paged cache [S * P / bs, Hk, bs, hd], tables [S, P / bs])."""
    S, Hk, P, hd = kc.shape
    M = P // bs
    tables = torch.randperm(S * M, generator=g).view(S, M)
    pc = torch.randn(S * M, 2, Hk, bs, hd, generator=g).to(kc.dtype)[:, 0]
    for s in range(S):
        for j in range(M):
            pc[tables[s, j]] = kc[s, :, j * bs : (j + 1) * bs]
    return pc, tables


def unpaged(pc, tables):
    g = pc[tables]  # [S, M, Hk, bs, hd]
    S, M, Hk, bs, hd = g.shape
    return g.transpose(1, 2).reshape(S, Hk, M * bs, hd)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "hd,H,Hk,window,bs", [(64, 9, 3, 0, 16), (16, 4, 2, 5, 16), (128, 4, 4, 0, 8), (20, 6, 2, 0, 32), (8, 2, 1, 30, 5)]
)
def test_decode_attention(dtype, hd, H, Hk, window, bs):
    g = torch.Generator().manual_seed(hd * H + window)
    S, P = 5, 160
    kc, vc = torch.randn(S, Hk, P, hd, generator=g).to(dtype), torch.randn(S, Hk, P, hd, generator=g).to(dtype)
    kp, tables = paged(kc, bs, g)
    vp = torch.empty_like(kp)
    for s in range(S):
        for j in range(P // bs):
            vp[tables[s, j]] = vc[s, :, j * bs : (j + 1) * bs]
    assert not kp.is_contiguous() and torch.equal(unpaged(kp, tables), kc)
    qkv = torch.randn(3, (H + 2 * Hk) * hd, generator=g).to(dtype)  # q, k, v as strided views, as the model passes
    q = qkv[:, : H * hd].view(3, H, hd)
    k = qkv[:, H * hd : (H + Hk) * hd].view(3, Hk, hd)
    v = qkv[:, (H + Hk) * hd :].view(3, Hk, hd)
    ang = torch.rand(3, hd // 2, generator=g) * 6
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([-ang.sin(), ang.sin()], -1)
    slots, pos = [3, 0, 4], [0, 17, 159]  # position 0, a middle one, the sequence's last
    out = ops.decode_attention(
        q, k, v, cos.to(dtype), sin.to(dtype), kp, vp, tables[slots], torch.tensor(pos), window, hd**-0.5
    )
    assert out.shape == (3, H, hd)
    # the tables as passed (rounded to dtype) are what rope used; the reference used them unrounded
    tol = 1e-5 if dtype == torch.float32 else ROUND[dtype] * 4
    ref, rk, rv = ref_decode(q, k, v, cos.to(dtype).float(), sin.to(dtype).float(), kc, vc, slots, pos, window)
    assert (out.double() - ref).abs().max().item() <= tol * (1 + ref.abs().max().item())
    got_k, got_v = unpaged(kp, tables), unpaged(vp, tables)
    assert (got_k.double() - rk.double()).abs().max().item() <= ROUND[dtype] * 2 * rk.abs().max().item()
    assert torch.equal(got_v, rv)  # v is copied bit for bit
    written = torch.zeros(S, P, dtype=torch.bool)
    written[slots, pos] = True
    assert torch.equal(got_k.transpose(1, 2)[~written], kc.transpose(1, 2)[~written])  # nothing else touched


def test_decode_attention_matches_the_torch_path_on_a_window_batch():
    """The op against the model's own torch path (layers.attend with a decode mask), through the
    engine's pool with scattered block tables of different lengths."""
    from mistralrs_py.engine.kv_cache import CacheShape, KVCachePool
    from mistralrs_py.models.layers import attend

    g = torch.Generator().manual_seed(7)
    H, Hk, hd, W = 4, 2, 32, 6
    pool = KVCachePool(CacheShape(1, Hk, hd), 12, 8, torch.float32, torch.device("cpu"))
    pool.buffer.copy_(torch.randn(pool.buffer.shape, generator=g))
    tables = {2: [5, 1], 0: [7, 0, 9, 3], 3: [11]}
    view = pool.build_view([(2, 9), (0, 30), (3, 3)], [], W, [], tables)
    assert view.window == W and view.decode_tables.tolist()[2] == [11, 12, 12, 12]  # padded with the scratch block
    q, k, v = (
        torch.randn(3, H, hd, generator=g),
        torch.randn(3, Hk, hd, generator=g),
        torch.randn(3, Hk, hd, generator=g),
    )
    ang = torch.rand(3, hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([-ang.sin(), ang.sin()], -1)[:, None]
    kc, vc = pool.k[0].clone(), pool.v[0].clone()
    before = pool.k[0].clone()
    ref = attend(apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v, kc, vc, view)
    out = ops.decode_attention(
        q, k, v, cos[:, 0], sin[:, 0], pool.k[0], pool.v[0], view.decode_tables, view.positions, W, hd**-0.5
    )
    assert (out - ref).abs().max().item() < 1e-5
    assert (pool.k[0] - kc).abs().max().item() < 1e-6 and torch.equal(pool.v[0], vc)
    changed = (pool.k[0] != before).any(1).any(-1).nonzero().tolist()  # (block, offset) written
    assert changed == [[1, 1], [3, 6], [11, 3]]  # positions 9, 30 and 3 through their tables


def test_bad_arguments_raise_not_crash():
    kc = torch.zeros(2, 1, 8, 16)
    q, k = torch.zeros(1, 2, 16), torch.zeros(1, 1, 16)
    cs = torch.zeros(1, 16)
    one, zero = torch.tensor([[1]]), torch.tensor([0])
    with pytest.raises(RuntimeError, match="outside its table"):
        ops.decode_attention(q, k, k, cs, cs, kc, kc.clone(), one, torch.tensor([8]), 0, 0.25)
    with pytest.raises(RuntimeError, match="reads block 2 of 2"):
        ops.decode_attention(q, k, k, cs, cs, kc, kc.clone(), torch.tensor([[2]]), zero, 0, 0.25)
    with pytest.raises(RuntimeError, match="reads block -1"):
        ops.decode_attention(q, k, k, cs, cs, kc, kc.clone(), torch.tensor([[-1, 0]]), torch.tensor([9]), 0, 0.25)
    with pytest.raises(RuntimeError, match="block must be contiguous"):
        ops.decode_attention(q, k, k, cs, cs, kc.transpose(2, 3), kc.clone().transpose(2, 3), one, zero, 0, 0.25)
    with pytest.raises(RuntimeError, match="same cache position"):
        ops.decode_attention(
            q.expand(2, 2, 16),
            k.expand(2, 1, 16),
            k.expand(2, 1, 16),
            cs.expand(2, 16),
            cs.expand(2, 16),
            kc,
            kc.clone(),
            torch.tensor([[1, 0], [0, 1]]),
            torch.tensor([0, 8]),  # both at block 1, offset 0
            0,
            0.25,
        )
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.decode_attention(q.bfloat16(), k, k, cs, cs, kc, kc.clone(), one, zero, 0, 0.25)
    with pytest.raises(RuntimeError, match="query heads"):
        ops.decode_attention(
            torch.zeros(1, 3, 16),
            torch.zeros(1, 2, 16),
            torch.zeros(1, 2, 16),
            cs,
            cs,
            torch.zeros(2, 2, 8, 16),
            torch.zeros(2, 2, 8, 16),
            one,
            zero,
            0,
            0.25,
        )
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


def test_decode_attention_skips_padding_rows_of_the_scratch_block():
    """--compile pads a batch with rows in the scratch block: they are skipped (zero output, no write),
    so the block may repeat, and the real rows are unaffected."""
    g = torch.Generator().manual_seed(11)
    H, Hk, hd, S, P, bs = 4, 2, 16, 3, 12, 4
    kc, vc = torch.randn(S, Hk, P, hd, generator=g), torch.randn(S, Hk, P, hd, generator=g)
    kp, tables = paged(kc, bs, g)
    vp = torch.empty_like(kp)
    for s in range(S):
        for j in range(P // bs):
            vp[tables[s, j]] = vc[s, :, j * bs : (j + 1) * bs]
    kp0, vp0 = kp.clone(), vp.clone()
    q, k, v = (
        torch.randn(4, H, hd, generator=g),
        torch.randn(4, Hk, hd, generator=g),
        torch.randn(4, Hk, hd, generator=g),
    )
    ang = torch.rand(4, hd // 2, generator=g)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([-ang.sin(), ang.sin()], -1)
    scratch = int(tables[2, 0])
    rows = torch.stack([tables[1], tables[0], torch.full((3,), scratch), torch.full((3,), scratch)])
    pos = torch.tensor([5, 2, 0, 0])  # rows 2 and 3: padding in the scratch block
    out = ops.decode_attention(q, k, v, cos, sin, kp, vp, rows, pos, 0, hd**-0.5, scratch)
    ref, _, _ = ref_decode(q[:2], k[:2], v[:2], cos[:2], sin[:2], kc, vc, [1, 0], [5, 2], 0)
    assert (out[:2].double() - ref).abs().max().item() < 1e-5
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))
    assert torch.equal(kp[scratch], kp0[scratch]) and torch.equal(vp[scratch], vp0[scratch])
    with pytest.raises(RuntimeError, match="same cache position"):  # without the skip, the repeat is refused
        ops.decode_attention(q, k, v, cos, sin, kp, vp, rows, pos, 0, hd**-0.5)


def parts_of(spans, rows):
    return torch.tensor([(s, e, r) for (s, e), r in zip(spans, rows)], dtype=torch.long)


def lora_ref(x, a, bt, lam, lam_rows, spans, constant):
    """float64 adapters' update [M, N] in the compact layout (csrc/linear.cpp), and its magnitude
    bound (the same sums over absolute values, for float32 accumulation error)."""
    M, (R, N) = x.shape[0], bt.shape
    upd, mag = torch.zeros(M, N, dtype=torch.float64), torch.zeros(M, N, dtype=torch.float64)
    for p, (s, e) in enumerate(spans):
        ap = a[p * R : (p + 1) * R].double()
        scale = (
            lam[:, lam_rows[p], :].double() if lam is not None else torch.full((M, R), constant, dtype=torch.float64)
        )
        upd[:, s:e] = ((x.double() @ ap.T) * scale) @ bt[:, s:e].double()
        mag[:, s:e] = ((x.double().abs() @ ap.abs().T) * scale.abs()) @ bt[:, s:e].double().abs()
    return upd, mag


# (N, spans): one part covering the output; a fused q/k/v-like projection with one part left out
# (its columns get no update); three parts back to back
LORA_LAYOUTS = {
    "whole": (70, [(0, 70)]),
    "gap": (70, [(0, 30), (45, 70)]),
    "fused3": (57, [(0, 33), (33, 45), (45, 57)]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 3, 8])
@pytest.mark.parametrize("layout", list(LORA_LAYOUTS))
@pytest.mark.parametrize("lam_kind", ["constant", "shared", "layerwise"])
def test_lora_linear(dtype, M, layout, lam_kind):
    """x @ w.T + b + the adapters' update in one op: float32 inside, rounded once."""
    N, spans = LORA_LAYOUTS[layout]
    P, R, K, L = len(spans), 6, 40, 5
    g = torch.Generator().manual_seed(M * 31 + N + P)
    x, w, b = (torch.randn(*s, generator=g).to(dtype) for s in ((M, K), (N, K), (N,)))
    a, bt = torch.randn(P * R, K, generator=g).to(dtype), torch.randn(R, N, generator=g).to(dtype)
    lam = None if lam_kind == "constant" else torch.randn(M, L, R, generator=g)
    rows = {"constant": [0] * P, "shared": [2] * P, "layerwise": [4, 0, 3][:P]}[lam_kind]
    upd, mag = lora_ref(x, a, bt, lam, rows, spans, 0.7)
    ref = x.double() @ w.double().T + b.double() + upd
    parts = parts_of(spans, rows)
    y = ops.lora_linear(x, w, b, a, bt, parts, lam, 0.7, True)
    bound = 2**-20 * (x.double().abs() @ w.double().abs().T + mag) + 1e-5
    assert y.dtype == torch.float32 and y.shape == (M, N)
    assert bool(((y.double() - ref).abs() <= bound).all())
    rounded = ops.lora_linear(x, w, b, a, bt, parts, lam, 0.7)
    assert rounded.dtype == dtype and torch.equal(rounded, y.to(dtype))
    # the base alone, where no part reaches
    bare = torch.ones(N, dtype=torch.bool)
    for s_, e in spans:
        bare[s_:e] = False
    assert torch.equal(y[:, bare], ops.linear(x, w, b, True)[:, bare])


def test_lora_linear_split_across_threads():
    """Two threads, each computing the adapters' a @ x for the parts its rows meet."""
    g = torch.Generator().manual_seed(3)
    M, K, R, spans = 2, 576, 24, [(0, 576), (576, 768), (768, 960)]
    x, w = torch.randn(M, K, generator=g).bfloat16(), torch.randn(960, K, generator=g).bfloat16()
    a, bt = torch.randn(3 * R, K, generator=g).bfloat16() * 0.05, torch.randn(R, 960, generator=g).bfloat16() * 0.05
    lam = torch.rand(M, 30, R, generator=g)
    upd, mag = lora_ref(x, a, bt, lam, [7, 8, 9], spans, 0.0)
    ref = x.double() @ w.double().T + upd
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y = ops.lora_linear(x, w, None, a, bt, parts_of(spans, [7, 8, 9]), lam, 0.0, True)
    finally:
        torch.set_num_threads(threads)
    assert bool(((y.double() - ref).abs() <= 2**-20 * (x.double().abs() @ w.double().abs().T + mag) + 1e-5).all())


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", list(LORA_LAYOUTS))
@pytest.mark.parametrize("lam_kind", ["constant", "layerwise"])
def test_lora_add(wdtype, layout, lam_kind):
    """y += the adapters' update in place, float32 inside, for float32 or bf16 adapters over a bf16
    y (a quantized base's output), rounded once."""
    N, spans = LORA_LAYOUTS[layout]
    P, R, K, M = len(spans), 4, 40, 3
    g = torch.Generator().manual_seed(5 + N + P)
    x, y = torch.randn(M, K, generator=g).bfloat16(), torch.randn(M, N, generator=g).bfloat16()
    a, bt = torch.randn(P * R, K, generator=g).to(wdtype), torch.randn(R, N, generator=g).to(wdtype)
    lam = None if lam_kind == "constant" else torch.randn(M, 4, R, generator=g)
    rows = [3, 0, 1][:P]
    upd, mag = lora_ref(x, a, bt, lam, rows, spans, 0.7)
    ref = y.double() + upd
    out = y.clone()
    ops.lora_add_(out, x, a, bt, parts_of(spans, rows), lam, 0.7)
    assert bool(((out.double() - ref).abs() <= ref.abs() * 2**-8 + mag * 2**-20 + 1e-6).all())


def test_lora_ops_refuse_bad_arguments():
    x, w = torch.randn(2, 8), torch.randn(10, 8)
    a, bt, lam = torch.randn(6, 8), torch.randn(3, 10), torch.randn(2, 4, 3)
    ok = parts_of([(0, 5), (5, 10)], [0, 1])
    ops.lora_linear(x, w, None, a, bt, ok, lam, 0.0)
    for bad, match in [
        (parts_of([(0, 5)], [0]), "parts must be"),
        (ok.int(), "parts must be"),
        (parts_of([(0, 6), (5, 10)], [0, 1]), "ordered, disjoint"),
        (parts_of([(0, 5), (5, 11)], [0, 1]), "ordered, disjoint"),
        (parts_of([(0, 5), (5, 10)], [0, 4]), "out of range"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            ops.lora_linear(x, w, None, a, bt, bad, lam, 0.0)
    with pytest.raises(RuntimeError, match="lam must be"):
        ops.lora_linear(x, w, None, a, bt, ok, torch.randn(2, 4, 2), 0.0)
    with pytest.raises(RuntimeError, match="x's dtype"):
        ops.lora_linear(x, w, None, a.bfloat16(), bt.bfloat16(), ok, lam, 0.0)
    with pytest.raises(RuntimeError, match="multiple of R"):
        ops.lora_linear(x, w, None, torch.randn(7, 8), bt, ok, lam, 0.0)
    with pytest.raises(RuntimeError, match="lam must be"):
        ops.lora_add_(torch.zeros(2, 10), x, a, bt, ok, torch.zeros(2, 4, 2), 0.0)


@pytest.mark.parametrize("V", [1, 7, 8, 49, 49152])
def test_argmax_rows_is_torchs_argmax(V):
    """Greedy sampling's argmax: the first maximum, the first NaN when a row has one, 0 for a row of
    -inf; sizes off the vector width cover the tails. sampling.argmax_rows goes through it."""
    from mistralrs_py.sampling import argmax_rows

    g = torch.Generator().manual_seed(V)
    x = torch.randn(9, V, generator=g)
    x[1] = float("-inf")
    x[2] = 0.0
    x[3, V // 2] = float("nan")
    x[3, -1] = float("nan")
    x[4, -1] = 1e30  # the maximum in the scalar tail
    x[5, V // 3] = x[5, -1] = 1e30  # a tie: the first one
    x[6, 0] = float("inf")
    x[7, -1] = float("nan")
    got = ops.argmax_rows(x)
    assert got.dtype == torch.long and torch.equal(got, x.argmax(-1))
    assert torch.equal(argmax_rows(x), x.argmax(-1))
    assert ops.argmax_rows(x[:0]).shape == (0,)
    with pytest.raises(RuntimeError, match="float32"):
        ops.argmax_rows(x.double())
