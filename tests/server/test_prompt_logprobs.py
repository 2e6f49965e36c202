"""Prompt logprobs (echo with logprobs, max_tokens 0, vLLM's prompt_logprobs) against transformers in
float32 on the same weights, and the fields OpenAI's clients expect, through a real server."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from mistralrs_py import Runner
from tests.server.conftest import client

TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Prompt token logprobs from transformers (float32): ids -> [None, lp(ids[1]), ...] and top-1 ids."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()

    def ref(ids: list[int]) -> tuple[list, list]:
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return [None] + [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))], [None] + [
            int(lp[i - 1].argmax()) for i in range(1, len(ids))
        ]

    return ref


def tokenize(url, text):
    return httpx.post(f"{url}/tokenize", json={"prompt": text}).json()["tokens"]


def test_echo_logprobs_equal_transformers_and_max_tokens_zero_is_the_prompt(tiny_server, reference):
    url, _ = tiny_server
    ids = tokenize(url, TEXT)
    want, top1 = reference(ids)
    c = client(url)
    out = c.completions.create(model="default", prompt=ids, echo=True, logprobs=2, max_tokens=0)
    lp = out.choices[0].logprobs
    assert out.usage.completion_tokens == 0 and out.usage.prompt_tokens == len(ids)
    assert out.choices[0].text == httpx.post(f"{url}/detokenize", json={"tokens": ids}).json()["prompt"]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    assert max(abs(a - b) for a, b in zip(lp.token_logprobs[1:], want[1:])) < 2e-3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    tok_text = [httpx.post(f"{url}/detokenize", json={"tokens": [t]}).json()["prompt"] for t in top1[1:]]
    assert [max(t, key=t.get) for t in lp.top_logprobs[1:]] == tok_text


def test_echo_logprobs_with_a_generated_token_streamed_and_with_choices(tiny_server, reference):
    """lm-evaluation-harness's request: echo, logprobs 1, max_tokens 1; n, stop strings and streaming
    leave the prompt's part alone."""
    url, _ = tiny_server
    ids = tokenize(url, TEXT)
    want, _ = reference(ids)
    c = client(url)
    whole = c.completions.create(
        model="default", prompt=ids, echo=True, logprobs=1, max_tokens=3, n=2, temperature=1.0, seed=5, stop=["zz"]
    )
    for ch in whole.choices:
        got = ch.logprobs.token_logprobs
        assert max(abs(a - b) for a, b in zip(got[1 : len(ids)], want[1:])) < 2e-3
    # the prompt's entries, then one per generated token
    assert sum(len(ch.logprobs.token_logprobs) - len(ids) for ch in whole.choices) == whole.usage.completion_tokens
    streamed: dict[int, list] = {}
    for chunk in c.completions.create(
        model="default", prompt=ids, echo=True, logprobs=1, max_tokens=3, n=2, temperature=1.0, seed=5, stream=True
    ):
        for ch in chunk.choices:
            streamed.setdefault(ch.index, [])
            if ch.logprobs:
                streamed[ch.index] += ch.logprobs.token_logprobs
    for i, ch in enumerate(whole.choices):
        assert streamed[i][: len(ids)] == ch.logprobs.token_logprobs[: len(ids)]


def test_prompt_logprobs_in_process_with_small_prefill_chunks(tiny_llama, reference):
    """The prompt is prefilled in chunks of 5 tokens: every chunk's rows are scored."""
    with Runner(model_id=str(tiny_llama), dtype="float32", prefill_chunk=5) as r:
        ids = r.tokenizer.encode(TEXT)
        want, _ = reference(ids)
        out = r.complete(TEXT, prompt_logprobs=3, max_tokens=2, temperature=0)
        plps = out["choices"][0]["prompt_logprobs"]
        assert plps[0] is None and len(plps) == len(ids)
        for pos, entry in enumerate(plps[1:], 1):
            assert abs(entry[str(ids[pos])]["logprob"] - want[pos]) < 2e-3
            assert len(entry) >= 3
        chat = r.chat([{"role": "user", "content": "hi"}], prompt_logprobs=0, max_tokens=1)
        assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_nulls_models_retrieve_and_the_fields_clients_expect(tiny_server):
    url, _ = tiny_server
    c = client(url)
    assert c.models.retrieve("default").object == "model"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("some-other-model")
    nulls = {
        k: None for k in ("n", "stream", "presence_penalty", "frequency_penalty", "logprobs", "echo", "seed", "stop")
    }
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2, **nulls}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "n": None,
            "stream": None,
            "logprobs": None,
        },
        timeout=60,
    )
    body = r.json()
    assert r.status_code == 200, body
    assert body["choices"][0]["message"]["refusal"] is None
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    chunks = list(
        c.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Hi"}], max_tokens=2, stream=True
        )
    )
    assert all(ch.system_fingerprint for ch in chunks)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}],
        )
    assert "text only" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="default", prompt="x", max_tokens=0)  # nothing to return
    info = httpx.get(f"{url}/tokenizer_info").json()
    assert info["eos_token"] and "chat_template" in info
    json.dumps(info)
