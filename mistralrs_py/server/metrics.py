"""Prometheus metrics for `GET /metrics`: HTTP requests, token latencies and counts, engine load.

Names follow Prometheus conventions (`_total` counters, `_seconds` histograms) under `mistralrs_`;
the set mirrors what vLLM and TGI export, so existing dashboards translate one name at a time.
Every app gets its own registry, so two apps in one process (tests) never share counts.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response

from .. import __version__
from ..engine.request import Delta, Done, Event

# NOTE: the classic text format, which every Prometheus version (and VictoriaMetrics, Grafana
# Agent...) reads; our names are plain ASCII, so the newer 1.0.0 format would add nothing.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The server's metrics; `observer()` watches one submission (EngineClient.observe)."""

    def __init__(self, client, model_name: str):
        # NOTE: no `*_created` series: they double the output and no dashboard reads them (vLLM does
        # the same). A process-wide switch of prometheus-client, so it is flipped here, not at import.
        disable_created_metrics()
        self.registry = r = CollectorRegistry(auto_describe=True)
        Info("mistralrs_build", "Server version and served model", registry=r).info(
            {"version": __version__, "model": model_name}
        )
        self.http_requests = Counter(
            "mistralrs_http_requests",
            "HTTP requests by route, method and status code",
            ["route", "method", "status"],
            registry=r,
        )
        self.http_duration = Histogram(
            "mistralrs_http_request_duration_seconds",
            "Time from request to the end of the response (streams included)",
            ["route"],
            buckets=HTTP_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("mistralrs_prompt_tokens", "Prompt tokens processed (once per prompt)", registry=r)
        self.generation_tokens = Counter(
            "mistralrs_generation_tokens", "Tokens generated, every choice counted", registry=r
        )
        self.ttft = Histogram(
            "mistralrs_time_to_first_token_seconds",
            "Time from submitting a request to the first token of each choice",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "mistralrs_time_per_output_token_seconds",
            "Inter-token latency: time between a choice's consecutive tokens",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "mistralrs_e2e_request_latency_seconds",
            "Time from submitting a generation request to its last event",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.finished = Counter(
            "mistralrs_sequences_finished",
            "Choices finished, by reason (stop, length, abort, error)",
            ["finish_reason"],
            registry=r,
        )
        r.register(EngineCollector(client))

    def observer(self, prompt_tokens: int, n: int) -> "RequestMetrics":
        return RequestMetrics(self, prompt_tokens, n)

    async def endpoint(self, request: Request) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE)


class RequestMetrics:
    """Times and counts one submission's tokens as its events are consumed.

    NOTE: a Delta may carry several token ids (text held back for an incomplete character or a
    possible stop string); they reached the client together, so the first token of a choice is its
    time to first token and the rest of that delta count as 0 s apart; a later delta of k tokens
    after a gap g counts k tokens g/k apart. So the per-token histogram's count is exactly generated
    tokens minus one per choice."""

    def __init__(self, metrics: Metrics, prompt_tokens: int, n: int):
        self.m, self.prompt_tokens, self.n = metrics, prompt_tokens, n
        self.start = time.perf_counter()
        self.last: dict[int, float] = {}
        self.done: set[int] = set()
        self.counted_prompt = False

    def event(self, ev: Event) -> None:
        m = self.m
        if not self.counted_prompt:  # NOTE: the first event means the engine took the prompt
            m.prompt_tokens.inc(self.prompt_tokens)
            self.counted_prompt = True
        if isinstance(ev, Delta) and ev.token_ids:
            t, k = time.perf_counter(), len(ev.token_ids)
            m.generation_tokens.inc(k)
            if ev.index not in self.last:
                m.ttft.observe(t - self.start)
                gaps, gap = k - 1, 0.0
            else:
                gaps, gap = k, (t - self.last[ev.index]) / k
            for _ in range(gaps):
                m.tpot.observe(gap)
            self.last[ev.index] = t
        elif isinstance(ev, Done):
            self.done.add(ev.index)
            m.finished.labels(ev.finish_reason).inc()

    def end(self, outcome: str) -> None:
        self.m.e2e.observe(time.perf_counter() - self.start)
        left = self.n - len(self.done)
        if left > 0:
            self.m.finished.labels("error" if outcome == "errored" else "abort").inc(left)


class EngineCollector(Collector):
    """Load gauges read from the engine at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, client):
        self.client = client

    def describe(self):
        return []  # NOTE: values are computed per scrape; nothing to describe up front

    def collect(self):
        snap = self.client.snapshot()
        capacity = snap["kv_cache_capacity_bytes"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("mistralrs_engine_up", "1 while the engine thread is running", 1.0 if self.client.alive else 0.0)
        yield gauge("mistralrs_num_sequences_running", "Sequences decoding or prefilling now", snap["running"])
        yield gauge("mistralrs_num_sequences_waiting", "Sequences queued for room in the KV cache", snap["waiting"])
        yield gauge(
            "mistralrs_kv_cache_blocks_used", "KV cache blocks held by running sequences", snap["kv_blocks_in_use"]
        )
        yield gauge(
            "mistralrs_kv_cache_blocks_cached", "Free KV cache blocks holding a cached prefix", snap["kv_blocks_cached"]
        )
        yield gauge("mistralrs_kv_cache_blocks_total", "KV cache blocks (--kv-cache-mb)", snap["kv_blocks_total"])
        yield gauge(
            "mistralrs_kv_cache_bytes_used",
            "Bytes of KV cache held by running sequences (a shared block once)",
            snap["kv_cache_bytes_in_use"],
        )
        yield gauge(
            "mistralrs_kv_cache_usage_ratio",
            "KV cache use: blocks held by running sequences / capacity (--kv-cache-mb)",
            snap["kv_cache_bytes_in_use"] / capacity if capacity else 0.0,
        )
        # NOTE: vLLM's prefix_cache_queries / prefix_cache_hits, in tokens
        yield CounterMetricFamily(
            "mistralrs_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            value=snap["prefix_cache_queries"],
        )
        yield CounterMetricFamily(
            "mistralrs_prefix_cache_hits", "Prompt tokens found in the prefix cache", value=snap["prefix_cache_hits"]
        )
        yield gauge(
            "mistralrs_kv_cache_capacity_tokens",
            "Tokens the KV cache holds at most (--kv-cache-mb)",
            snap["kv_cache_capacity_tokens"],
        )
        yield CounterMetricFamily("mistralrs_engine_steps", "Engine steps (one forward pass each)", value=snap["steps"])
        yield CounterMetricFamily(
            "mistralrs_num_preemptions",
            "Sequences whose cache was dropped to make room (recomputed later)",
            value=snap["preempted"],
        )


class HTTPMetricsMiddleware:
    """Pure ASGI middleware (it never buffers, so SSE streams pass through as they are written).

    NOTE: the route label is the matched route's template (`/v1/chat/completions`, `/ui`), never
    the raw path, so scanners probing random URLs cannot blow up the label set: they all count
    under `unmatched`. The request is counted when its status line is sent, so a client that has
    read a response always sees itself in the next scrape."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status: int | None = None

        async def send_and_count(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                self.metrics.http_requests.labels(route_of(scope), scope["method"], str(status)).inc()
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        except BaseException:
            if status is None:  # NOTE: the error middleware outside us answers 500
                self.metrics.http_requests.labels(route_of(scope), scope["method"], "500").inc()
            raise
        finally:
            self.metrics.http_duration.labels(route_of(scope)).observe(time.perf_counter() - start)


def route_of(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
