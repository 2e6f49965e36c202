"""Each decoder family through the real CLI and the official openai client: a tiny random Qwen2 and
Qwen3 checkpoint served by `mistralrs mistral -m DIR`, greedy text equal to transformers' generate."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import make_tiny_model

from .conftest import client, running_server


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_a_family_is_served_like_transformers_generates(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / arch, arch, seed=21)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = [5, 17, 33, 2, 60, 61, 7, 90]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False)[0, len(prompt) :].tolist()
    with running_server(["--dtype", "float32"], ["mistral", "-m", str(path)]) as srv:
        c = client(srv.url)
        out = c.completions.create(
            model="default", prompt=prompt, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
        )
        assert out.choices[0].text == tok.decode(want)
        models = c.models.list().data
        assert models and models[0].id == str(path)
