"""`mistralrs [GLOBAL OPTIONS] <model-subcommand> [MODEL OPTIONS]`.

Global options live on the callback; each subcommand builds a ModelSpec and calls serve().
NOTE: torch, transformers and the loaders are imported inside serve(), so `--help` is instant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from .pipeline.base import ModelKind, ModelSpec

app = typer.Typer(
    name="mistralrs",
    help="Serve Mistral/Llama-family models over an OpenAI-compatible HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["--help", "-h"]},
)


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


@app.callback()
def main_options(
    ctx: typer.Context,
    port: int = typer.Option(1234, "--port", "-p", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 for every interface)."),
    log: Optional[Path] = typer.Option(None, "--log", "-l", help="Append every request and response to FILE as JSON lines."),
    truncate_sequence: bool = typer.Option(
        False, "--truncate-sequence",
        help="Cut an over-long prompt from the left so that max_tokens (or 10 tokens) fit; without it such a prompt is a 400 error."),
    max_seqs: int = typer.Option(16, "--max-seqs", min=1, help="Most sequences running at once (each holds a KV cache slot)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs and bf16-capable CPUs)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="Torch CPU threads (default: torch's choice, the number of cores)."),
    scheduler: str = typer.Option("continuous", "--scheduler", help="continuous (mixed lengths in one batch) | catch-up (the seed's method)."),
    prefill_chunk: int = typer.Option(512, "--prefill-chunk", min=1, help="Most prompt tokens processed in one engine step."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", min=16, help="Context length to serve (default: the model's)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model id shown by /v1/models (default: the model id)."),
):
    """Global options go before the model subcommand."""
    for name, value, allowed in (("--dtype", dtype, ("auto", "float32", "bfloat16", "float16")),
                                 ("--scheduler", scheduler, ("continuous", "catch-up"))):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=name)
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda, cuda:N", param_hint="--device")
    ctx.obj = GlobalOptions(port, host, log, truncate_sequence, max_seqs, device, dtype, threads, scheduler,
                            prefill_chunk, max_model_len, served_model_name)


REPEAT_LAST_N = typer.Option(64, "--repeat-last-n", min=0, help="Tokens the repetition penalty looks back over.")


@app.command("mistral")
def mistral(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(
        None, "--model-id", "-m", help="Local directory or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    tokenizer_id: Optional[str] = typer.Option(None, "--tokenizer-id", help="Directory or hub id of another tokenizer to use."),
    repeat_last_n: int = REPEAT_LAST_N,
):
    """Serve a model from HF safetensors weights (config.json + *.safetensors + tokenizer.json)."""
    serve(ctx.obj, ModelSpec(ModelKind.PLAIN, model_id=model_id, revision=revision, tokenizer_id=tokenizer_id,
                             repeat_last_n=repeat_last_n))


@app.command("gguf-mistral")
def gguf_mistral(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(
        None, "--quantized-model-id", "-m", help="Hub repo or local directory holding the .gguf (default: the embedded SmolLM2 Q4_1)."),
    quantized_filename: Optional[str] = typer.Option(
        None, "--quantized-filename", "-f", help="The .gguf file in that repo/directory, or a path to a .gguf file."),
    tok_model_id: Optional[str] = typer.Option(
        None, "--tok-model-id", "-t", help="Hub id or directory whose tokenizer to use (default: the GGUF's own)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    repeat_last_n: int = REPEAT_LAST_N,
):
    """Serve a GGUF model (Q4_0..Q8_0, Q2_K..Q6_K, F16/BF16/F32) kept quantized in memory."""
    serve(ctx.obj, ModelSpec(ModelKind.GGUF, quantized_model_id=quantized_model_id, quantized_filename=quantized_filename,
                             tokenizer_id=tok_model_id, revision=revision, repeat_last_n=repeat_last_n))


@app.command("x-lora-mistral")
def x_lora_mistral(ctx: typer.Context):
    """Serve an X-LoRA mixture of LoRA adapters on a base model (not built yet)."""
    _not_built("x-lora-mistral")


def _not_built(name: str) -> None:
    typer.echo(f"error: `mistralrs {name}` is not built yet; use `mistralrs mistral` for now", err=True)
    raise typer.Exit(2)


def serve(opts: GlobalOptions, spec: ModelSpec) -> None:
    from .server.launch import run_server

    spec.device, spec.dtype, spec.max_model_len = opts.device, opts.dtype, opts.max_model_len
    run_server(opts, spec)


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mistralrs")


if __name__ == "__main__":
    main()
