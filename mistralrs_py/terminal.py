"""The terminal side of start-up, shared by the server and the terminal chat: the rich console,
loading under a progress bar, one-line errors (exit status 2) and the ready line."""

from __future__ import annotations

from typing import NoReturn

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

console = Console(stderr=True)


def fail(message: str) -> NoReturn:
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise SystemExit(2)


def setup_logging() -> None:
    import logging

    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.INFO,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(console=console, show_path=False, markup=False)],
    )


def progress_bar(transient: bool = True) -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=transient,
    )


def start_client(spec, options):
    """Loads the model under a progress bar and starts the engine; any failure is one line on
    stderr and exit status 2."""
    import gc

    from .engine.client import EngineClient
    from .pipeline.base import LoadError

    # NOTE: what is imported by now (torch, the server) lives as long as the process: frozen, the
    # collections that loading asks for (to hand its temporaries back) skip it, ~0.1 s each
    gc.freeze()
    progress = progress_bar()
    try:
        with progress:
            # NOTE: an open-ended task first, so a hub download or a large file's index read shows
            # activity before the loader knows how many tensors there are.
            task = progress.add_task(f"loading {model_label(spec)}", total=None)
            client = EngineClient.start(spec, options, progress, status=console.status)
            progress.update(task, total=1, completed=1)
    except LoadError as e:
        fail(str(e))
    except (OSError, ValueError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"could not load the model: {type(e).__name__}: {first}")
    return client


def model_label(spec) -> str:
    name = spec.model_id or spec.quantized_model_id
    if spec.quantized_filename:
        name = f"{name}/{spec.quantized_filename}" if name else spec.quantized_filename
    return name or "the embedded model"


def family(cfg) -> str:
    """The decoder family the load line names: model_type, and a mixture of experts' routing."""
    if cfg.num_experts:
        return f"{cfg.model_type} ({cfg.num_experts} experts, {cfg.num_experts_per_tok} per token)"
    return cfg.model_type


def ready_line(client, name: str, scheduler: str) -> str:
    """The ready line's model part: name | format | dtype | device | params | memory | load time |
    context | cache."""
    pipeline, snap = client.pipeline, client.snapshot()
    s = pipeline.summary
    mem = s.get("weights_bytes", 0) / 2**20
    kv = snap["kv_cache_capacity_bytes"] / 2**20
    prefix = (
        f", prefix cache up to {snap['prefix_cache_capacity_bytes'] / 2**20:.0f} MiB" if snap["prefix_cache"] else ""
    )
    return (
        f"[bold green]ready[/] {escape(name)} | {family(pipeline.config)} | {s.get('format', '?')} | {str(pipeline.dtype).removeprefix('torch.')} | "
        f"{pipeline.device} | {s.get('params', 0) / 1e6:.0f}M params | {mem:.0f} MiB weights | "
        + (f"loaded in {s['load_seconds']:.1f} s | " if "load_seconds" in s else "")
        + f"ctx {client.max_len} x {snap['max_seqs']} seqs | KV cache {snap['kv_cache_capacity_tokens']} tokens "
        f"({kv:.0f} MiB{' at most, resident as used' if pipeline.device.type == 'cpu' else ''}, blocks of "
        f"{snap['kv_block_size']}{prefix}) | {scheduler}"
        + (f" | {s['kernels']}" if s.get("kernels") else "")
        + (" | compiled" if pipeline.compiled_decode is not None else "")
        + (f" | {s['tensor_parallel']}" if s.get("tensor_parallel") else "")
    )
