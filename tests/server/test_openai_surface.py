"""The full OpenAI surface: streaming (sync and async clients), completions, logprobs, n, soak."""

from __future__ import annotations

import asyncio
import json
import random

import httpx
import pytest
import torch

from .conftest import client

MSG = [{"role": "user", "content": "Say something about rivers."}]
EXTRA = {"ignore_eos": True}


def stream_chat(url, **kw):
    chunks = list(client(url).chat.completions.create(model="default", messages=MSG, stream=True, **kw))
    return chunks


def test_streaming_chat_reassembles_to_non_streaming(tiny_server):
    url, _ = tiny_server
    kw = dict(temperature=0.9, seed=11, max_tokens=20, extra_body=EXTRA)
    full = client(url).chat.completions.create(model="default", messages=MSG, **kw)
    chunks = stream_chat(url, stream_options={"include_usage": True}, **kw)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)


def test_stream_ends_with_done_and_never_shows_partial_stop(tiny_server):
    url, _ = tiny_server
    base = dict(model="default", messages=MSG, temperature=0, max_tokens=30, extra_body=EXTRA)
    full = client(url).chat.completions.create(**base).choices[0].message.content
    stop = full[10:14]
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**base, **EXTRA, "stop": stop, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    deltas = [json.loads(line[6:])["choices"][0]["delta"].get("content", "") for line in lines[:-1]]
    assert "".join(deltas) == full[: full.index(stop)]


def test_async_client_streaming_completions_match(tiny_server):
    from openai import AsyncOpenAI

    url, _ = tiny_server
    c = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    kw = dict(model="default", prompt="Once upon a time", temperature=0.8, seed=5, max_tokens=16, extra_body=EXTRA)

    async def go():
        full = await c.completions.create(**kw)
        parts = [ch async for ch in await c.completions.create(stream=True, **kw)]
        return full, parts

    full, parts = asyncio.run(go())
    assert full.object == "text_completion" and full.choices[0].finish_reason == "length"
    assert "".join(p.choices[0].text for p in parts if p.choices) == full.choices[0].text
    assert full.usage.completion_tokens == 16


def test_completions_prompt_forms_echo_and_n(tiny_server):
    url, _ = tiny_server
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    c = client(url)
    a = c.completions.create(model="default", prompt="Hello world", temperature=0, max_tokens=5, extra_body=EXTRA)
    b = c.completions.create(model="default", prompt=ids, temperature=0, max_tokens=5, extra_body=EXTRA)
    assert a.choices[0].text == b.choices[0].text
    e = c.completions.create(
        model="default", prompt="Hello world", echo=True, temperature=0, max_tokens=5, extra_body=EXTRA
    )
    assert e.choices[0].text == "Hello world" + a.choices[0].text
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "echo": True, "logprobs": 1, "max_tokens": 2})
    lp = r.json()["choices"][0]["logprobs"]  # the prompt's logprobs, then the generated tokens'
    assert lp["token_logprobs"][0] is None and len(lp["token_logprobs"]) == len(lp["tokens"]) > 2
    m = c.completions.create(
        model="default", prompt=["Hello world", "The fox"], n=2, temperature=0, max_tokens=4, extra_body=EXTRA
    )
    assert [ch.index for ch in m.choices] == [0, 1, 2, 3]
    assert m.choices[0].text == m.choices[1].text == a.choices[0].text[: len(m.choices[0].text)]
    assert m.usage.completion_tokens == 16


def test_logprobs_are_log_softmax_of_model_logits(tiny_server, tiny_llama):
    from transformers import AutoModelForCausalLM

    url, _ = tiny_server
    ids = httpx.post(f"{url}/tokenize", json={"prompt": "The quick brown"}).json()["tokens"]
    r = client(url).completions.create(
        model="default", prompt=ids, temperature=0, max_tokens=6, logprobs=5, extra_body=EXTRA
    )
    lp = r.choices[0].logprobs
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    seq = list(ids)
    for step in range(6):
        with torch.no_grad():
            logits = ref(torch.tensor([seq])).logits[0, -1]
        ref_lp = torch.log_softmax(logits, -1)
        tok = int(ref_lp.argmax())
        assert lp.token_logprobs[step] == pytest.approx(ref_lp[tok].item(), abs=1e-4)
        # NOTE: completions key top_logprobs by token text; byte-fragment tokens can share a text, so
        # compare as values: each reported one is among the reference top 5, and the best is first.
        top = sorted(lp.top_logprobs[step].values(), reverse=True)
        ref_top = ref_lp.topk(5).values.tolist()
        assert top[0] == pytest.approx(ref_top[0], abs=1e-4)
        assert all(any(abs(v - r) < 1e-4 for r in ref_top) for v in top)
        seq.append(tok)
    # chat shape: content entries with token, logprob, bytes, top_logprobs
    chat = client(url).chat.completions.create(
        model="default", messages=MSG, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2, extra_body=EXTRA
    )
    entries = chat.choices[0].logprobs.content
    assert len(entries) == 3 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in entries)


def test_chat_n_streaming(tiny_server):
    url, _ = tiny_server
    chunks = stream_chat(url, n=3, temperature=1.0, seed=2, max_tokens=6, extra_body=EXTRA)
    texts = {i: "" for i in range(3)}
    finished = set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished.add(ch.index)
    assert finished == {0, 1, 2}
    full = client(url).chat.completions.create(
        model="default", messages=MSG, n=3, temperature=1.0, seed=2, max_tokens=6, extra_body=EXTRA
    )
    assert [texts[i] for i in range(3)] == [c.message.content for c in full.choices]


def test_misc_routes(tiny_server):
    url, log = tiny_server
    assert httpx.get(f"{url}/version").json()["version"]
    doc = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/chat/completions" in doc["paths"] and "ChatCompletionRequest" in doc["components"]["schemas"]
    toks = httpx.post(f"{url}/tokenize", json={"prompt": "héllo 日本"}).json()
    assert toks["count"] == len(toks["tokens"]) and toks["max_model_len"] == 128
    assert httpx.post(f"{url}/detokenize", json={"tokens": toks["tokens"]}).json()["prompt"].endswith("héllo 日本")
    assert httpx.post(f"{url}/detokenize", json={"tokens": [10**9]}).status_code == 400
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={"messages": MSG, "unknown_field": 1, "max_tokens": 2, "user": "u", "response_format": {"type": "text"}},
    )
    assert r.status_code == 200
    # streamed requests are logged as one record when they end
    stream_chat(url, max_tokens=3)
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert any(rec.get("stream") and rec["status"] == "completed" for rec in recs)


def test_soak_mixed_requests(tiny_server):
    """50 mixed streaming/non-streaming requests, 8 at a time: each gets exactly one complete answer."""
    url, _ = tiny_server
    rng = random.Random(0)

    async def one(c, i, sem):
        async with sem:
            n_tok = rng.randint(1, 12)
            kind = i % 4
            if kind == 0:
                r = await c.chat.completions.create(
                    model="default", messages=MSG, max_tokens=n_tok, temperature=0.7, extra_body=EXTRA
                )
                return r.choices[0].finish_reason, r.usage.completion_tokens, n_tok
            if kind == 1:
                chunks = [
                    ch
                    async for ch in await c.chat.completions.create(
                        model="default",
                        messages=MSG,
                        max_tokens=n_tok,
                        stream=True,
                        stream_options={"include_usage": True},
                        extra_body=EXTRA,
                    )
                ]
                fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
                assert len(fins) == 1
                return fins[0], chunks[-1].usage.completion_tokens, n_tok
            if kind == 2:
                r = await c.completions.create(model="default", prompt=f"Item {i}:", max_tokens=n_tok, extra_body=EXTRA)
                return r.choices[0].finish_reason, r.usage.completion_tokens, n_tok
            chunks = [
                ch
                async for ch in await c.completions.create(
                    model="default",
                    prompt=f"Item {i}:",
                    max_tokens=n_tok,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body=EXTRA,
                )
            ]
            fins = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
            assert len(fins) == 1
            return fins[0], chunks[-1].usage.completion_tokens, n_tok

    async def go():
        from openai import AsyncOpenAI

        c = AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        sem = asyncio.Semaphore(8)
        return await asyncio.wait_for(asyncio.gather(*(one(c, i, sem) for i in range(50))), 30)

    results = asyncio.run(go())
    assert len(results) == 50
    assert all(fin == "length" and got == want for fin, got, want in results)
    health = httpx.get(f"{url}/health").json()
    assert health["running"] == health["waiting"] == health["kv_blocks_in_use"] == 0
