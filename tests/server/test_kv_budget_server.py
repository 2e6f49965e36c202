"""A real server with a KV cache smaller than its load: every request still gets its whole answer."""

from __future__ import annotations

import concurrent.futures as cf

import httpx

from .conftest import running_server

# tiny_llama: 2 layers x 2 kv heads x 16 dims x (k, v) x 4 bytes = 512 bytes a token in float32
CAPACITY = 96
KV_MB = CAPACITY * 512 / 2**20


def test_requests_beyond_the_cache_wait_or_are_recomputed(tiny_llama):
    args = ["--max-seqs", "4", "--dtype", "float32", "--kv-cache-mb", repr(KV_MB)]
    with running_server(args, ["mistral", "-m", str(tiny_llama)]) as srv:
        url = srv.url
        models = httpx.get(f"{url}/v1/models").json()
        assert models["data"][0]["max_model_len"] == CAPACITY

        def complete(i: int) -> dict:
            body = {"prompt": f"Hello world {i} " * 4, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
            r = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
            assert r.status_code == 200, r.text
            return r.json()

        with cf.ThreadPoolExecutor(6) as ex:
            answers = list(ex.map(complete, range(6)))
        # every answer is whole, and equals the same request served alone afterwards
        assert all(a["usage"]["completion_tokens"] == 40 for a in answers)
        assert complete(3)["choices"][0]["text"] == answers[3]["choices"][0]["text"]
        metrics = httpx.get(f"{url}/metrics").text
        preempted = next(
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith("mistralrs_num_preemptions_total")
        )
        assert preempted > 0
        assert f"mistralrs_kv_cache_capacity_tokens {CAPACITY}.0" in metrics
