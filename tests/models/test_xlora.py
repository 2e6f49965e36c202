"""X-LoRA forward against PEFT's XLoraModel on tiny random models: full prompts, scalings, options."""

from __future__ import annotations

import pytest
import torch

from mistralrs_py.pipeline.base import load_pipeline
from tests.lora.xlora_util import ALL, build_xlora, full_scalings, load_base, make_pool, ref, rel_err, step

# Each case is a set of X-LoRA options PEFT implements; all compare logits and scalings at every position.
CASES = {
    "layerwise-depth2": dict(),
    "depth1-shared-subset-temp-g-bf16": dict(
        depth=1,
        layerwise=False,
        targets=["q_proj", "v_proj", "down_proj"],
        temperature=0.5,
        g=0.7,
        adapter_dtype=torch.bfloat16,
        ranks=(4, 4),
    ),
    "topk2-softmax-topk-no-softmax": dict(enable_softmax=False, top_k=2, softmax_topk=True, clf_std=0.3),
    "topk1-layerwise": dict(top_k=1),
    "scaling-pass-0.5-depth3-xlora-names": dict(spv=0.5, depth=3, xlora_pkg_names=True, layerwise=False),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("no_kv_cache", [False, True], ids=["dual-cache", "no-cache"])
def test_full_prompt_logits_and_scalings_equal_peft(tiny_llama, tmp_path, name, no_kv_cache):
    case = build_xlora(tiny_llama, tmp_path / "x", seed=len(name), **CASES[name])
    pipe = load_pipeline(case.spec(no_xlora_kv_cache=no_kv_cache))
    ids = torch.randint(0, pipe.config.vocab_size, (13,), generator=torch.Generator().manual_seed(len(name))).tolist()
    want, want_s = ref(case, ids)
    got = step(pipe, make_pool(pipe), prefill=[(1, 0, ids)], all_rows=True)
    assert rel_err(got, want) < 1e-4
    assert (full_scalings(pipe) - want_s).abs().max().item() < 1e-5
    # the adapters matter: the same prompt through the bare base model differs clearly
    with torch.no_grad():
        base = load_base(pretrained_model_name_or_path=str(tiny_llama))(torch.tensor([ids])).logits[0]
    assert rel_err(got, base) > 1e-2


def test_forced_single_adapter_equals_merged_lora(tiny_llama, tmp_path):
    """A classifier that always picks adapter 1 (softmax of a +-100 bias is exactly one-hot in float32)
    gives that plain LoRA merged into the base model."""
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    case = build_xlora(tiny_llama, tmp_path / "x", depth=1, layerwise=True)
    f = case.xlora_dir / "xlora_classifier.safetensors"
    t = load_file(str(f))
    t["last.weight"].zero_()
    bias = torch.full((case.n_layers, 3), -100.0)
    bias[:, 1] = 100.0
    t["last.bias"] = bias.flatten()
    save_file(t, str(f))
    pipe = load_pipeline(case.spec())
    ids = list(range(5, 20))
    got = step(pipe, make_pool(pipe), prefill=[(0, 0, ids)], all_rows=True)
    assert torch.equal(full_scalings(pipe), torch.tensor([0.0, 1.0, 0.0]).expand(len(ids), case.n_layers, 3))
    merged = PeftModel.from_pretrained(
        load_base(pretrained_model_name_or_path=str(tiny_llama)), str(case.adapter_dirs[1])
    ).merge_and_unload()
    with torch.no_grad():
        want = merged(torch.tensor([ids])).logits[0]
    assert rel_err(got, want) < 1e-4


def test_zero_global_weight_is_the_base_model(tiny_llama, tmp_path):
    case = build_xlora(tiny_llama, tmp_path / "x", g=0.0, targets=["k_proj", "o_proj", "up_proj"])
    pipe = load_pipeline(case.spec())
    ids = list(range(30, 41))
    got = step(pipe, make_pool(pipe), prefill=[(0, 0, ids)], all_rows=True)
    with torch.no_grad():
        want = load_base(pretrained_model_name_or_path=str(tiny_llama))(torch.tensor([ids])).logits[0]
    assert rel_err(got, want) < 1e-5
    assert rel_err(got, ref(case, ids)[0]) < 1e-4


def test_layer_indices_of_the_ordering_are_used(tiny_llama, tmp_path):
    """A shuffled layer map changes a layerwise model; shuffling the classifier rows the same way undoes it."""
    import json

    from safetensors.torch import load_file, save_file

    case = build_xlora(tiny_llama, tmp_path / "x", targets=ALL)
    ids = list(range(50, 62))
    want, _ = ref(case, ids)
    order = json.loads(case.ordering.read_text())
    L, n = case.n_layers, 3
    perm = torch.randperm(L, generator=torch.Generator().manual_seed(3)).tolist()  # module j -> index perm[j]
    order["layers"] = {k: perm[v] for k, v in order["layers"].items()}
    case.ordering.write_text(json.dumps(order))
    shuffled = step(p := load_pipeline(case.spec()), make_pool(p), prefill=[(0, 0, ids)], all_rows=True)
    assert rel_err(shuffled, want) > 1e-3
    f = case.xlora_dir / "xlora_classifier.safetensors"
    t = load_file(str(f))
    inv = [0] * L
    for j, v in enumerate(perm):
        inv[v] = j  # row block v of the new classifier = row block j (module j's) of the old one
    rows = torch.tensor([inv[v] * n + a for v in range(L) for a in range(n)])
    t["last.weight"], t["last.bias"] = t["last.weight"][rows], t["last.bias"][rows]
    save_file(t, str(f))
    fixed = step(p := load_pipeline(case.spec()), make_pool(p), prefill=[(0, 0, ids)], all_rows=True)
    assert rel_err(fixed, want) < 1e-4


def test_the_decoder_without_scalings_is_the_base_model(tiny_llama, tmp_path):
    """Scalings reach the wrapped linears only through a pass's forward: the same decoder called
    without them (lora=None), after an X-LoRA step, is the bare base model."""
    case = build_xlora(tiny_llama, tmp_path / "x", targets=ALL)
    pipe = load_pipeline(case.spec())
    ids = list(range(40, 52))
    step(pipe, make_pool(pipe), prefill=[(0, 0, ids)], all_rows=True)
    pool = make_pool(pipe)
    view = pool.build_view([], [(0, 0, len(ids))], pipe.config.sliding_window, [True])
    view.logit_rows = torch.arange(len(ids))
    with torch.inference_mode():
        got = pipe.model(torch.tensor(ids), view, pool)
    with torch.no_grad():
        want = load_base(pretrained_model_name_or_path=str(tiny_llama))(torch.tensor([ids])).logits[0]
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "mistral"])
def test_every_dense_family_takes_x_lora_like_peft(tmp_path, arch):
    """X-LoRA over the other dense families (q/k/v biases, q/k norms, a sliding window)."""
    from tests.conftest import make_tiny_model

    base = make_tiny_model(tmp_path / "base", arch, seed=13)
    case = build_xlora(base, tmp_path / "x", seed=3)
    pipe = load_pipeline(case.spec())
    assert pipe.config.model_type == arch
    ids = torch.randint(0, pipe.config.vocab_size, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    want, want_s = ref(case, ids)
    got = step(pipe, make_pool(pipe), prefill=[(1, 0, ids)], all_rows=True)
    assert rel_err(got, want) < 1e-4
    assert (full_scalings(pipe) - want_s).abs().max().item() < 1e-5
