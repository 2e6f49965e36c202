"""The demo X-LoRA checkpoint (lora/demo.py) on the embedded SmolLM2, against PEFT's XLoraModel on
transformers' load of the same GGUF."""

from __future__ import annotations

import json

import pytest
import torch

from mistralrs_py.lora.demo import ADAPTERS, main
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, load_pipeline
from mistralrs_py.pipeline.hub import embedded_gguf_path
from tests.lora.xlora_util import make_pool, rel_err, step


def peft_from_demo(out):
    """PEFT's XLoraModel over transformers' GGUF load, with the demo's adapters and classifier."""
    import warnings

    from peft import XLoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    base = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    base.config.use_cache = False
    cfg = json.loads((out / "xlora_config.json").read_text())
    xcfg = XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=cfg["hidden_size"],
        adapters={str(i): str(out / a) for i, a in enumerate(ADAPTERS)},
        xlora_depth=cfg["xlora_depth"],
        xlora_size=cfg["xlora_size"],
        layerwise_scalings=cfg["layerwise_scalings"],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft = get_peft_model(base, xcfg).eval()
    clf = load_file(str(out / "xlora_classifier.safetensors"))
    layers = peft.base_model.internal_xlora_classifier.layers  # Linear, ReLU, Dropout, Linear
    with torch.no_grad():
        for ours, j in (("inner.0", 0), ("last", 3)):
            layers[j].weight.copy_(clf[f"{ours}.weight"])
            layers[j].bias.copy_(clf[f"{ours}.bias"])
    return peft


@pytest.mark.slow
def test_demo_on_the_embedded_model_equals_peft(tmp_path):
    out = tmp_path / "demo"
    assert main([str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*ADAPTERS, "ordering.json", "xlora_classifier.safetensors", "xlora_config.json"]
    )
    spec = ModelSpec(
        ModelKind.XLORA, xlora_model_id=str(out), order=str(out / "ordering.json"), dtype="float32", device="cpu"
    )
    pipe = load_pipeline(spec)
    assert pipe.xlora.L == 210 and pipe.summary["fused"] == 60
    ids = pipe.tokenizer.encode_chat(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True
    )
    peft = peft_from_demo(out)
    with torch.no_grad():
        want = peft(input_ids=torch.tensor([ids + [504, 3575, 282]])).logits[0]
    want_s = peft.base_model.get_latest_scalings()[0]
    pool = make_pool(pipe)
    got = step(pipe, pool, prefill=[(0, 0, ids)])
    assert rel_err(got[0], want[len(ids) - 1]) < 1e-4
    assert (pipe.last_scalings - want_s[: len(ids)]).abs().max() < 1e-4
    for k, tok in enumerate([504, 3575, 282]):
        got = step(pipe, pool, decode=[(0, len(ids) + k, tok)])
        assert rel_err(got[0], want[len(ids) + k]) < 1e-4
    # the scalings vary from token to token and the experts change the model
    assert want_s.std(dim=0).mean() > 0.01
    assert rel_err(want, peft_base_logits(peft, ids + [504, 3575, 282])) > 1e-3


def peft_base_logits(peft, ids):
    """The bare base model: PEFT's X-LoRA with every adapter's contribution scaled by 0."""
    peft.base_model.set_global_scaling_weight(0.0)
    try:
        with torch.no_grad():
            return peft(input_ids=torch.tensor([ids])).logits[0]
    finally:
        peft.base_model.set_global_scaling_weight(1.0)
