"""Memory a user can predict: under a steady load of distinct prompts (each leaving a cached prefix
behind), the server's resident memory grows from its idle size by no more than the KV budget the
ready line prints and a fixed allowance (activations, allocator caches), and stops growing once the
prefix cache is full."""

from __future__ import annotations

import concurrent.futures as cf
import os

import httpx

from tests.server.conftest import running_server

KV_MB = 48


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_resident_memory_plateaus_within_the_printed_budget():
    with running_server(["--max-seqs", "8", "--kv-cache-mb", str(KV_MB)], ["gguf-mistral"]) as srv:
        health = httpx.get(f"{srv.url}/health", timeout=30).json()
        assert health["kv_cache_capacity_bytes"] <= KV_MB * 2**20
        assert health["prefix_cache_capacity_bytes"] <= health["kv_cache_capacity_bytes"]
        assert f"KV cache {health['kv_cache_capacity_tokens']} tokens" in srv.output()
        idle = rss_mb(srv.proc.pid)

        def one(i: int) -> None:
            body = {
                "model": "default",
                # NOTE: a distinct ~60-token prompt each time: every one leaves new blocks to cache
                "prompt": f"Request {i}: " + " ".join(f"w{i * 7 + j}" for j in range(40)),
                "max_tokens": 16,
                "ignore_eos": True,
            }
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text

        samples = []
        with cf.ThreadPoolExecutor(8) as pool:
            for start in range(0, 240, 40):
                list(pool.map(one, range(start, start + 40)))
                samples.append(rss_mb(srv.proc.pid))
        assert max(samples) - idle <= KV_MB + 250, (idle, samples)
        # NOTE: once the cache is full (48 MiB: ~1,000 tokens, a few dozen prompts), memory is flat
        assert samples[-1] - samples[2] < 25, samples
        assert os.path.exists(f"/proc/{srv.proc.pid}")
