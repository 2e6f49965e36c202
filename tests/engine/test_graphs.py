"""Decode graphs' static-buffer path (what CUDA graphs replay), run eagerly on the CPU: padding rows,
the scratch block, block tables padded to length buckets and masks must give the same logits as the
plain step."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.graphs import DecodeGraphs, batch_buckets, length_bucket
from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.engine.request import SamplingParams
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir

from .fake import run
from .test_engine_model import make_engine


def test_buckets():
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(6) == [1, 2, 4, 6]
    assert [length_bucket(n, 4096) for n in (1, 256, 257, 3000, 5000)] == [256, 256, 512, 4096, 4096]
    assert length_bucket(300, 300) == 300


@pytest.fixture(scope="module", params=["tiny_llama", "tiny_mistral"])
def pipe(request):
    """Without and with a sliding window (tiny_mistral's is 8 positions, inside one length bucket)."""
    path = request.getfixturevalue(request.param)
    return load_safetensors_dir(path, ModelSpec(model_id=str(path)), torch.device("cpu"), torch.float32)


def test_padded_static_decode_equals_the_plain_step(pipe):
    torch.manual_seed(0)
    pool = KVCachePool.for_pipeline(pipe, 4, block_size=4)
    scratch = pool.scratch_block
    assert scratch == pool.num_blocks
    lengths = [5, 17, 11]
    slots = [0, 1, 2]
    prompts = [torch.randint(5, 300, (n,)).tolist() for n in lengths]
    for s, ids in zip(slots, prompts):
        view = pool.build_view([], [(s, 0, len(ids))], pipe.config.sliding_window, [True])
        pipe.forward(torch.tensor(ids), view, pool)
    nxt = [7, 8, 9]
    decode = [(s, n) for s, n in zip(slots, lengths)]
    graphs = DecodeGraphs(pipe.forward, pool, 4, pipe.max_model_len, pipe.config.sliding_window, capture=False)
    # 3 rows padded to a bucket of 4, tables padded to the cache length bucket 256
    got = graphs.run(nxt, decode, [pool.slot_table(s) for s in slots])
    view = pool.build_view(decode, [], pipe.config.sliding_window, [])
    want = pipe.forward(torch.tensor(nxt), view, pool)
    assert got.shape == want.shape == (3, pipe.config.vocab_size)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # the padding row wrote only the scratch block; slot 3's blocks were never reached
    assert pool.k[0][scratch, :, 0].abs().sum() > 0 and set(pool.slot_table(3)) <= pool._unzeroed


@pytest.mark.parametrize("ops", ["torch-ops", "cpu-kernels"])
def test_engine_with_static_decode_gives_the_same_tokens(pipe, monkeypatch, ops):
    from mistralrs_py.models import kernels
    from mistralrs_py.models.llama import use_cpu_kernels

    if ops == "cpu-kernels" and not kernels.available():
        pytest.skip(f"CPU kernels off: {kernels.why_unavailable()}")
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [[5, 9, 14], list(range(20, 43)), [7] * 11]
    plain = make_engine(pipe, max_seqs=4)
    try:
        ref = [c.tokens() for c in run(plain, prompts, [params] * 3)]
    finally:
        plain.stop()
    # NOTE: the padded rows of a static batch reach our fused decode op too (it must skip the
    # scratch block and honour the sliding window)
    use_cpu_kernels(pipe.network(), ops == "cpu-kernels")
    # NOTE: --compile's path with the compiler taken out: decode steps on the static, bucketed
    # buffers of engine/graphs.py, run eagerly (what CUDA graphs capture on a GPU)
    monkeypatch.setattr(pipe, "compile_decode", lambda: None)
    calls = []
    real_run = DecodeGraphs.run
    monkeypatch.setattr(
        DecodeGraphs, "run", lambda self, ids, dec, tables: calls.append(len(dec)) or real_run(self, ids, dec, tables)
    )
    eng = Engine(pipe, max_seqs=4, compile=True, block_size=4)
    assert eng.runner.graphs is not None
    calls.clear()  # the warm-up ran every bucket
    eng.start()
    try:
        got = [c.tokens() for c in run(eng, prompts, [params] * 3)]
    finally:
        eng.stop()
        use_cpu_kernels(pipe.network(), False)
    assert got == ref
    assert calls and max(calls) == 3  # decode steps went through the static path, batched
