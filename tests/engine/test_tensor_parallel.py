"""Tensor parallelism (engine/tensor_parallel.py, models/tensor_parallel.py): the shares each rank
holds, and 2 ranks on gloo (this process is rank 0, a spawned worker rank 1) giving the logits of the
single-process model, float32, for tiny random Llama, Mistral (sliding window), Qwen3 and Mixtral
checkpoints, HF safetensors and GGUF (the GGUF's quantized blocks split before they are dequantized);
and the default quantized kernels on split blocks."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from mistralrs_py.engine.kv_cache import KVCachePool
from mistralrs_py.models.config import ConfigError, ModelConfig
from mistralrs_py.models.tensor_parallel import local_config, plan_shard, split
from mistralrs_py.pipeline.base import LoadError, ModelKind, ModelSpec, load_pipeline
from tests.conftest import make_tiny_model
from tests.gguf_util import write_gguf

FAMILIES = {
    "llama": {},
    "mistral": {"sliding_window": 6},
    "qwen3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def test_split_shares_every_item_once_and_evenly():
    for n in (1, 3, 7, 64, 1536):
        for world in range(1, min(n, 5) + 1):
            parts = [split(n, world, r) for r in range(world)]
            assert parts[0][0] == 0 and parts[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
            sizes = [b - a for a, b in parts]
            assert max(sizes) - min(sizes) <= 1
    assert [split(768, 2, r, unit=256) for r in range(2)] == [(0, 512), (512, 768)]


def _cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=2,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
    )
    return ModelConfig(**{**base, **kw})


def test_uneven_heads_split_whole_groups():
    # NOTE: the embedded model's 9 query / 3 key-value heads over 2 ranks: 6 + 3 query heads
    cfg = _cfg()
    shards = [plan_shard(cfg, r, 2) for r in range(2)]
    assert [s.kv_heads for s in shards] == [(0, 2), (2, 3)]
    assert [s.q_rows for s in shards] == [(0, 384), (384, 576)]
    assert [s.intermediate for s in shards] == [(0, 768), (768, 1536)]  # 3 blocks of 256 each
    local = [local_config(cfg, s) for s in shards]
    assert [(c.num_heads, c.num_kv_heads, c.intermediate_size, c.vocab_size) for c in local] == [
        (6, 2, 768, 24576),
        (3, 1, 768, 24576),
    ]
    s = shards[1]
    assert s.rule("layers.0.self_attn.q_proj.weight") == (0, (384, 576))
    assert s.rule("layers.0.self_attn.o_proj.weight") == (1, (384, 576))
    assert s.rule("layers.0.mlp.down_proj.weight") == (1, (768, 1536))
    assert s.rule("layers.0.mlp.experts.3.up_proj.weight") == (0, s.moe_intermediate)
    assert s.rule("layers.0.input_layernorm.weight") is None and s.rule("layers.0.mlp.gate.weight") is None
    bias = torch.ones(576)
    assert torch.equal(s.take("layers.0.self_attn.o_proj.bias", bias), torch.zeros(576))  # added once, by rank 0
    assert torch.equal(shards[0].take("layers.0.self_attn.o_proj.bias", bias), bias)


def test_more_ranks_than_kv_heads_is_refused_with_the_limit():
    with pytest.raises(ConfigError, match="at most 3"):
        plan_shard(_cfg(), 0, 4)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    out = {}
    for arch, kw in FAMILIES.items():
        hf = make_tiny_model(root / arch, arch, seed=5, **kw)
        out[arch] = (hf, write_gguf(hf, root / f"{arch}.gguf"))
    # NOTE: 3 key/value heads (6 query heads) over 2 ranks: an uneven split, as the embedded model's
    out["uneven"] = (
        make_tiny_model(root / "uneven", "llama", seed=6, num_attention_heads=6, num_key_value_heads=3, hidden_size=96),
        None,
    )
    out["uneven"] = (out["uneven"][0], write_gguf(out["uneven"][0], root / "uneven.gguf"))
    return out


def _spec(fmt: str, paths, dtype: str = "float32") -> ModelSpec:
    hf, gguf = paths
    if fmt == "gguf":
        return ModelSpec(kind=ModelKind.GGUF, quantized_filename=str(gguf), dtype=dtype)
    return ModelSpec(model_id=str(hf), dtype=dtype)


def _steps(pipe) -> list[torch.Tensor]:
    """A prefill of two prompts (every row's logits for one), then 5 decode steps of both: past the
    Mistral model's window of 6."""
    pool = (pipe.pool_type or KVCachePool).for_pipeline(pipe, 2)
    w, dev = pipe.config.sliding_window, pipe.device
    a, b = [5, 17, 33, 2, 60, 61, 7, 90, 11], [9, 8, 7, 6]
    view = pool.build_view([], [(0, 0, len(a)), (1, 0, len(b))], w, ["all", True])
    out = [pipe.forward(torch.tensor(a + b, device=dev), view, pool)]
    for t in range(5):
        view = pool.build_view([(0, len(a) + t), (1, len(b) + t)], [], w, [])
        out.append(pipe.forward(torch.tensor([3 + t, 40 + t], device=dev), view, pool))
    return [o.float().cpu() for o in out]


def _parallel_pipe(spec: ModelSpec):
    from mistralrs_py.engine.tensor_parallel import start

    return start(dataclasses.replace(spec, tp_size=2), threads=1)


def _parallel(spec: ModelSpec, shared_memory: bool = True) -> list[torch.Tensor]:
    pipe = _parallel_pipe(spec)
    try:
        assert pipe.model.cfg.num_kv_heads < pipe.config.num_kv_heads  # NOTE: this rank holds a share
        assert (pipe.group.comm is not None) == shared_memory
        return _steps(pipe)
    finally:
        pipe.close()


@pytest.mark.parametrize("transport", ["shared memory", "gloo"])
@pytest.mark.parametrize("fmt", ["hf", "gguf"])
@pytest.mark.parametrize("arch", [*FAMILIES, "uneven"])
def test_two_ranks_give_the_single_process_logits(checkpoints, arch, fmt, transport, monkeypatch):
    """Ranks of one machine exchange through shared memory (engine/shm_comm.py) by default; gloo alone
    is what ranks on several machines use."""
    if transport == "gloo":
        monkeypatch.setenv("MISTRALRS_TP_SHM", "0")
    spec = _spec(fmt, checkpoints[arch])
    want = _steps(load_pipeline(spec))
    got = _parallel(spec, shared_memory=transport != "gloo")
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.shape[-1] == 400
        rel = ((g - w).abs().max() / w.abs().max()).item()
        assert rel < 1e-5, rel


def test_nccl_two_gpus_give_the_single_process_logits(checkpoints):
    """The NCCL path: one GPU per rank, the step messages on a gloo group of their own."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus < 2:
        pytest.skip(f"the NCCL path needs two GPUs; this machine has {gpus}")
    for fmt in ("hf", "gguf"):
        spec = dataclasses.replace(_spec(fmt, checkpoints["mixtral"]), device="cuda")
        want = _steps(load_pipeline(spec))
        got = _parallel(spec)
        for g, w in zip(got, want):
            assert ((g - w).abs().max() / w.abs().max()).item() < 1e-4


def _text_logprobs(pipe, ids: list[int]) -> torch.Tensor:
    pool = (pipe.pool_type or KVCachePool).for_pipeline(pipe, 1)
    view = pool.build_view([], [(0, 0, len(ids))], None, ["all"])
    return torch.log_softmax(pipe.forward(torch.tensor(ids), view, pool).float(), -1)


def test_collectives_too_large_for_a_slot_go_by_gloo_in_the_same_run(checkpoints, monkeypatch):
    """Slots of 4 KiB: a decode step's all-reduces fit, a prefill's logits (every row) go by gloo; and
    step messages over 100 bytes (the prefill's, with the pool's set-up) go by gloo too."""
    monkeypatch.setenv("MISTRALRS_TP_SHM_SLOT_BYTES", "4096")
    monkeypatch.setenv("MISTRALRS_TP_SHM_MESSAGE_BYTES", "100")
    for fmt in ("hf", "gguf"):
        spec = _spec(fmt, checkpoints["mistral"])
        want = _steps(load_pipeline(spec))
        got = _parallel(spec)
        for g, w in zip(got, want):
            assert ((g - w).abs().max() / w.abs().max()).item() < 1e-5


def test_quantized_kernels_on_split_blocks_are_as_close_to_float32():
    """The default GGUF path keeps the blocks: each rank runs our int8-activation kernels on its whole
    blocks. NOTE: not bit-equal to one process (the ranks' partial sums add in another order, and a
    last-bit change can move an activation across an int8 rounding step), so the check is the one
    that matters: the embedded model split over 2 ranks is as close to its float32 weights (KL
    divergence over 192 tokens of text) as the single process is."""
    from pathlib import Path

    spec = ModelSpec(kind=ModelKind.GGUF)
    single = load_pipeline(spec)
    if "qmm" not in single.summary["format"]:
        pytest.skip(f"our quantized kernels are not built here: {single.summary['format']}")
    text = (Path(__file__).parents[2] / "bench" / "quality_text.txt").read_text()
    ids = single.tokenizer.encode(text, add_special_tokens=False)[:192]
    reference = _text_logprobs(load_pipeline(dataclasses.replace(spec, dtype="float32")), ids)
    one = _text_logprobs(single, ids)
    del single
    split_pipe = _parallel_pipe(spec)
    try:
        two = _text_logprobs(split_pipe, ids)
    finally:
        split_pipe.close()

    def kld(p, q):
        return (p.exp() * (p - q)).sum(-1).mean().item()

    assert kld(reference, two) < 1.5 * kld(reference, one) + 1e-3
    assert (two.argmax(-1) == one.argmax(-1)).float().mean().item() > 0.9


def test_a_model_that_cannot_be_split_is_a_load_error(checkpoints):
    spec = dataclasses.replace(_spec("hf", checkpoints["llama"]), tp_size=3)  # 2 key/value heads
    with pytest.raises(LoadError, match="at most 2"):
        load_pipeline(spec)


def test_a_worker_that_dies_while_starting_fails_the_start_at_once():
    from types import SimpleNamespace

    from mistralrs_py.engine.tensor_parallel import _wait_joined

    class Store:
        def check(self, keys):
            return False

    started = time.monotonic()
    with pytest.raises(LoadError, match="rank 1 exited with code 3 while starting"):
        _wait_joined(Store(), 2, [SimpleNamespace(exitcode=3)])
    assert time.monotonic() - started < 5
