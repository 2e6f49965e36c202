"""`mistralrs ordering`: writes an X-LoRA ordering file (registered on the app in __init__)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from . import app


@app.command("ordering")
def ordering(
    adapters: Optional[str] = typer.Option(
        None,
        "--adapters",
        "-a",
        help="Adapter names (folder names) in training order, comma-separated "
        "(default: none; the loader then takes xlora_config.json's order).",
    ),
    model_id: Optional[str] = typer.Option(
        None,
        "--model-id",
        "-m",
        help="Model whose layers to count: directory, hub id or .gguf file (default: the embedded model).",
    ),
    num_layers: Optional[int] = typer.Option(
        None, "--num-layers", min=1, help="Decoder layer count instead of --model-id."
    ),
    target_modules: str = typer.Option(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "--target-modules",
        "-t",
        help="The adapters' target_modules, comma-separated.",
    ),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="File to write (default: standard output)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Hub revision of the model."),
):
    """Write an X-LoRA ordering file for a model (registration order of the wrapped linears, as PEFT)."""
    from ..lora.ordering import OrderingError, make_ordering

    names = [a.strip() for a in adapters.split(",") if a.strip()] if adapters else []
    targets = [t.strip() for t in target_modules.split(",") if t.strip()]
    try:
        if num_layers is None:
            from ..pipeline.base import LoadError
            from ..pipeline.xlora import num_layers_of

            try:
                num_layers = num_layers_of(model_id, revision)
            except LoadError as e:
                raise OrderingError(str(e)) from None
        made = make_ordering(num_layers, names, targets)
    except OrderingError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    if output is None:
        typer.echo(made.to_json(), nl=False)
    else:
        output.write_text(made.to_json())
        typer.echo(f"wrote {output}: {len(names)} adapters, {len(made.layers)} wrapped linears", err=True)
