"""The CLI's global options (the callback's), as the launchers read them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional


@dataclass
class GlobalOptions:
    port: int
    host: str
    log: Optional[Path]
    truncate_sequence: bool
    max_seqs: int
    device: str
    dtype: str
    threads: Optional[int]
    scheduler: str
    prefill_chunk: int
    max_model_len: Optional[int]
    served_model_name: Optional[str]
    interactive: bool = False
    metrics: bool = True
    ui: bool = True
    chat_template: Optional[Path] = None
    tool_call_parser: Optional[str] = None
    perplexity: Optional[Path] = None  # a text file: measure, don't serve
    kl_divergence: bool = False
    ppl_context: int = 512
    no_xlora_kv_cache: bool = False
    api_key: Optional[str] = None
    allowed_origins: tuple[str, ...] = ()
    max_waiting: int = 256
    max_body_bytes: int = 2 * 1024 * 1024
    shutdown_timeout: float = 10.0
    # NOTE: HTTP limits (cli/http_options.py; the defaults are server/http_protocol.HTTPLimits')
    max_header_bytes: int = 64 * 1024
    max_headers: int = 100
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    keep_alive_timeout: float = 5.0
    max_connections: int = 1000
    kv_cache_mb: Optional[float] = None
    cuda_graphs: bool = True
    compile: bool = False
    prefix_caching: bool = True
    block_size: int = 16
    tensor_parallel_size: int = 1

    def engine_options(self, **overrides):
        """The engine's part of these options (imported here: `--help` must not import torch)."""
        from ..engine.client import EngineOptions

        fields = dict(
            max_seqs=self.max_seqs,
            scheduler=self.scheduler,
            prefill_chunk=self.prefill_chunk,
            kv_cache_mb=self.kv_cache_mb,
            compile=self.compile,
            cuda_graphs=self.cuda_graphs,
            prefix_caching=self.prefix_caching,
            block_size=self.block_size,
            threads=self.threads,
            max_waiting=self.max_waiting,
        )
        return EngineOptions(**{**fields, **overrides})
