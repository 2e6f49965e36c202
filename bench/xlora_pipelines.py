"""The X-LoRA row of `make bench`: the demo X-LoRA checkpoint on the embedded model, and its base."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

from mistralrs_py.lora.demo import build_demo
from mistralrs_py.pipeline.base import ModelKind, ModelSpec, Pipeline, load_pipeline
from mistralrs_py.pipeline.hub import embedded_gguf_path


def bench_pipelines(
    dtype: str = "auto", device: str = "auto", quantized: bool = False, no_xlora_kv_cache: bool = False
) -> tuple[Pipeline, Pipeline]:
    """(X-LoRA pipeline, the same base without adapters) on the embedded SmolLM2.

    The X-LoRA side is the demo checkpoint (lora/demo.py: 3 random rank-8 adapters on all seven
    projections, layerwise 2-layer classifier), built in a temporary directory. quantized=True puts
    both on the GGUF base kept quantized (as `gguf-mistral`), else it is dequantized (as `mistral`).
    Both are loaded as served (load_pipeline: fused projections, the CPU kernels' choice)."""
    base_spec = ModelSpec(ModelKind.GGUF if quantized else ModelKind.PLAIN, dtype=dtype, device=device)
    with tempfile.TemporaryDirectory() as tmp:
        out = build_demo(Path(tmp) / "xlora-demo")
        spec = replace(
            base_spec,
            kind=ModelKind.XLORA,
            xlora_model_id=str(out),
            order=str(out / "ordering.json"),
            no_xlora_kv_cache=no_xlora_kv_cache,
            quantized_filename=str(embedded_gguf_path()) if quantized else None,
        )
        xl = load_pipeline(spec)
    return xl, load_pipeline(base_spec)
