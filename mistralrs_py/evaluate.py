"""`mistralrs --perplexity FILE <subcommand>`: the model's perplexity over a text file, and with
--kl-divergence its distance from a float32 run of the same weights (engine/perplexity.py), printed
in llama-perplexity's terms. No server starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from rich.markup import escape


def run_perplexity(opts, spec) -> None:
    from .terminal import console, fail, model_label, progress_bar, setup_logging

    setup_logging()
    try:
        text = Path(opts.perplexity).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"--perplexity {opts.perplexity}: cannot read it ({type(e).__name__}: {e})")
    import torch

    from .engine.perplexity import measure
    from .pipeline.base import LoadError, load_pipeline

    if opts.threads:
        torch.set_num_threads(opts.threads)
    try:
        with progress_bar() as bar:
            bar.add_task(f"loading {model_label(spec)}", total=None)
            pipe = load_pipeline(spec, bar)
            # NOTE: the reference: the same weights in float32, the exact path (dequantized GGUF blocks)
            ref = load_pipeline(dataclasses.replace(spec, dtype="float32"), bar) if opts.kl_divergence else None
    except LoadError as e:
        fail(str(e))
    ids = pipe.tokenizer.encode(text, add_special_tokens=False)
    console.print(f"{escape(pipe.name)}: {escape(str(pipe.summary.get('format', '')))}", highlight=False)
    try:
        report = measure(pipe, ids, opts.ppl_context, ref)
    except ValueError as e:
        fail(f"--perplexity {opts.perplexity}: {e}")
    for line in report.lines():
        print(line)
