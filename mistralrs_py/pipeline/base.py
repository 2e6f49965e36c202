"""What a loaded model looks like to the engine, and how the CLI asks for one."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from ..models.config import ModelConfig
from ..models.layers import BatchView, static_decode_view

if TYPE_CHECKING:
    from rich.progress import Progress

    from ..models.llama import CausalLM
    from .tokenizer import Tokenizer


class ModelKind(str, enum.Enum):
    PLAIN = "mistral"
    GGUF = "gguf-mistral"
    XLORA = "x-lora-mistral"


class LoadError(Exception):
    """A model that cannot be loaded; str() is one line naming the problem and the fix."""


@dataclass
class ModelSpec:
    """Everything the CLI knows about the model to serve; the loaders turn it into a Pipeline."""

    kind: ModelKind = ModelKind.PLAIN
    model_id: str | None = None  # None: the embedded default model
    revision: str | None = None
    tokenizer_id: str | None = None
    quantized_model_id: str | None = None
    quantized_filename: str | None = None
    xlora_model_id: str | None = None
    order: str | None = None
    tgt_non_granular_index: int | None = None
    no_xlora_kv_cache: bool = False  # X-LoRA: rerun the scaling pass over the whole sequence instead of caching it
    isq: str | None = None  # in-situ quantization of a safetensors model's linears: q4_0 | q4_k | q8_0
    repeat_last_n: int = 64
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    chat_template: str | None = None  # a file overriding the model's template
    # NOTE: tensor parallelism: this process is rank tp_rank of tp_size, and loads its share only
    tp_rank: int = 0
    tp_size: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class Pipeline:
    """A loaded model: turns the tokens of a step into logits, reading and writing a cache pool."""

    name: str
    config: ModelConfig
    model: "CausalLM"
    tokenizer: "Tokenizer"
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    summary: dict = field(default_factory=dict)  # shown in the load line: format, params, memory...
    # NOTE: KV streams each sequence needs: 1, or 2 for X-LoRA (scaling pass + real pass). The
    # engine's pool allocates them together; forward() receives the pool and picks its streams.
    cache_streams: int = 1
    # NOTE: whether the keys a decode step computes for a token equal those a prompt computes for
    # it, so that blocks of generated tokens may serve later prompts from the prefix cache (a
    # multi-turn chat's previous answers). X-LoRA with --tgt-non-granular-index says no: its decode
    # steps reuse frozen scalings.
    caches_decoded_blocks: bool = True
    # NOTE: whether attention reads whole cache blocks, the positions not yet written masked (the
    # torch path: those must hold finite numbers, so blocks are zeroed when handed out), or only the
    # positions written (our fused CPU decode op)
    reads_whole_blocks: bool = True
    # NOTE: whether decode steps may run as captured CUDA graphs (static shapes, no host-side state
    # that changes per step). X-LoRA's two passes keep per-slot state: no.
    graphable: bool = True
    # NOTE: the KV cache pool class the engine makes for this pipeline (None: engine's KVCachePool);
    # tensor parallelism's rank 0 records the pool's operations for the other ranks
    pool_type: type | None = None

    # NOTE: --compile: decode-only steps (which the engine pads to batch buckets, engine/graphs.py)
    # run the model through torch.compile, one graph per bucket; steps with prompt tokens stay eager.
    compiled_decode: Callable | None = field(default=None, repr=False)

    def compile_decode(self) -> None:
        model, window = self.model, self.model.cfg.sliding_window

        def decode(
            input_ids: Tensor, positions: Tensor, slots: Tensor, tables: Tensor, mask: Tensor, logit_rows: Tensor, cache
        ) -> Tensor:
            # NOTE: the cache length reaches the graph only as a tensor size: Python ints (a view's
            # decode_len, block numbers) would be baked in as constants and every new value would
            # compile again. The window, block size and scratch block are fixed per model and pool.
            # On the CPU the graph calls our fused decode attention too (where the model's modules
            # were set to, use_cpu_kernels); it skips padding rows (the scratch block).
            view = static_decode_view(positions, slots, tables, mask, logit_rows, cache, window)
            return model(input_ids, view, cache)

        self.compiled_decode = torch.compile(decode)

    @property
    def held_config(self) -> ModelConfig:
        """The config of what this process holds: the model's, or under tensor parallelism its rank's
        share (its key/value heads size its KV cache)."""
        return getattr(self.model, "cfg", None) or self.config

    def network(self) -> nn.Module:
        """Every module this pipeline runs, under one root (X-LoRA adds its classifier)."""
        return self.model

    @torch.inference_mode()
    def forward(self, input_ids: Tensor, view: BatchView, cache) -> Tensor:
        if self.compiled_decode is not None and view.static:
            mask = view.decode_mask
            if mask.shape[-1] > 1:
                torch._dynamo.maybe_mark_dynamic(mask, 3)  # NOTE: one graph for every cache length
            return self.compiled_decode(
                input_ids, view.positions, view.decode_slots, view.decode_tables, mask, view.logit_rows, cache
            )
        return self.model(input_ids, view, cache)

    def begin_slot(self, slot: int, tokens: list[int] | None = None, cached_blocks: list[int] = ()) -> None:
        """Called by the engine when it gives `slot` to a sequence (admitted, or readmitted after a
        preemption) whose tokens are `tokens`: per-slot state of a pipeline starts afresh there.
        Its first positions may already be cached in `cached_blocks` (a prefix-cache hit, or the
        prompt of another choice of the same request): they are not computed again."""

    def reset_blocks(self, blocks: list[int]) -> None:
        """Called by the engine before a step with the cache blocks handed out since the last one:
        per-block state of a pipeline starts afresh there."""

    def close(self) -> None:
        """Called on the engine's thread when its loop ends: resources beyond this process (tensor
        parallelism's workers) are released."""

    def end_slot(self, slot: int) -> dict | None:
        """Called by the engine when the sequence that owned `slot` ends or is preempted, before the
        slot is freed: per-sequence extras to report (X-LoRA: mean scalings per adapter), or None."""
        return None


Loader = Callable[[ModelSpec, "Progress | None"], Pipeline]


def load_pipeline(spec: ModelSpec, progress=None) -> Pipeline:
    # NOTE: the loader modules are imported here, when a model is loaded, so `--help` never imports torch.
    from .gguf import load_quantized
    from .hf import load_plain
    from .xlora import load_xlora

    loaders: dict[ModelKind, Loader] = {
        ModelKind.PLAIN: load_plain,
        ModelKind.GGUF: load_quantized,
        ModelKind.XLORA: load_xlora,
    }
    if spec.kind not in loaders:
        raise LoadError(f"`{spec.kind.value}` is not built yet")
    started = time.perf_counter()
    pipeline = loaders[spec.kind](spec, progress)
    ok = False
    if pipeline.device.type == "cpu":
        from ..models import kernels

        # NOTE: builds our CPU kernels now (once per machine) rather than on the first request
        ok = kernels.available()
        pipeline.summary["kernels"] = "fused CPU kernels" if ok else f"torch ops only ({kernels.why_unavailable()})"
    if spec.kind in (ModelKind.PLAIN, ModelKind.GGUF):
        from ..models.fusion import fuse_linears
        from ..models.llama import fuse_projections
        from .weights import release_memory

        pipeline.summary["fused"] = fuse_projections(pipeline.model, fuse_linears)
        release_memory()
    from ..models.llama import use_cpu_kernels

    # NOTE: the one choice of kernels, made when every module exists (fused projections, X-LoRA's
    # wrapped linears and classifier): the modules' forwards read only their own flag.
    use_cpu_kernels(pipeline.network(), ok)
    pipeline.reads_whole_blocks = not ok
    pipeline.summary["load_seconds"] = time.perf_counter() - started
    return pipeline


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise LoadError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise LoadError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if name == "cpu":
        return torch.device("cpu")
    raise LoadError(f"--device {name!r} is not one of auto, cpu, cuda, cuda:N")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name in table:
        return table[name]
    if name != "auto":
        raise LoadError(f"--dtype {name!r} is not one of auto, float32, bfloat16, float16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    # NOTE: bf16 halves the bytes read per token; only worth it where the CPU has native bf16 dot
    # products (AVX512-BF16 / AMX), otherwise float32 is faster and exact.
    from ..models.kernels import native_bf16

    return torch.bfloat16 if native_bf16() else torch.float32


def quant_preference(spec: "ModelSpec", dtype: torch.dtype) -> str:
    """How quantized layers (GGUF blocks, --isq) are kept, as QuantLinear.from_gguf's `prefer`: an
    explicit `--dtype float32` asks for exact float32 math, so every layer is dequantized; otherwise
    the fastest kernel that keeps the blocks (in float32 too: the int8-activation kernels take
    float32 activations, as llama.cpp's CPU path does)."""
    return "dense" if dtype == torch.float32 and spec.dtype == "float32" else "auto"
