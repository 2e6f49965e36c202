"""The global options that limit what one HTTP client may hold (see server/http_protocol.py).

NOTE: added to the main callback's signature by `with_http_limits` (cli/__init__.py stays short):
Typer reads a callback's parameters from its signature, and the values land on GlobalOptions."""

from __future__ import annotations

import dataclasses
import functools
import inspect

import typer

PANEL = "HTTP limits"
OPTIONS = {
    "max_header_bytes": (
        int,
        typer.Option(
            64 * 1024,
            "--max-header-bytes",
            min=1024,
            rich_help_panel=PANEL,
            help="Largest request line plus headers, in bytes; checked as they arrive (431 and the connection closed beyond).",
        ),
    ),
    "max_headers": (
        int,
        typer.Option(
            100,
            "--max-headers",
            min=1,
            rich_help_panel=PANEL,
            help="Most header fields in one request (431 and the connection closed beyond).",
        ),
    ),
    "header_timeout": (
        float,
        typer.Option(
            10.0,
            "--header-timeout",
            min=0.1,
            rich_help_panel=PANEL,
            help="Seconds a client has to send a request's line and headers, from their first byte (or from "
            "connecting): then 408 and the connection closed.",
        ),
    ),
    "body_timeout": (
        float,
        typer.Option(
            30.0,
            "--body-timeout",
            min=0.1,
            rich_help_panel=PANEL,
            help="Seconds a request body may pause between bytes: then 408 and the connection closed.",
        ),
    ),
    "keep_alive_timeout": (
        float,
        typer.Option(
            5.0,
            "--keep-alive-timeout",
            min=0.1,
            rich_help_panel=PANEL,
            help="Seconds an idle connection is kept open for the client's next request.",
        ),
    ),
    "max_connections": (
        int,
        typer.Option(
            1000,
            "--max-connections",
            min=1,
            rich_help_panel=PANEL,
            help="Most connections open at once; a connection beyond is answered 503 (Retry-After: 1) and closed, "
            "and those open (streams) go on.",
        ),
    ),
}


def with_http_limits(callback):
    """Adds OPTIONS to a Typer callback that sets ctx.obj (a GlobalOptions) and takes `ctx`."""
    sig = inspect.signature(callback)
    extra = [
        inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o, annotation=t) for n, (t, o) in OPTIONS.items()
    ]
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in sig.parameters.values() if p.name != "ctx"]

    @functools.wraps(callback)
    def wrapper(ctx: typer.Context, **kwargs):
        limits = {name: kwargs.pop(name) for name in OPTIONS}
        callback(ctx, **kwargs)
        ctx.obj = dataclasses.replace(ctx.obj, **limits)

    ctx_param = sig.parameters["ctx"]
    wrapper.__signature__ = sig.replace(parameters=[ctx_param, *params, *extra])
    wrapper.__annotations__ = {**callback.__annotations__, **{n: t for n, (t, _) in OPTIONS.items()}}
    return wrapper
