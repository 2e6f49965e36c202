"""Mixtures of experts: Mixtral and Qwen3-MoE against transformers' MixtralForCausalLM and
Qwen3MoeForCausalLM on random tiny checkpoints (float32): prefill in chunks, decode after it, and a
batch of unequal lengths whose tokens route to different experts."""

from __future__ import annotations

import pytest
import torch

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

MOE = [
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("mixtral", {"num_local_experts": 3, "num_experts_per_tok": 1, "sliding_window": 8}),
    ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True}),
    ("qwen3_moe", {"num_experts": 5, "num_experts_per_tok": 3, "moe_intermediate_size": 48, "norm_topk_prob": False}),
]


@pytest.mark.parametrize("arch,overrides", MOE)
@pytest.mark.parametrize("fused", [False, True])
def test_prefill_and_decode_match_transformers(tmp_path, arch, overrides, fused, ops):
    path = make_tiny_model(tmp_path / "m", arch, seed=len(overrides) + 7, **overrides)
    ours = load_ours(path, ops)
    if fused:
        from mistralrs_py.models.fusion import fuse_linears
        from mistralrs_py.models.llama import fuse_projections, use_cpu_kernels

        experts = ours.config.num_experts
        assert fuse_projections(ours.model, fuse_linears) == ours.config.num_layers * (1 + experts)
        use_cpu_kernels(ours.model, ops)
    ref = load_ref(path)
    c = ours.config
    assert c.num_experts == overrides.get("num_local_experts", overrides.get("num_experts"))
    check_prefill_and_decode(ours, ref)


@pytest.mark.parametrize("arch,overrides", [MOE[0], MOE[3]])
def test_a_mixed_batch_matches_transformers(tmp_path, arch, overrides, ops):
    path = make_tiny_model(tmp_path / "m", arch, seed=9, **overrides)
    check_mixed_batch(load_ours(path, ops), load_ref(path))


@pytest.mark.parametrize("arch,overrides", [MOE[0], MOE[2]])
def test_a_gguf_of_the_experts_matches(tmp_path, arch, overrides):
    """llama.cpp's layout ([experts, out, in] tensors, the router as ffn_gate_inp; Mixtral as `llama`
    with q/k permuted): float32 equals the safetensors model; a quantized file's experts are the
    gguf package's dequantization of each whole [experts, out, in] tensor, and its quantized
    kernels give the logits of those dense weights."""
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFReader, quants

    from mistralrs_py.pipeline.base import ModelSpec
    from mistralrs_py.pipeline.gguf import load_gguf_file
    from tests.gguf_util import write_gguf

    path = make_tiny_model(tmp_path / "m", arch, seed=12, **overrides)
    (tmp_path / "f").mkdir()
    (tmp_path / "q").mkdir()
    cpu = torch.device("cpu")
    exact = load_gguf_file(
        write_gguf(path, tmp_path / "f" / "t.gguf", qtypes=(Q.F32,)), ModelSpec(), cpu, torch.float32, quantized=False
    )
    assert exact.config.model_type == arch and exact.config.num_experts > 1
    prompt = list(range(3, 30))
    want = ref_logits(load_ref(path), prompt)[-1]
    assert rel_err(step(exact, make_pool(exact, 1), prefill=[(0, 0, prompt)])[0], want) < 1e-4

    qfile = write_gguf(path, tmp_path / "q" / "t.gguf", qtypes=(Q.Q8_0, Q.Q4_0))
    dense = load_gguf_file(qfile, ModelSpec(), cpu, torch.float32, quantized=False)
    quant = load_gguf_file(qfile, ModelSpec(dtype="float32"), cpu, torch.float32, quantized=True)
    for t in GGUFReader(str(qfile)).tensors:
        if t.name.endswith("_exps.weight"):
            full = torch.from_numpy(quants.dequantize(t.data, t.tensor_type)).reshape(*reversed(t.shape.tolist()))
            i, proj = t.name.split(".")[1], {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
            kind = proj[t.name.split(".")[2].removeprefix("ffn_").removesuffix("_exps")]
            for j, expert in enumerate(dense.model.layers[int(i)].mlp.experts):
                assert torch.equal(getattr(expert, kind).weight, full[j])
    a = step(dense, make_pool(dense, 1), prefill=[(0, 0, prompt)])[0]
    b = step(quant, make_pool(quant, 1), prefill=[(0, 0, prompt)])[0]
    assert rel_err(b, a) < 1e-4
    # the default (float32 activations, blocks kept): the experts on our int8-activation kernels
    from mistralrs_py.models import qmatmul

    if qmatmul.available():
        packed = load_gguf_file(qfile, ModelSpec(), cpu, torch.float32, quantized=True)
        assert "qmm" in packed.summary["format"], packed.summary["format"]
        c = step(packed, make_pool(packed, 1), prefill=[(0, 0, prompt)])[0]
        assert 0 < rel_err(c, a) < 0.05


@pytest.mark.parametrize("arch,overrides", [MOE[0], MOE[2]])
def test_llama_cpp_reads_our_expert_files_as_we_do(tmp_path, arch, overrides):
    """Where `make bench-peers` installed llama-cpp-python: llama.cpp itself on the same GGUF
    (transformers cannot read these MoE files: it takes Mixtral's for a dense Llama and refuses
    Qwen3-MoE's), greedy tokens equal ours."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by `make bench-peers`")
    from gguf import GGMLQuantizationType as Q

    from mistralrs_py.pipeline.base import ModelSpec
    from mistralrs_py.pipeline.gguf import load_gguf_file
    from tests.gguf_util import write_gguf

    path = make_tiny_model(tmp_path / "m", arch, seed=12, **overrides)
    (tmp_path / "g").mkdir()
    gguf = write_gguf(path, tmp_path / "g" / "t.gguf", qtypes=(Q.Q8_0,))
    prompt = list(range(3, 20))
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=64, verbose=False)
    theirs = []
    for tok in llm.generate(prompt, temp=0.0, top_k=1):
        theirs.append(tok)
        if len(theirs) == 8:
            break
    pipe = load_gguf_file(gguf, ModelSpec(dtype="float32"), torch.device("cpu"), torch.float32, quantized=True)
    pool = make_pool(pipe, 1)
    out, ours, pos = step(pipe, pool, prefill=[(0, 0, prompt)]), [], len(prompt)
    for _ in range(8):
        ours.append(int(out[0].argmax()))
        out = step(pipe, pool, decode=[(0, pos, ours[-1])])
        pos += 1
    assert ours == theirs
