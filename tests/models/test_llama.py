"""Our decoder against transformers' LlamaForCausalLM / MistralForCausalLM on random tiny checkpoints."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.models import kernels
from mistralrs_py.models.fusion import fuse_linears
from mistralrs_py.models.llama import fuse_projections, use_cpu_kernels
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir
from tests.conftest import make_tiny_model


def load_ours(path, cpu_ops: bool, dtype=torch.float32, fused=False):
    pipe = load_safetensors_dir(path, ModelSpec(model_id=str(path)), torch.device("cpu"), dtype)
    if fused:
        assert fuse_projections(pipe.model, fuse_linears) == 2 * pipe.config.num_layers
    # NOTE: after fusion, as load_pipeline does: the fused modules are new
    use_cpu_kernels(pipe.model, cpu_ops)
    return pipe


def load_ref(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def make_pool(pipe, slots=4):
    return KVCachePool.for_pipeline(pipe, slots)


def step(pipe, pool, decode=(), prefill=()):
    """decode: [(slot, pos, token)]; prefill: [(slot, start, tokens)] -> logits rows."""
    ids = [t for _, _, t in decode] + [t for _, _, toks in prefill for t in toks]
    view = pool.build_view(
        [(s, p) for s, p, _ in decode],
        [(s, st, len(toks)) for s, st, toks in prefill],
        pipe.config.sliding_window,
        [True] * len(prefill),
    )
    return pipe.forward(torch.tensor(ids), view, pool)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def ref_logits(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor([ids]), use_cache=False).logits[0]


@pytest.mark.parametrize(
    "arch,overrides",
    [
        ("llama", {}),
        ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32,
                },
                "rope_theta": 500000.0,
            },
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "attention_bias": True}),
        ("mistral", {"sliding_window": 8}),
    ],
)
@pytest.mark.parametrize("fused", [False, True])
def test_prefill_and_decode_match_transformers(tmp_path, arch, overrides, fused, ops):
    path = make_tiny_model(tmp_path / "m", arch, seed=hash(str(overrides)) % 1000, **overrides)
    check_prefill_and_decode(load_ours(path, ops, fused=fused), load_ref(path))


def check_prefill_and_decode(ours, ref):
    """21 tokens (longer than the windows tested): two prefill chunks (the second attends to cached
    keys), then one decode step at a time reading the cache; every row against transformers."""
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, ours.config.vocab_size, (21,), generator=g).tolist()
    full = ref_logits(ref, prompt)  # [T, V]
    pool = make_pool(ours)
    out = step(ours, pool, prefill=[(0, 0, prompt[:9])])
    assert rel_err(out[0], full[8]) < 1e-4
    out = step(ours, pool, prefill=[(0, 9, prompt[9:17])])
    assert rel_err(out[0], full[16]) < 1e-4
    for pos in range(17, 21):
        out = step(ours, pool, decode=[(0, pos, prompt[pos])])
        assert rel_err(out[0], full[pos]) < 1e-4, pos


def test_mixed_batch_of_unequal_lengths(tmp_path, ops):
    path = make_tiny_model(tmp_path / "m", "mistral", sliding_window=6)
    check_mixed_batch(load_ours(path, ops, fused=True), load_ref(path))


def check_mixed_batch(ours, ref):
    """Decode rows of different lengths, non-contiguous slots and a prefill chunk, in one step."""
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, ours.config.vocab_size, (n,), generator=g).tolist() for n in (5, 13, 9)]
    pool = make_pool(ours, slots=4)
    slots = [3, 0, 2]  # deliberately not contiguous
    for s, toks in zip(slots, seqs[:2]):
        step(ours, pool, prefill=[(s, 0, toks[:-1])])
    out = step(
        ours,
        pool,
        decode=[(slots[0], len(seqs[0]) - 1, seqs[0][-1]), (slots[1], len(seqs[1]) - 1, seqs[1][-1])],
        prefill=[(slots[2], 0, seqs[2])],
    )
    for row, toks in enumerate(seqs):
        assert rel_err(out[row], ref_logits(ref, toks)[-1]) < 1e-4, row


def test_bfloat16_close_to_float32(tiny_llama, ops):
    ours32, ours16 = load_ours(tiny_llama, ops), load_ours(tiny_llama, ops, torch.bfloat16)
    prompt = list(range(5, 25))
    pool32, pool16 = make_pool(ours32), make_pool(ours16)
    a = step(ours32, pool32, prefill=[(0, 0, prompt)])
    b = step(ours16, pool16, prefill=[(0, 0, prompt)])
    assert rel_err(b, a) < 0.05
    for pos in range(20, 24):  # bf16 decode steps (the fused op's bf16 path on the CPU)
        a = step(ours32, pool32, decode=[(0, pos, pos)])
        b = step(ours16, pool16, decode=[(0, pos, pos)])
        assert b.dtype == torch.float32 and rel_err(b, a) < 0.05, pos


def mistralrs_ops(fn) -> set[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events() if e.name.startswith("mistralrs::")}


def test_the_kernel_choice_is_the_modules_own(tiny_llama):
    """Each module runs what use_cpu_kernels chose for it, whatever the kernels' build state: one
    decode step calls every fused op when on and none when off."""
    if not kernels.available():
        pytest.skip(f"CPU kernels off: {kernels.why_unavailable()}")
    pipe = load_ours(tiny_llama, True, torch.bfloat16, fused=True)
    pool = make_pool(pipe)
    step(pipe, pool, prefill=[(0, 0, list(range(5, 12)))])
    on = mistralrs_ops(lambda: step(pipe, pool, decode=[(0, 7, 12)]))
    assert {"mistralrs::rms_norm", "mistralrs::silu_mul", "mistralrs::linear", "mistralrs::decode_attention"} <= on
    # the model, its norm and head; per layer two norms, attention, MLP and four fused projections
    assert use_cpu_kernels(pipe.model, False) == 3 + 8 * pipe.config.num_layers
    assert not mistralrs_ops(lambda: step(pipe, pool, decode=[(0, 8, 13)]))


def test_cpu_kernels_are_not_chosen_without_their_build(tiny_llama, monkeypatch):
    monkeypatch.setattr(kernels, "_state", {"ok": False, "why": "test: no build"})
    pipe = load_safetensors_dir(tiny_llama, ModelSpec(model_id=str(tiny_llama)), torch.device("cpu"), torch.float32)
    with pytest.raises(RuntimeError, match="test: no build"):
        use_cpu_kernels(pipe.model, True)
    assert not any(getattr(m, "cpu_ops", False) for m in pipe.model.modules())
