"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis): valid and
invalid bodies for every route, against a real server process. Nothing may be a 5xx, every 4xx is
OpenAI's error JSON, and the engine is idle and healthy afterwards."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from .conftest import running_server

EXAMPLES = 150  # per route and generation mode (valid, invalid): a few hundred cases per route

schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama):
    # NOTE: a short context and few slots, so that whatever is generated finishes quickly
    args = ["--max-seqs", "4", "--max-waiting", "8", "--max-model-len", "64", "--dtype", "float32", "--no-ui"]
    with running_server(args, ["mistral", "-m", str(tiny_llama)]) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    document = httpx.get(f"{fuzz_server}/openapi.json").json()
    s = schemathesis.openapi.from_dict(document)
    s.config.update(base_url=fuzz_server)
    s.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], max_examples=EXAMPLES)
    return s


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_the_api_survives_whatever_its_schema_allows_or_forbids(case, fuzz_server):
    response = case.call(base_url=fuzz_server, timeout=120)
    assert response.status_code < 500, (case.body, response.text[:500])
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
        assert "Traceback" not in error["message"]


def test_the_engine_is_idle_and_healthy_after_the_fuzzing(fuzz_server):
    # NOTE: runs after the fuzz test (file order): every generated request must have ended
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{fuzz_server}/health")
        h = r.json()
        idle = h.get("running") == h.get("waiting") == h.get("kv_slots_in_use") == h.get("kv_cache_bytes_in_use") == 0
        if r.status_code == 200 and idle and h["requests"]["outstanding"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.2)
    assert h["requests"]["accepted"] > 0  # the fuzzing reached the engine, not only the validation
    assert h["requests"]["accepted"] == h["requests"]["completed"] + h["requests"]["errored"] + h["requests"]["aborted"]
