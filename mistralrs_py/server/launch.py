"""`mistralrs [options] <model>`: check the port, start the engine, print the ready line, run uvicorn."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import signal
import socket
import sys
import threading

import uvicorn
from rich.markup import escape

from ..terminal import console, fail, ready_line, setup_logging, start_client
from .http_protocol import HTTPLimits, protocol_class


def check_port(host: str, port: int) -> None:
    """NOTE: checked before the (slow) model load, so a busy port fails in a second, not a minute."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        fail(f"--host {host}: cannot resolve it ({e.strerror})")
    family, *_, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr[:2])
        except OSError as e:
            fail(f"cannot listen on {host}:{port} ({e.strerror}); pick another port with --port")


def public_url(host: str, port: int) -> str:
    """NOTE: a wildcard bind address is not something a browser can open; show loopback instead."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{shown if ':' not in shown else f'[{shown}]'}:{port}"


def example_curl(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]}, ensure_ascii=False)
    return f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}"


def run_server(opts, spec) -> None:
    setup_logging()
    check_port(opts.host, opts.port)
    client = start_client(spec, opts.engine_options())

    from ..openai.service import OpenAIService
    from .app import ServerConfig, create_app

    service = OpenAIService(
        client,
        model_name=opts.served_model_name,
        truncate_sequence=opts.truncate_sequence,
        repeat_last_n=spec.repeat_last_n,
        tool_call_parser=opts.tool_call_parser,
    )
    cfg = ServerConfig(
        log_file=str(opts.log) if opts.log else None,
        metrics=opts.metrics,
        ui=opts.ui,
        max_body_bytes=opts.max_body_bytes,
        api_key=opts.api_key or None,
        allowed_origins=tuple(opts.allowed_origins),
        shutdown_timeout=opts.shutdown_timeout,
    )
    app = create_app(service, cfg)
    name = service.model_name
    url = public_url(opts.host, opts.port)
    if not client.tokenizer.chat_template:
        console.print(
            "[bold yellow]note:[/] this model has no chat template: /v1/chat/completions answers 400 "
            "(use /v1/completions, or restart with --chat-template FILE)",
            highlight=False,
            soft_wrap=True,
        )
    console.print(
        f"{ready_line(client, name, opts.scheduler)} | {url}{'/ui' if opts.ui else '/v1'}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"[dim]try:[/] {escape(example_curl(url, name))}", highlight=False, soft_wrap=True)
    # NOTE: no `server: uvicorn` header: what software answers is nobody's business
    limits = http_limits(opts)
    config = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="info",
        server_header=False,
        ws="none",  # NOTE: no websocket routes; uvicorn's websockets support costs ~0.3 s to import
        timeout_graceful_shutdown=opts.shutdown_timeout + 5,
        # NOTE: uvicorn's connection classes, with limits on what one client may hold (http_protocol.py);
        # its own limit_concurrency is not used: it admits every connection and answers a plain-text 503
        # per request once connections *or* running requests reach the limit
        http=protocol_class(limits),
        timeout_keep_alive=limits.keep_alive_timeout,
    )
    server = GracefulServer(config, app.state.server, opts.shutdown_timeout)
    client.on_failure(server.fail)
    server.run()
    sys.exit(server.exit_code)


def http_limits(opts) -> HTTPLimits:
    """The HTTP limits from the CLI's options; NOTE: the open-file limit is raised (up to its hard
    limit) to hold --max-connections, or the cap is lowered to what it allows: a server out of file
    descriptors cannot accept anyone, not even /health."""
    limits = HTTPLimits(
        max_header_bytes=opts.max_header_bytes,
        max_headers=opts.max_headers,
        header_timeout=opts.header_timeout,
        body_timeout=opts.body_timeout,
        keep_alive_timeout=opts.keep_alive_timeout,
        max_connections=opts.max_connections,
    )
    try:
        import resource
    except ImportError:  # not on Windows
        return limits
    spare = 256  # NOTE: the model's files, the engine's threads, the log
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = limits.max_connections + spare
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft < want:
            cap = max(1, soft - spare)
            console.print(
                f"[bold yellow]note:[/] --max-connections {limits.max_connections} lowered to {cap}: "
                f"this process may open {soft} files (ulimit -n)",
                highlight=False,
                soft_wrap=True,
            )
            limits = dataclasses.replace(limits, max_connections=cap)
    return limits


class GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop accepting (uvicorn closes the listener), answer 503 to requests on open
    connections, let in-flight requests finish for `shutdown_timeout` seconds, then end the rest
    with an error event (streams) or an error response, join the engine thread, exit 0."""

    # NOTE: after a fatal failure, how long /health answers 503 (so a load balancer's health check
    # sees it) before the server shuts down, and how long that shutdown may take before the process
    # is ended anyway (a step stuck in a collective with a hung rank never returns)
    FAILED_GRACE = 3.0
    FAILED_DEADLINE = 15.0

    def __init__(self, config, state, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self._timer: threading.Timer | None = None
        self.exit_code = 0

    def fail(self, reason: str) -> None:
        """The engine failed for good (a tensor-parallel rank died): /health answers 503 already (the
        engine is dead); after a moment the server shuts down and the process exits with status 1."""
        self.exit_code = 1
        console.print(
            f"[bold red]error:[/] {escape(reason)}; the server stops (exit status 1)", highlight=False, soft_wrap=True
        )

        def stop() -> None:
            self.should_exit = True
            hard = threading.Timer(self.FAILED_DEADLINE, lambda: os._exit(1))
            hard.daemon = True
            hard.start()

        timer = threading.Timer(self.FAILED_GRACE, stop)
        timer.daemon = True
        timer.start()

    def handle_exit(self, sig, frame) -> None:
        self.state.shutting_down = True
        if self._timer is None:
            # NOTE: a plain timer thread: stopping the engine fails whatever is left, and those
            # error events let uvicorn's wait for open responses end before its own hard timeout.
            self._timer = threading.Timer(self.shutdown_timeout, self.state.client.stop, kwargs={"timeout": 1.0})
            self._timer.daemon = True
            self._timer.start()
        super().handle_exit(sig, frame)
        # NOTE: uvicorn re-raises a captured signal once shut down (so the process dies of it);
        # a graceful SIGTERM shutdown is a normal exit here: status 0.
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
