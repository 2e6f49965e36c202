"""Faults inside the engine, injected into an in-process server (uvicorn in a thread, real HTTP)."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import httpx
import pytest
import torch

from mistralrs_py.engine.client import EngineClient
from mistralrs_py.engine.engine import Engine
from mistralrs_py.engine.model_runner import ModelRunner
from mistralrs_py.openai.service import OpenAIService
from mistralrs_py.pipeline.base import ModelSpec
from mistralrs_py.pipeline.hf import load_safetensors_dir
from mistralrs_py.server.app import ServerConfig, create_app

from .conftest import in_process_server

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture
def live(tiny_llama):
    pipe = load_safetensors_dir(tiny_llama, ModelSpec(model_id=str(tiny_llama)), torch.device("cpu"), torch.float32)
    engine = Engine(pipe, max_seqs=4)
    service = OpenAIService(EngineClient(pipe, engine), model_name="tiny")
    with in_process_server(create_app(service, ServerConfig(metrics=False, ui=False))) as url:
        yield url, engine


def test_a_failing_sequence_fails_alone(live, monkeypatch):
    url, engine = live
    real = ModelRunner._sample_row

    def flaky(self, seq, row, mask):
        if seq.params.seed == 666 and seq.num_output >= 2:
            raise RuntimeError("injected sampling fault")
        return real(self, seq, row, mask)

    monkeypatch.setattr(ModelRunner, "_sample_row", flaky)
    # the batched sampler fails the whole step when a bad row is in it; the engine then samples
    # row by row, where the fault above hits the one bad sequence
    from mistralrs_py import sampling

    real_batch = sampling.sample_batch

    def batch(logits, params, *rest):
        if any(p.seed == 666 for p in params):
            raise RuntimeError("injected batch fault")
        return real_batch(logits, params, *rest)

    monkeypatch.setattr(sampling, "sample_batch", batch)

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"messages": MSG, "max_tokens": 20, "ignore_eos": True, "temperature": 0.5}
            good = [c.post(f"{url}/v1/chat/completions", json={**body, "seed": i}) for i in range(3)]
            bad = c.post(f"{url}/v1/chat/completions", json={**body, "seed": 666})
            bad_stream = c.post(f"{url}/v1/chat/completions", json={**body, "seed": 666, "stream": True})
            return await asyncio.gather(*good, bad, bad_stream)

    *good, bad, bad_stream = asyncio.run(go())
    assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 20 for r in good)
    assert bad.status_code == 500 and "injected" in bad.json()["error"]["message"]
    assert "Traceback" not in bad.text
    lines = [x for x in bad_stream.text.splitlines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and "error" in json.loads(lines[-2][6:])
    h = httpx.get(f"{url}/health").json()
    assert h["kv_blocks_in_use"] == 0 and h["errors"] == 2


def test_engine_death_is_reported_quickly(live):
    url, engine = live
    boom = threading.Event()
    real = engine.scheduler.schedule

    def schedule():
        if boom.is_set():
            raise RuntimeError("injected engine fault")
        return real()

    engine.scheduler.schedule = schedule

    async def go():
        async with httpx.AsyncClient(timeout=60) as c:
            body = {"messages": MSG, "max_tokens": 200, "ignore_eos": True}
            t = time.monotonic()
            boom.set()  # the next step dies, with these requests running or waiting
            tasks = [asyncio.create_task(c.post(f"{url}/v1/chat/completions", json=body)) for _ in range(6)]
            res = await asyncio.gather(*tasks)
            return res, time.monotonic() - t

    res, dt = asyncio.run(go())
    assert dt < 5 and all(r.status_code >= 500 for r in res)
    assert all(r.json()["error"]["type"] == "server_error" for r in res)
    assert httpx.get(f"{url}/health").status_code == 503
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
