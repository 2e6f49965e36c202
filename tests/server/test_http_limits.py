"""What one HTTP client may hold, through a real server process (httptools, as uvicorn picks it) with
short limits: a request head's bytes and header count, the time to send a head and a body, idle
keep-alive, the connection cap; pipelined requests; a client that gives up on its answer. The same
head limits on the h11 parser, in process on a one-route app."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_tiny_model

from .conftest import free_port, running_server, wait_healthy

TIMEOUT = 1.0  # --header-timeout, --body-timeout and --keep-alive-timeout of the server below
CAP = 40  # --max-connections
ARGS = ["--dtype", "float32", "--max-model-len", "4096", "--header-timeout", str(TIMEOUT), "--body-timeout",
        str(TIMEOUT), "--keep-alive-timeout", str(TIMEOUT), "--max-connections", str(CAP)]  # fmt: skip


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("limits"), "llama", max_position_embeddings=8192)
    with running_server(ARGS, ["mistral", "-m", str(model)]) as s:
        yield s


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_until_closed(s: socket.socket, limit: float) -> tuple[bytes, float | None]:
    """Everything the server sends, and after how many seconds it closed (None: still open at `limit`)."""
    buf, t0 = b"", time.monotonic()
    s.settimeout(0.2)
    while time.monotonic() - t0 < limit:
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return buf, time.monotonic() - t0
        if not chunk:
            return buf, time.monotonic() - t0
        buf += chunk
    return buf, None


def read_response(f) -> tuple[int, dict, bytes]:
    """One HTTP/1.1 response with a Content-Length from a socket's file."""
    status = int(f.readline().split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, f.read(int(headers["content-length"]))


def post_bytes(path: str, body: dict) -> bytes:
    raw = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    return head.encode() + raw


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_an_oversized_head_is_431_and_memory_stays_bounded(srv):
    with connect(srv.port) as s:
        try:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        except OSError:
            pass  # NOTE: the server may close before it has read everything; its answer is sent first
        out, closed = read_until_closed(s, 10)
    assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    assert b"request_header_too_large" in out and closed is not None
    if not sys.platform.startswith("linux"):
        return
    # NOTE: four clients each sending a 50 MiB header as fast as they can, as the red team did
    idle, peak, stop = rss_mb(srv.proc.pid), [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb(srv.proc.pid))
            time.sleep(0.02)

    def flood():
        with connect(srv.port) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Big: ")
            piece, deadline = b"a" * 65536, time.monotonic() + 20
            for _ in range(800):  # 50 MiB
                if time.monotonic() > deadline:
                    break
                try:
                    s.sendall(piece)
                except OSError:
                    break

    sampler = threading.Thread(target=sample)
    sampler.start()
    floods = [threading.Thread(target=flood) for _ in range(4)]
    for t in floods:
        t.start()
    for t in floods:
        t.join(30)
    stop.set()
    sampler.join()
    assert peak[0] - idle < 50, f"RSS {idle:.0f} MB idle, {peak[0]:.0f} MB at the peak"
    assert httpx.get(f"{srv.url}/health").status_code == 200


def test_too_many_headers_is_431_and_the_limit_itself_is_fine(srv):
    def with_headers(n: int) -> bytes:
        extra = b"".join(b"X-H%d: y\r\n" % i for i in range(n - 1))
        with connect(srv.port) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + extra + b"Connection: close\r\n\r\n")
            return read_until_closed(s, 10)[0]

    assert with_headers(99).startswith(b"HTTP/1.1 200 ")  # with Host: 100, the default limit
    for n in (101, 10_000):
        out = with_headers(n)
        assert out.startswith(b"HTTP/1.1 431 "), out[:200]


def test_a_stalled_or_silent_head_is_closed_in_time(srv):
    stalled = [connect(srv.port) for _ in range(CAP - 5)]
    for s in stalled:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    silent = connect(srv.port)
    for s in stalled:
        out, closed = read_until_closed(s, TIMEOUT + 4)
        assert closed is not None, "a connection with half a head is still open"
        assert out.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in out, out[:200]
        s.close()
    out, closed = read_until_closed(silent, TIMEOUT + 4)
    assert out == b"" and closed is not None, "a connection that sent nothing is still open"
    silent.close()


def test_a_stalled_body_is_closed_and_a_slow_one_is_not(srv):
    with connect(srv.port) as s:
        s.sendall(post_bytes("/tokenize", {"prompt": "hello there"})[:-5])
        out, closed = read_until_closed(s, TIMEOUT + 4)
    assert closed is not None and out.startswith(b"HTTP/1.1 408 "), out[:200]
    # NOTE: a body whose bytes keep coming, each within the limit, is read to its end however long it takes
    with connect(srv.port) as s:
        data = post_bytes("/tokenize", {"prompt": "hi"})
        head, body = data[: -len(b'{"prompt": "hi"}')], b'{"prompt": "hi"}'
        s.sendall(head)
        for i in range(0, len(body), 2):
            time.sleep(TIMEOUT / 3)
            s.sendall(body[i : i + 2])
        status, _, answer = read_response(s.makefile("rb"))
    assert status == 200 and json.loads(answer)["count"] > 0


def test_an_idle_keep_alive_connection_is_closed(srv):
    with connect(srv.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        f = s.makefile("rb")
        assert read_response(f)[0] == 200
        t0 = time.monotonic()
        assert f.read(1) == b""  # NOTE: the socket's 10 s timeout: uvicorn's default keeps it 5 s
        assert time.monotonic() - t0 < TIMEOUT + 2


def test_connections_beyond_the_cap_get_503_and_open_streams_go_on(srv):
    body = {"prompt": "hi", "max_tokens": 400, "ignore_eos": True, "stream": True}
    events, holders = [], []
    with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=60) as stream:
        lines = stream.iter_lines()
        events.append(next(lines))
        holders = [connect(srv.port) for _ in range(CAP - 1)]  # the stream's connection is the cap's last
        time.sleep(0.2)
        with connect(srv.port) as extra:
            extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            out, closed = read_until_closed(extra, 5)
        for s in holders:
            s.close()
        events.extend(line for line in lines if line)
    assert out.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in out.lower(), out[:300]
    assert json.loads(out.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "server_overloaded"
    assert closed is not None
    assert events[-1] == "data: [DONE]"  # NOTE: the stream ran to its end, all 400 tokens
    assert json.loads(events[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert httpx.get(f"{srv.url}/health").status_code == 200


@pytest.mark.parametrize("order", ["get-post", "post-post", "post-get"])
def test_pipelined_requests_are_answered_in_order(srv, order):
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    post = post_bytes("/v1/completions", {"prompt": "hi", "max_tokens": 3})
    first, second = {"get-post": (get, post), "post-post": (post, post), "post-get": (post, get)}[order]
    with connect(srv.port) as s:
        s.sendall(first + second)  # NOTE: one write: both requests arrive before the first answer
        f = s.makefile("rb")
        answers = [read_response(f) for _ in range(2)]
    for request, (status, _, answer) in zip((first, second), answers):
        assert status == 200
        assert ("status" in json.loads(answer)) == request.startswith(b"GET")


def test_a_client_that_gives_up_is_one_499_line_and_its_request_is_aborted(srv):
    before = httpx.get(f"{srv.url}/health").json()["requests"]["aborted"]
    for _ in range(3):
        with connect(srv.port) as s:
            s.sendall(post_bytes("/v1/completions", {"prompt": "hi", "max_tokens": 3000, "ignore_eos": True}))
            time.sleep(0.4)  # NOTE: the answer is being generated when the client goes
    deadline = time.monotonic() + 20
    while (h := httpx.get(f"{srv.url}/health").json())["requests"]["aborted"] < before + 3:
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert h["running"] == 0 and srv.proc.poll() is None
    out = srv.output()
    assert "Traceback" not in out and "CancelledError" not in out, out[-3000:]
    assert out.count('"POST /v1/completions HTTP/1.1" 499') >= 3


# ---- the h11 parser (uvicorn's when httptools is not installed), in process --------------------------
@pytest.fixture(params=["h11", "httptools"])
def tiny_app_url(request):
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from mistralrs_py.server.http_protocol import HTTPLimits, protocol_class

    async def echo(req):
        return JSONResponse({"method": req.method, "body": (await req.body()).decode()})

    app = Starlette(routes=[Route("/health", echo, methods=["GET", "POST"])])
    limits = HTTPLimits(max_header_bytes=4096, max_headers=20, header_timeout=TIMEOUT, body_timeout=TIMEOUT)
    port = free_port()
    http = protocol_class(limits, request.param)
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", http=http, lifespan="off"))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}", 30, alive=t.is_alive)
        yield port
    finally:
        server.should_exit = True
        t.join(10)


def test_head_limits_on_either_parser(tiny_app_url):
    port = tiny_app_url
    for head in (b"X-Big: " + b"a" * 8192 + b"\r\n", b"".join(b"X-%d: y\r\n" % i for i in range(30))):
        with connect(port) as s:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n" + head + b"\r\n")
            out, _ = read_until_closed(s, 5)
        assert out.startswith(b"HTTP/1.1 431 "), out[:200]
    with connect(port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        out, closed = read_until_closed(s, TIMEOUT + 4)
    assert out.startswith(b"HTTP/1.1 408 ") and closed is not None, out[:200]
    with connect(port) as s:
        s.sendall(b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        out, closed = read_until_closed(s, TIMEOUT + 4)
    assert out.startswith(b"HTTP/1.1 408 ") and closed is not None, out[:200]
    with connect(port) as s:
        s.sendall(
            b"POST /health HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabcGET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        f = s.makefile("rb")
        answers = [json.loads(read_response(f)[2]) for _ in range(2)]
    assert answers == [{"method": "POST", "body": "abc"}, {"method": "GET", "body": ""}]
