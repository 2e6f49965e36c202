"""Start-up: load the model with rich progress, build the engine and app, print one summary line, run uvicorn."""

from __future__ import annotations

import logging
import socket
import sys

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def fail(message: str) -> "NoReturn":  # noqa: F821
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


def run_server(opts, spec) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=console, show_path=False, markup=False)])
    check_port(opts.host, opts.port)

    import torch

    from ..engine.engine import Engine
    from ..pipeline.base import LoadError, load_pipeline
    from .app import ServerConfig, create_app

    if opts.threads:
        torch.set_num_threads(opts.threads)
    progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console, transient=True)
    try:
        with progress:
            pipeline = load_pipeline(spec, progress)
    except LoadError as e:
        fail(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"could not load the model: {type(e).__name__}: {first}")
    try:
        engine = Engine(pipeline, max_seqs=opts.max_seqs, policy=opts.scheduler, prefill_chunk=opts.prefill_chunk)
    except RuntimeError as e:
        fail(f"could not allocate the KV cache: {e}; lower --max-seqs or --max-model-len")
    name = opts.served_model_name or pipeline.name
    cfg = ServerConfig(served_model_name=name, truncate_sequence=opts.truncate_sequence,
                       repeat_last_n=spec.repeat_last_n, log_file=str(opts.log) if opts.log else None)
    app = create_app(engine, pipeline, cfg)
    s = pipeline.summary
    mem = s.get("weights_bytes", 0) / 2**20
    url = f"http://{opts.host if ':' not in opts.host else f'[{opts.host}]'}:{opts.port}"
    console.print(
        f"[bold green]ready[/] {name} | {s.get('format', '?')} | {str(pipeline.dtype).removeprefix('torch.')} | "
        f"{pipeline.device} | {s.get('params', 0) / 1e6:.0f}M params | {mem:.0f} MiB weights | "
        f"ctx {pipeline.max_model_len} x {opts.max_seqs} seqs | {opts.scheduler} | {url}/v1",
        highlight=False, soft_wrap=True)
    import uvicorn

    uvicorn.run(app, host=opts.host, port=opts.port, log_level="info", timeout_graceful_shutdown=10)
    sys.exit(0)
