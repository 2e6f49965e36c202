"""`mistralrs [GLOBAL OPTIONS] <model-subcommand> [MODEL OPTIONS]`.

Global options live on the callback; each subcommand builds a ModelSpec and calls serve().
NOTE: torch, transformers and the loaders are imported inside serve(), so `--help` is instant.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from ..pipeline.base import ModelKind, ModelSpec
from .http_options import with_http_limits
from .options import GlobalOptions

app = typer.Typer(
    name="mistralrs",
    help="Serve Mistral/Llama-family models over an OpenAI-compatible HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["--help", "-h"]},
)


@app.callback()
@with_http_limits
def main_options(
    ctx: typer.Context,
    port: int = typer.Option(1234, "--port", "-p", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (0.0.0.0 for every interface)."),
    log: Optional[Path] = typer.Option(
        None, "--log", "-l", help="Append every request and response to FILE as JSON lines."
    ),
    truncate_sequence: bool = typer.Option(
        False,
        "--truncate-sequence",
        help="Cut an over-long prompt from the left so that max_tokens (or 10 tokens) fit; without it such a prompt is a 400 error.",
    ),
    max_seqs: int = typer.Option(16, "--max-seqs", min=1, help="Most sequences running at once."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto | float32 | bfloat16 | float16 (auto: bf16 on GPUs and bf16-capable CPUs)."
    ),
    threads: Optional[int] = typer.Option(
        None, "--threads", min=1, help="Torch CPU threads (default: torch's choice, the number of cores)."
    ),
    scheduler: str = typer.Option(
        "continuous",
        "--scheduler",
        help="continuous (mixed lengths in one batch) | catch-up (mistral.rs's original scheduling: the shortest sequences decode until the others' length is reached).",
    ),
    prefill_chunk: int = typer.Option(
        512, "--prefill-chunk", min=1, help="Most prompt tokens processed in one engine step."
    ),
    max_model_len: Optional[int] = typer.Option(
        None, "--max-model-len", min=16, help="Context length to serve (default: the model's)."
    ),
    kv_cache_mb: Optional[float] = typer.Option(
        None,
        "--kv-cache-mb",
        min=0.001,
        help="KV cache budget in MiB shared by all running sequences and the prefix cache (default: half the free RAM "
        "on the CPU, of which at most a quarter keeps cached prefixes; 90% of free GPU memory on a GPU). When full, "
        "new requests wait and the newest running ones are preempted and recomputed.",
    ),
    no_prefix_cache: bool = typer.Option(
        False,
        "--no-prefix-cache",
        help="Compute every prompt in full instead of reusing the cache of earlier prompts that start the same way.",
    ),
    block_size: int = typer.Option(
        16, "--block-size", min=1, max=1024, help="Positions per KV cache block (the prefix cache reuses whole blocks)."
    ),
    tensor_parallel_size: int = typer.Option(
        1,
        "--tensor-parallel-size",
        "--tp",
        min=1,
        help="Split the model over N processes (torch.distributed: gloo on CPUs, NCCL with one GPU per process), "
        "each holding 1/N of every layer and of the KV cache. Started here on this machine; under torchrun, "
        "one process per rank on any machines (default: torchrun's world size).",
    ),
    compile: bool = typer.Option(
        False,
        "--compile",
        help="Compile decode steps with torch.compile (one graph per batch bucket of 1/2/4/8/16... rows): 1.2-1.6x faster "
        "decoding on the CPU, after a few minutes of compiling at the first start (about a minute later on: torch "
        "caches the result on disk). Needs a C++ compiler.",
    ),
    no_cuda_graphs: bool = typer.Option(
        False, "--no-cuda-graphs", help="On a GPU, run decode steps eagerly instead of replaying captured CUDA graphs."
    ),
    served_model_name: Optional[str] = typer.Option(
        None, "--served-model-name", help="Model id shown by /v1/models (default: the model id)."
    ),
    no_xlora_kv_cache: bool = typer.Option(
        False,
        "--no-xlora-kv-cache",
        help="X-LoRA: no KV cache for the scaling pass; rerun it over the whole sequence each step.",
    ),
    interactive: bool = typer.Option(
        False,
        "--interactive",
        "-i",
        help="Chat with the model in this terminal instead of serving HTTP (/help inside for commands).",
    ),
    perplexity: Optional[Path] = typer.Option(
        None,
        "--perplexity",
        exists=True,
        dir_okay=False,
        metavar="FILE",
        help="Print the model's perplexity over a text file (llama-perplexity's chunks) instead of serving.",
    ),  # fmt: skip
    kl_divergence: bool = typer.Option(
        False, "--kl-divergence", help="With --perplexity: also the KL divergence from float32 of the same weights."
    ),
    ppl_context: int = typer.Option(512, "--ppl-context", min=4, help="With --perplexity: tokens per chunk."),
    no_metrics: bool = typer.Option(False, "--no-metrics", help="Do not serve Prometheus metrics at /metrics."),
    no_ui: bool = typer.Option(False, "--no-ui", help="Do not serve the web chat page at /ui."),
    api_key: Optional[str] = typer.Option(
        None,
        "--api-key",
        envvar="MISTRALRS_API_KEY",
        show_envvar=True,
        help="Require `Authorization: Bearer KEY` on /v1/*, /tokenize, /detokenize and /metrics.",
    ),
    allowed_origins: Optional[str] = typer.Option(
        None,
        "--allowed-origins",
        help="Enable CORS for these origins (comma-separated, e.g. http://localhost:3000). Off by default.",
    ),
    max_waiting: int = typer.Option(
        256,
        "--max-waiting",
        min=0,
        help="Sequences that may wait for a slot; beyond that requests get 503 with Retry-After.",
    ),
    max_body_bytes: int = typer.Option(
        2 * 1024 * 1024, "--max-body-bytes", min=1024, help="Largest request body accepted (413 beyond)."
    ),
    shutdown_timeout: float = typer.Option(
        10.0,
        "--shutdown-timeout",
        min=0,
        help="On SIGTERM, seconds in-flight requests may finish before they are ended with an error.",
    ),
    chat_template: Optional[Path] = typer.Option(
        None,
        "--chat-template",
        metavar="FILE|NAME",
        help="Chat template overriding the model's: a jinja file, JSON with a \"chat_template\" key (tokenizer_config.json), or a bundled template's name (hermes-tools: ChatML with tool calls).",
    ),
    tool_call_parser: Optional[str] = typer.Option(
        None,
        "--tool-call-parser",
        metavar="NAME",
        help="How the model writes tool calls: hermes, llama3_json or mistral (default: recognised from the chat template).",
    ),
):
    """Global options go before the model subcommand."""
    for name, value, allowed in (
        ("--dtype", dtype, ("auto", "float32", "bfloat16", "float16")),
        ("--scheduler", scheduler, ("continuous", "catch-up")),
        ("--tool-call-parser", tool_call_parser or "hermes", ("hermes", "llama3_json", "mistral")),
    ):
        if value not in allowed:
            raise typer.BadParameter(f"{value!r} is not one of {', '.join(allowed)}", param_hint=name)
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise typer.BadParameter(f"{device!r} is not one of auto, cpu, cuda, cuda:N", param_hint="--device")
    ctx.obj = GlobalOptions(
        port,
        host,
        log,
        truncate_sequence,
        max_seqs,
        device,
        dtype,
        threads,
        scheduler,
        prefill_chunk,
        max_model_len,
        served_model_name,
        interactive,
        not no_metrics,
        not no_ui,
        chat_template,
        tool_call_parser=tool_call_parser,
        perplexity=perplexity,
        kl_divergence=kl_divergence,
        ppl_context=ppl_context,
        no_xlora_kv_cache=no_xlora_kv_cache,
        api_key=api_key,
        allowed_origins=tuple(o.strip() for o in (allowed_origins or "").split(",") if o.strip()),
        max_waiting=max_waiting,
        max_body_bytes=max_body_bytes,
        shutdown_timeout=shutdown_timeout,
        kv_cache_mb=kv_cache_mb,
        cuda_graphs=not no_cuda_graphs,
        compile=compile,
        prefix_caching=not no_prefix_cache,
        block_size=block_size,
        tensor_parallel_size=tensor_parallel_size,
    )


REPEAT_LAST_N = typer.Option(64, "--repeat-last-n", min=0, help="Tokens the repetition penalty looks back over.")
ISQ = typer.Option(
    None,
    "--isq",
    help="Quantize the safetensors weights as they load: q4_0 | q4_k | q8_0 (llama.cpp's types; the output head "
    "gets q8_0), then run on the same kernels as GGUF files.",
)


def check_isq(isq: Optional[str]) -> Optional[str]:
    if isq is not None and isq.lower() not in ("q4_0", "q4_k", "q8_0"):
        raise typer.BadParameter(f"{isq!r} is not one of q4_0, q4_k, q8_0", param_hint="--isq")
    return isq.lower() if isq else None


@app.command("mistral")
def mistral(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(
        None,
        "--model-id",
        "-m",
        help="Local directory or Hugging Face hub id (default: the embedded SmolLM2-135M-Instruct).",
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    tokenizer_id: Optional[str] = typer.Option(
        None, "--tokenizer-id", help="Directory or hub id of another tokenizer to use."
    ),
    repeat_last_n: int = REPEAT_LAST_N,
    isq: Optional[str] = ISQ,
):
    """Serve a model from HF safetensors weights (config.json + *.safetensors + tokenizer.json)."""
    serve(
        ctx.obj,
        ModelSpec(
            ModelKind.PLAIN,
            model_id=model_id,
            revision=revision,
            tokenizer_id=tokenizer_id,
            repeat_last_n=repeat_last_n,
            isq=check_isq(isq),
        ),
    )


@app.command("gguf-mistral")
def gguf_mistral(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(
        None,
        "--quantized-model-id",
        "-m",
        help="Hub repo or local directory holding the .gguf (default: the embedded SmolLM2 Q4_1).",
    ),
    quantized_filename: Optional[str] = typer.Option(
        None, "--quantized-filename", "-f", help="The .gguf file in that repo/directory, or a path to a .gguf file."
    ),
    tok_model_id: Optional[str] = typer.Option(
        None, "--tok-model-id", "-t", help="Hub id or directory whose tokenizer to use (default: the GGUF's own)."
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision (branch, tag or commit)."),
    repeat_last_n: int = REPEAT_LAST_N,
):
    """Serve a GGUF model (Q4_0..Q8_0, Q2_K..Q6_K, F16/BF16/F32) kept quantized in memory."""
    serve(
        ctx.obj,
        ModelSpec(
            ModelKind.GGUF,
            quantized_model_id=quantized_model_id,
            quantized_filename=quantized_filename,
            tokenizer_id=tok_model_id,
            revision=revision,
            repeat_last_n=repeat_last_n,
        ),
    )


@app.command("x-lora-mistral")
def x_lora_mistral(
    ctx: typer.Context,
    xlora_model_id: str = typer.Option(
        ...,
        "--xlora-model-id",
        "-x",
        help="Directory or hub id with xlora_config.json, xlora_classifier.safetensors and one folder per adapter.",
    ),
    order: Optional[str] = typer.Option(
        None,
        "--order",
        "-o",
        help="Ordering file (adapter order and X-LoRA layer index of each wrapped module); see `mistralrs ordering`. "
        "Default: generated from the model, adapters in xlora_config.json's order.",
    ),
    model_id: Optional[str] = typer.Option(
        None,
        "--model-id",
        "-m",
        help="Base model: local directory or hub id (default: the embedded SmolLM2-135M-Instruct).",
    ),
    quantized_model_id: Optional[str] = typer.Option(
        None,
        "--quantized-model-id",
        "-q",
        help="GGUF base instead: hub repo or directory holding the .gguf (kept quantized).",
    ),
    quantized_filename: Optional[str] = typer.Option(
        None,
        "--quantized-filename",
        "-f",
        help="The GGUF base's file in that repo/directory, or a path to a .gguf file.",
    ),
    tokenizer_id: Optional[str] = typer.Option(
        None, "--tokenizer-id", help="Directory or hub id of another tokenizer to use."
    ),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the base model."),
    tgt_non_granular_index: Optional[int] = typer.Option(
        None,
        "--tgt-non-granular-index",
        min=0,
        help="After this many generated tokens, freeze each sequence's scalings and skip the scaling pass.",
    ),
    repeat_last_n: int = REPEAT_LAST_N,
    isq: Optional[str] = ISQ,
):
    """Serve an X-LoRA mixture of LoRA experts on a base model (HF safetensors or a quantized GGUF)."""
    if model_id and (quantized_model_id or quantized_filename):
        raise typer.BadParameter(
            "give the base either with --model-id or with --quantized-model-id/--quantized-filename",
            param_hint="--model-id",
        )
    opts: GlobalOptions = ctx.obj
    serve(
        opts,
        ModelSpec(
            ModelKind.XLORA,
            model_id=model_id,
            revision=revision,
            tokenizer_id=tokenizer_id,
            quantized_model_id=quantized_model_id,
            quantized_filename=quantized_filename,
            xlora_model_id=xlora_model_id,
            order=order,
            tgt_non_granular_index=tgt_non_granular_index,
            no_xlora_kv_cache=opts.no_xlora_kv_cache,
            repeat_last_n=repeat_last_n,
            isq=check_isq(isq),
        ),
    )


def serve(opts: GlobalOptions, spec: ModelSpec) -> None:
    spec.device, spec.dtype, spec.max_model_len = opts.device, opts.dtype, opts.max_model_len
    spec.tp_size = tensor_parallel_size(opts, spec)
    if spec.tp_size > 1 and os.environ.get("RANK", "0") != "0":
        from ..engine.tensor_parallel import run_torchrun_worker  # a torchrun rank other than 0: no server

        run_torchrun_worker(spec, opts.threads)
        return
    if opts.chat_template:
        spec.chat_template = str(opts.chat_template)
    if opts.perplexity:
        from ..evaluate import run_perplexity  # a measurement, no server

        run_perplexity(opts, spec)
        return
    if opts.interactive:
        from ..interactive import run_interactive  # the terminal chat replaces the HTTP server

        run_interactive(opts, spec)
        return
    from ..server.launch import run_server

    run_server(opts, spec)


def tensor_parallel_size(opts: GlobalOptions, spec: ModelSpec) -> int:
    """--tensor-parallel-size, or torchrun's world size; what cannot run split is refused here."""
    from ..terminal import fail

    size = opts.tensor_parallel_size
    world = os.environ.get("WORLD_SIZE") if "RANK" in os.environ else None
    if world is not None and world.isdigit():
        if size == 1:
            size = int(world)
        elif size != int(world):
            fail(f"--tensor-parallel-size {size} does not match torchrun's world size {world}; drop the option")
    if size == 1:
        return 1
    refused = [
        (spec.kind is ModelKind.XLORA, "x-lora-mistral (its scaling pass keeps per-sequence state)"),
        (opts.perplexity is not None, "--perplexity"),
        (opts.compile, "--compile"),
    ]
    for bad, what in refused:
        if bad:
            fail(
                f"--tensor-parallel-size {size} does not work with {what} yet; serve it in one process (drop the option)"
            )
    return size


from . import ordering as _ordering  # noqa: E402,F401 - registers the `ordering` command on `app`


def main() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app(prog_name="mistralrs")


if __name__ == "__main__":
    main()
