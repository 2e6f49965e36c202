"""GET /metrics through prometheus-client's own parser: counters move by exactly what was served."""

from __future__ import annotations

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.request import Delta, Request, SamplingParams
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir
from mistralrs_py.server.metrics import Metrics

from .conftest import client, running_server

MSG = [{"role": "user", "content": "Count the rivers of France."}]


def parse(text: str) -> dict:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def scrape(url: str) -> dict:
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return parse(r.text)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_move_by_what_was_served(tiny_server):
    url, _ = tiny_server
    c = client(url)
    before = scrape(url)
    r1 = c.chat.completions.create(
        model="default", messages=MSG, temperature=0, max_tokens=5, extra_body={"ignore_eos": True}
    )
    chunks = list(
        c.chat.completions.create(
            model="default", messages=MSG, max_tokens=7, stream=True, seed=3, stream_options={"include_usage": True}
        )
    )
    r3 = c.completions.create(model="default", prompt="Rivers:", n=2, max_tokens=4, seed=1)
    assert httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "temperature": 5}).status_code == 400
    assert httpx.get(f"{url}/no/such/page").status_code == 404
    after = scrape(url)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    usages = [r1.usage, chunks[-1].usage, r3.usage]
    generated = sum(u.completion_tokens for u in usages)
    assert generated >= 5 + 1 + 2
    assert delta("mistralrs_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("mistralrs_generation_tokens_total") == generated

    chat = dict(route="/v1/chat/completions", method="POST")
    assert delta("mistralrs_http_requests_total", **chat, status="200") == 2
    assert delta("mistralrs_http_requests_total", **chat, status="400") == 1
    assert delta("mistralrs_http_requests_total", route="/v1/completions", method="POST", status="200") == 1
    assert delta("mistralrs_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert delta("mistralrs_http_requests_total", route="/metrics", method="GET", status="200") == 1  # the first scrape
    assert delta("mistralrs_http_request_duration_seconds_count", route="/v1/chat/completions") == 3

    # 4 choices: each has one first token; every later token is one inter-token interval
    assert delta("mistralrs_time_to_first_token_seconds_count") == 4
    assert delta("mistralrs_time_per_output_token_seconds_count") == generated - 4
    assert delta("mistralrs_time_to_first_token_seconds_sum") > 0
    assert delta("mistralrs_e2e_request_latency_seconds_count") == 3
    reasons = [
        r1.choices[0].finish_reason,
        next(ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason),
        *(ch.finish_reason for ch in r3.choices),
    ]
    for reason in ("stop", "length"):
        assert delta("mistralrs_sequences_finished_total", finish_reason=reason) == reasons.count(reason)

    # engine gauges at rest, and the build info
    assert value(after, "mistralrs_engine_up") == 1
    assert value(after, "mistralrs_num_sequences_running") == 0 and value(after, "mistralrs_num_sequences_waiting") == 0
    assert value(after, "mistralrs_kv_cache_blocks_total") > 0 and value(after, "mistralrs_kv_cache_blocks_used") == 0
    assert value(after, "mistralrs_kv_cache_usage_ratio") == 0
    # NOTE: once per request (the 400 never reached the engine)
    assert delta("mistralrs_prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    assert delta("mistralrs_prefix_cache_hits_total") == sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert any(name == "mistralrs_build_info" and dict(labels).get("model") for name, labels in after)


def test_engine_gauges_show_a_running_sequence(tiny_llama):
    """The scrape-time gauges, on a real engine stepped by hand, between two steps of a request."""
    pipe = load_safetensors_dir(tiny_llama, ModelSpec(model_id=str(tiny_llama)), torch.device("cpu"), torch.float32)
    engine = Engine(pipe, max_seqs=2, prefill_chunk=8)
    metrics = Metrics(_Unstarted(engine), "tiny")  # NOTE: not started: the test steps the engine by hand
    engine.add_request(Request("r", list(range(5, 25)), SamplingParams(temperature=0, max_tokens=50), lambda ev: None))
    engine.add_request(Request("q", list(range(5, 25)), SamplingParams(temperature=0, max_tokens=50), lambda ev: None))
    engine.add_request(Request("w", list(range(5, 9)), SamplingParams(temperature=0, max_tokens=50), lambda ev: None))
    engine._drain(block=False)
    engine.step()
    from prometheus_client import generate_latest

    m = parse(generate_latest(metrics.registry).decode())
    assert value(m, "mistralrs_num_sequences_running") == 2
    assert value(m, "mistralrs_num_sequences_waiting") == 1  # --max-seqs 2
    # both 20-token prompts hold their 2 blocks of 16 positions from admission (the second one came
    # in the same step: the first's blocks were not computed yet, so nothing was shared)
    assert value(m, "mistralrs_kv_cache_blocks_used") == 4
    per_block = value(m, "mistralrs_kv_cache_bytes_used") / 4
    assert (
        per_block == 16 * pipe.config.num_layers * 2 * pipe.config.num_kv_heads * pipe.config.head_dim * 4
    )  # K and V, fp32
    total = value(m, "mistralrs_kv_cache_blocks_total")
    assert value(m, "mistralrs_kv_cache_usage_ratio") == pytest.approx(4 / total)
    assert value(m, "mistralrs_prefix_cache_queries_total") == 40 and value(m, "mistralrs_prefix_cache_hits_total") == 0
    assert value(m, "mistralrs_engine_up") == 0  # stepped by hand: no engine thread
    assert value(m, "mistralrs_engine_steps_total") == 1


def test_a_request_observer_counts_an_abort_and_its_tokens():
    """What the engine client reports for a stream closed after its first delta (two tokens)."""
    metrics = Metrics(_NoEngine(), "x")
    obs = metrics.observer(prompt_tokens=4, n=1)
    obs.event(Delta(0, "a", [1, 2]))
    obs.end("aborted")
    m = parse(_latest(metrics))
    assert value(m, "mistralrs_sequences_finished_total", finish_reason="abort") == 1
    assert value(m, "mistralrs_prompt_tokens_total") == 4 and value(m, "mistralrs_generation_tokens_total") == 2
    assert value(m, "mistralrs_time_to_first_token_seconds_count") == 1
    assert value(m, "mistralrs_time_per_output_token_seconds_count") == 1  # the 2nd token of the first delta


def test_no_metrics_and_no_ui_turn_the_routes_off(tiny_llama):
    with running_server(
        ["--no-metrics", "--no-ui", "--max-model-len", "64", "--max-seqs", "1"], ["mistral", "-m", str(tiny_llama)]
    ) as srv:
        url = srv.url
        assert httpx.get(f"{url}/metrics").status_code == 404
        assert httpx.get(f"{url}/ui/").status_code == 404
        assert httpx.get(f"{url}/").status_code == 404
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG, "max_tokens": 2})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


class _NoEngine:
    """Just enough engine client for the collector."""

    alive = False

    @staticmethod
    def snapshot():
        return {
            "running": 0,
            "waiting": 0,
            "kv_blocks_in_use": 0,
            "kv_blocks_cached": 0,
            "kv_blocks_total": 1,
            "kv_cache_bytes_in_use": 0,
            "prefix_cache_queries": 0,
            "prefix_cache_hits": 0,
            "kv_cache_capacity_tokens": 8,
            "kv_cache_capacity_bytes": 80,
            "steps": 0,
            "preempted": 0,
        }


class _Unstarted:
    """An engine client over an engine that is stepped by hand (no thread)."""

    def __init__(self, engine):
        self.engine = engine

    @property
    def alive(self):
        return self.engine.alive

    def snapshot(self):
        return self.engine.snapshot()


def _latest(metrics: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()
