"""Start-up: load the model with rich progress, build the engine and app, print one summary line, run uvicorn."""

from __future__ import annotations

import contextlib
import json
import logging
import shlex
import signal
import socket
import sys
import threading
from typing import NoReturn

import uvicorn

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


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


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, markup=False)])


def load_engine(opts, spec, max_seqs: int | None = None):
    """The start-up shared by the HTTP server and the terminal chat (-i): torch threads, the
    --chat-template override, the model under rich progress, the engine (not started).
    Every failure is one line on stderr and exit status 2."""
    import torch

    from ..engine.worker import TorchThread
    from ..pipeline.base import LoadError, load_pipeline
    from ..pipeline.tokenizer import load_chat_template

    if opts.threads:
        torch.set_num_threads(opts.threads)
    # NOTE: the model is loaded, the engine built and its loop run on one thread (see worker.py)
    worker = TorchThread(threads=opts.threads)
    if getattr(opts, "chat_template", None):
        spec.chat_template = str(opts.chat_template)
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True)
    try:
        template = load_chat_template(spec.chat_template) if spec.chat_template else None
        with progress:
            # NOTE: an open-ended task first, so a hub download or a large file's index read shows
            # activity before the loader knows how many tensors there are.
            task = progress.add_task(f"loading {model_label(spec)}", total=None)
            pipeline = worker.call(load_pipeline, spec, progress)
            progress.update(task, total=1, completed=1)
    except LoadError as e:
        fail(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"could not load the model: {type(e).__name__}: {first}")
    if template is not None:
        pipeline.tokenizer.chat_template = template
    max_seqs = max_seqs or opts.max_seqs
    compile_ = getattr(opts, "compile", False)
    status = console.status("compiling decode steps with torch.compile (a few minutes the first time, about a minute later on)") \
        if compile_ else contextlib.nullcontext()
    with status:
        engine = _engine(pipeline, opts, max_seqs, compile_, worker)
    return pipeline, engine


def _engine(pipeline, opts, max_seqs: int, compile_: bool, worker):
    from ..engine.engine import Engine

    try:
        return worker.call(Engine, pipeline, max_seqs=max_seqs, policy=opts.scheduler, prefill_chunk=opts.prefill_chunk,
                           kv_cache_mb=getattr(opts, "kv_cache_mb", None), cuda_graphs=getattr(opts, "cuda_graphs", True),
                           compile=compile_, worker=worker)
    except RuntimeError as e:
        fail(f"could not allocate the KV cache: {e}; lower --max-seqs or --max-model-len, or set --kv-cache-mb")


def model_label(spec) -> str:
    name = spec.model_id or spec.quantized_model_id
    if spec.quantized_filename:
        name = f"{name}/{spec.quantized_filename}" if name else spec.quantized_filename
    return name or "the embedded model"


def summary(pipeline, engine, name: str, scheduler: str) -> str:
    """The ready line's model part: name | format | dtype | device | params | memory | context | cache."""
    s = pipeline.summary
    mem = s.get("weights_bytes", 0) / 2**20
    pool = engine.pool
    kv = pool.bytes_in_use(pool.capacity_tokens) / 2**20
    return (f"[bold green]ready[/] {escape(name)} | {s.get('format', '?')} | {str(pipeline.dtype).removeprefix('torch.')} | "
            f"{pipeline.device} | {s.get('params', 0) / 1e6:.0f}M params | {mem:.0f} MiB weights | "
            f"ctx {engine.max_len} x {pool.num_slots} seqs | KV cache {pool.capacity_tokens} tokens ({kv:.0f} MiB) | {scheduler}"
            + (f" | {s['kernels']}" if s.get("kernels") else "")
            + (" | compiled" if pipeline.compiled_decode is not None else ""))


def public_url(host: str, port: int) -> str:
    """NOTE: a wildcard bind address is not something a browser can open; show loopback instead."""
    shown = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    return f"http://{shown if ':' not in shown else f'[{shown}]'}:{port}"


def example_curl(url: str, model: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]}, ensure_ascii=False)
    return (f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' -d {shlex.quote(body)}")


def run_server(opts, spec) -> None:
    setup_logging()
    check_port(opts.host, opts.port)
    pipeline, engine = load_engine(opts, spec)

    from .app import ServerConfig, create_app

    name = opts.served_model_name or pipeline.name
    ui, metrics = getattr(opts, "ui", True), getattr(opts, "metrics", True)
    cfg = ServerConfig(served_model_name=name, truncate_sequence=opts.truncate_sequence,
                       repeat_last_n=spec.repeat_last_n, log_file=str(opts.log) if opts.log else None,
                       metrics=metrics, ui=ui, max_seqs=opts.max_seqs, max_waiting=opts.max_waiting,
                       max_body_bytes=opts.max_body_bytes, api_key=opts.api_key or None,
                       allowed_origins=tuple(opts.allowed_origins), shutdown_timeout=opts.shutdown_timeout)
    app = create_app(engine, pipeline, cfg)
    url = public_url(opts.host, opts.port)
    if not pipeline.tokenizer.chat_template:
        console.print("[bold yellow]note:[/] this model has no chat template: /v1/chat/completions answers 400 "
                      "(use /v1/completions, or restart with --chat-template FILE)", highlight=False, soft_wrap=True)
    console.print(f"{summary(pipeline, engine, name, opts.scheduler)} | {url}{'/ui' if ui else '/v1'}",
                  highlight=False, soft_wrap=True)
    console.print(f"[dim]try:[/] {escape(example_curl(url, name))}", highlight=False, soft_wrap=True)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="info",
                            timeout_graceful_shutdown=opts.shutdown_timeout + 5)
    GracefulServer(config, app.state.server, engine, opts.shutdown_timeout).run()
    sys.exit(0)


class GracefulServer(uvicorn.Server):
    """SIGTERM/SIGINT: stop accepting (uvicorn closes the listener), answer 503 to requests on open
    connections, let in-flight requests finish for `shutdown_timeout` seconds, then end the rest
    with an error event (streams) or an error response, join the engine thread, exit 0."""

    def __init__(self, config, server, engine, shutdown_timeout: float):
        super().__init__(config)
        self.srv, self.engine, self.shutdown_timeout = server, engine, shutdown_timeout
        self._timer: threading.Timer | None = None

    def handle_exit(self, sig, frame) -> None:
        self.srv.shutting_down = True
        if self._timer is None:
            # NOTE: a plain timer thread: engine.stop() fails whatever is left, and those error
            # events let uvicorn's wait for open responses end before its own hard timeout.
            self._timer = threading.Timer(self.shutdown_timeout, self.engine.stop)
            self._timer.daemon = True
            self._timer.start()
        super().handle_exit(sig, frame)
        # NOTE: uvicorn re-raises a captured signal once shut down (so the process dies of it);
        # a graceful SIGTERM shutdown is a normal exit here: status 0.
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
