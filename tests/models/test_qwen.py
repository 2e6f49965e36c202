"""The Qwen2/2.5 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm) members of the decoder family,
against transformers' Qwen2ForCausalLM / Qwen3ForCausalLM on random tiny checkpoints: HF safetensors
and the GGUF llama.cpp's converter would write for them."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.gguf import load_gguf_file
from tests.conftest import make_tiny_model

from .test_llama import (
    check_mixed_batch,
    check_prefill_and_decode,
    load_ours,
    load_ref,
    make_pool,
    ref_logits,
    rel_err,
    step,
)

FAMILIES = [
    ("qwen2", {}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("qwen3", {}),
    ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),  # head_dim != hidden / heads, as in Qwen3
]


@pytest.mark.parametrize("arch,overrides", FAMILIES)
@pytest.mark.parametrize("fused", [False, True])
def test_prefill_and_decode_match_transformers(tmp_path, arch, overrides, fused, ops):
    path = make_tiny_model(tmp_path / "m", arch, seed=len(overrides) + 3, **overrides)
    ours, ref = load_ours(path, ops, fused=fused), load_ref(path)
    c = ours.config
    assert (c.qkv_bias, c.qk_norm, c.attention_bias) == (arch == "qwen2", arch == "qwen3", False)
    check_prefill_and_decode(ours, ref)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_mixed_batch_matches_transformers(tmp_path, arch, ops):
    path = make_tiny_model(tmp_path / "m", arch, seed=9)
    check_mixed_batch(load_ours(path, ops, fused=True), load_ref(path))


@pytest.mark.parametrize("arch,overrides", [("qwen2", {}), ("qwen3", {})])
def test_gguf_greedy_tokens_equal_transformers_reading_the_same_file(tmp_path, arch, overrides):
    from transformers import AutoModelForCausalLM

    from tests.gguf_util import write_gguf

    path = make_tiny_model(tmp_path / "m", arch, seed=5, **overrides)
    (tmp_path / "g").mkdir()
    gguf = write_gguf(path, tmp_path / "g" / "tiny.gguf")
    pipe = load_gguf_file(gguf, ModelSpec(), torch.device("cpu"), torch.float32, quantized=True)
    assert pipe.config.model_type == arch and pipe.config.qk_norm == (arch == "qwen3")
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    prompt = [5, 17, 33, 2, 60, 61, 7]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt) :].tolist()
    pool = make_pool(pipe, slots=1)
    out = step(pipe, pool, prefill=[(0, 0, prompt)])
    got, pos = [], len(prompt)
    for _ in range(12):
        got.append(int(out[0].argmax()))
        out = step(pipe, pool, decode=[(0, pos, got[-1])])
        pos += 1
    assert got == want


def test_a_float32_gguf_with_its_own_head_dim_matches_the_safetensors_model(tmp_path):
    """Qwen3's head_dim (attention.key_length in GGUF) differs from hidden / heads. transformers'
    GGUF reader does not take it, so the reference is the same weights from safetensors."""
    from gguf import GGMLQuantizationType as Q

    from tests.gguf_util import write_gguf

    path = make_tiny_model(tmp_path / "m", "qwen3", seed=6, head_dim=32)
    (tmp_path / "g").mkdir()
    gguf = write_gguf(path, tmp_path / "g" / "tiny.gguf", qtypes=(Q.F32,))
    pipe = load_gguf_file(gguf, ModelSpec(), torch.device("cpu"), torch.float32, quantized=False)
    assert pipe.config.head_dim == 32 and pipe.config.qk_norm
    prompt = list(range(3, 30))
    out = step(pipe, make_pool(pipe, 1), prefill=[(0, 0, prompt)])
    assert rel_err(out[0], ref_logits(load_ref(path), prompt)[-1]) < 1e-4
