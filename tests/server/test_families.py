"""Each decoder family through the real CLI and the official openai client: tiny random Qwen2, Qwen3,
Mixtral and Qwen3-MoE checkpoints served by `mistralrs mistral -m DIR`, greedy text equal to
transformers' generate (Llama and Mistral are served by the other server tests)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model

from .conftest import client, running_server

FAMILIES = {
    "qwen2": {},
    "qwen3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True},
}


@pytest.mark.parametrize("arch", list(FAMILIES))
def test_a_family_is_served_like_transformers_generates(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / arch, arch, seed=21, **FAMILIES[arch])
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = [5, 17, 33, 2, 60, 61, 7, 90]
    ref.generation_config.eos_token_id = None  # NOTE: as ignore_eos: an EOS is generated and passed over
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :].tolist()
    assert len(want) == 10
    with running_server(["--dtype", "float32"], ["mistral", "-m", str(path)]) as srv:
        c = client(srv.url)
        out = c.completions.create(
            model="default", prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == tok.decode(want, skip_special_tokens=True)
        models = c.models.list().data
        assert models and models[0].id == str(path)
