"""The prefix cache through the real server and the official openai SDK: a repeated prompt, a
follow-up turn and a shared system prompt are served from cached blocks (usage says how many), with
the same greedy answers; /metrics and /health count it; --no-prefix-cache turns it off."""

from __future__ import annotations

import re

import httpx

from .conftest import client, running_server

SYSTEM = (
    "You are the archivist of the lighthouse museum. Visitors ask about the keepers, the lamps, the storms "
    "and the ships that passed. Answer in one short sentence, plainly, and never invent dates. "
) * 6


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return float(re.search(rf"^{name} (\S+)$", text, re.M).group(1))


def ask(c, messages, **kw):
    return c.chat.completions.create(model="default", messages=messages, max_tokens=12, temperature=0, **kw)


def test_repeated_and_follow_up_prompts_come_from_the_cache(embedded_gguf_server):
    url = embedded_gguf_server
    c = client(url)
    hits0 = metric(url, "mistralrs_prefix_cache_hits_total")
    queries0 = metric(url, "mistralrs_prefix_cache_queries_total")
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Who kept the lamp in 1901?"}]
    first = ask(c, msgs)
    n = first.usage.prompt_tokens
    assert n > 150 and first.usage.prompt_tokens_details.cached_tokens == 0
    again = ask(c, msgs)
    # every full block before the prompt's last token; the answer is the same
    assert again.usage.prompt_tokens_details.cached_tokens == (n - 1) // 16 * 16
    assert again.choices[0].message.content == first.choices[0].message.content
    # the next turn: the history (and the answer's blocks) come from the cache
    follow = [*msgs, {"role": "assistant", "content": first.choices[0].message.content}]
    follow.append({"role": "user", "content": "And who kept it after him?"})
    turn = ask(c, follow, stream=True, stream_options={"include_usage": True})
    chunks = list(turn)
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= (n - 1) // 16 * 16
    assert usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    # another question under the same system prompt shares its blocks
    other = ask(c, [msgs[0], {"role": "user", "content": "What is a Fresnel lens?"}])
    assert other.usage.prompt_tokens_details.cached_tokens >= len(SYSTEM) // 8 // 16 * 16
    cached = [again, other]
    total = sum(r.usage.prompt_tokens_details.cached_tokens for r in cached) + usage.prompt_tokens_details.cached_tokens
    assert metric(url, "mistralrs_prefix_cache_hits_total") - hits0 == total
    served = first.usage.prompt_tokens + again.usage.prompt_tokens + usage.prompt_tokens + other.usage.prompt_tokens
    assert metric(url, "mistralrs_prefix_cache_queries_total") - queries0 == served
    # the Responses API reports it too
    resp = c.responses.create(
        model="default", instructions=SYSTEM, input="Who kept the lamp in 1901?", max_output_tokens=8
    )
    assert resp.usage.input_tokens_details.cached_tokens > 0
    h = httpx.get(f"{url}/health", timeout=30).json()
    assert h["prefix_cache"] is True and h["kv_block_size"] == 16
    assert h["kv_blocks_cached"] > 0 and h["kv_blocks_in_use"] == 0 and h["kv_cache_bytes_in_use"] == 0
    assert h["kv_blocks_free"] + h["kv_blocks_cached"] == h["kv_blocks_total"]


def test_without_the_prefix_cache_every_prompt_is_computed(tiny_llama):
    with running_server(["--no-prefix-cache", "--dtype", "float32"], ["mistral", "-m", str(tiny_llama)]) as srv:
        c = client(srv.url)
        msgs = [{"role": "user", "content": "hello " * 40}]
        a, b = ask(c, msgs), ask(c, msgs)
        assert a.usage.prompt_tokens_details.cached_tokens == b.usage.prompt_tokens_details.cached_tokens == 0
        assert a.choices[0].message.content == b.choices[0].message.content
        h = httpx.get(f"{srv.url}/health", timeout=30).json()
        assert h["prefix_cache"] is False and h["prefix_cache_hits"] == 0 and h["kv_blocks_cached"] == 0
