"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis): valid and
invalid bodies for every route, against a real server process. Nothing may be a 5xx, every 4xx is
OpenAI's error JSON, and the engine is idle and healthy afterwards."""

from __future__ import annotations

import time

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from .conftest import running_server

EXAMPLES = 150  # per route and generation mode (valid, invalid): a few hundred cases per POST route
ROUTES = ["POST /v1/chat/completions", "POST /v1/completions", "POST /v1/responses", "POST /tokenize", "POST /detokenize",
          "GET /v1/models", "GET /v1/models/{model_id}", "GET /tokenizer_info", "GET /health",
          "GET /version"]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama):
    # NOTE: a short context and few slots, so that whatever is generated finishes quickly
    args = ["--max-seqs", "4", "--max-waiting", "8", "--max-model-len", "64", "--dtype", "float32", "--no-ui"]
    with running_server(args, ["mistral", "-m", str(tiny_llama)]) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_dict(httpx.get(f"{fuzz_server}/openapi.json").json())


def test_the_document_lists_every_route(api_schema):
    assert sorted(r.ok().label for r in api_schema.get_all_operations()) == sorted(ROUTES)


# NOTE: the GET routes take no body: any model id is valid (unknown ones are a 404)
CASES = [(r, m) for r in ROUTES for m in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
         if r.startswith("POST") or m == GenerationMode.POSITIVE]  # fmt: skip


@pytest.mark.parametrize("route,mode", CASES, ids=[f"{r}-{m.value}" for r, m in CASES])
def test_the_api_survives_whatever_its_schema_allows_or_forbids(api_schema, fuzz_server, route, mode):
    operation = api_schema.find_operation_by_label(route)
    seen = []

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call(base_url=fuzz_server, timeout=120)
        seen.append(response.status_code)
        assert response.status_code < 500, (case.body, response.text[:500])
        if response.status_code >= 400:
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text
            assert "Traceback" not in error["message"]

    check()
    # NOTE: cases really ran (a strategy that generates nothing would pass silently)
    assert len(seen) >= (EXAMPLES // 2 if route.startswith("POST") else 1), len(seen)
    print(f"{route} {mode.value}: {len(seen)} cases, statuses {sorted(set(seen))}")


def test_the_engine_is_idle_and_healthy_after_the_fuzzing(fuzz_server):
    # NOTE: runs after the fuzz test (file order): every generated request must have ended
    deadline = time.monotonic() + 30
    while True:
        r = httpx.get(f"{fuzz_server}/health")
        h = r.json()
        idle = h.get("running") == h.get("waiting") == h.get("kv_blocks_in_use") == h.get("kv_cache_bytes_in_use") == 0
        if r.status_code == 200 and idle and h["requests"]["outstanding"] == 0:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.2)
    assert h["requests"]["accepted"] > 0  # the fuzzing reached the engine, not only the validation
    assert h["requests"]["accepted"] == h["requests"]["completed"] + h["requests"]["errored"] + h["requests"]["aborted"]
