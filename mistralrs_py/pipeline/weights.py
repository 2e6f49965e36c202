"""Materialising a `CausalLM` from named tensors without double copies.

The model is built on the meta device (no memory), then each parameter is assigned the loaded
tensor (cast once to the compute dtype and device); memory-mapped sources are read exactly once.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

from ..models.config import ModelConfig
from ..models.llama import CausalLM
from ..models.quant import QuantLinear
from .base import LoadError


def open_safetensors(path):
    """A safetensors file opened for reading (memory-mapped). NOTE: a file that only has the name
    (a download error page, a truncated copy, another format) is a one-line LoadError."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise LoadError(f"{path} is not a valid safetensors file ({e}); download or convert it again") from None


def serving_length(spec, cfg: ModelConfig) -> int:
    """--max-model-len, or the model's context; never more than the model was trained for."""
    if spec.max_model_len and spec.max_model_len > cfg.max_position_embeddings:
        import logging

        logging.getLogger("mistralrs.loader").warning(
            "--max-model-len %d is more than this model's context (%d); serving %d",
            spec.max_model_len,
            cfg.max_position_embeddings,
            cfg.max_position_embeddings,
        )
    return min(spec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)


def build_empty(cfg: ModelConfig, max_positions: int, dtype: torch.dtype, shard=None) -> CausalLM:
    """The model, or with tensor parallelism this rank's part of it (`shard`: models/tensor_parallel.py).
    NOTE: parameters on meta (no memory); the rotary tables are computed on the CPU and moved later."""
    if shard is not None:
        from ..models.tensor_parallel import local_config

        cfg = local_config(cfg, shard)
    return CausalLM(cfg, max_positions, device=torch.device("meta"), dtype=dtype, tp=shard)


def plan_shard(spec, cfg: ModelConfig):
    """This process's share of the model under tensor parallelism (spec.tp_size ranks), or None."""
    if spec.tp_size <= 1:
        return None
    from ..models.config import ConfigError
    from ..models.tensor_parallel import plan_shard as plan

    try:
        return plan(cfg, spec.tp_rank, spec.tp_size)
    except ConfigError as e:
        raise LoadError(str(e)) from None


def assign(model: nn.Module, name: str, value: Tensor | nn.Module) -> None:
    """Sets a parameter (from a tensor) or replaces a submodule (e.g. a quantized linear) by dotted name."""
    *path, leaf = name.split(".")
    owner = model
    for p in path:
        owner = getattr(owner, p)
    if isinstance(value, nn.Module):
        setattr(owner, leaf, value)
    else:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=False))


def load_tensors(
    model: CausalLM,
    tensors: Iterable[tuple[str, Callable[[], Tensor | nn.Module]]],
    dtype: torch.dtype,
    device: torch.device,
    on_tensor: Callable[[], None] = lambda: None,
) -> None:
    """tensors: (our parameter name, thunk loading it). Checks every parameter got a value."""
    expected = {n for n, _ in model.named_parameters()}
    seen: set[str] = set()
    for name, load in tensors:
        value = load()
        if isinstance(value, Tensor):
            target = _param(model, name)
            if target is None:
                raise LoadError(f"checkpoint tensor {name} has no place in the model")
            if tuple(value.shape) != tuple(target.shape):
                raise LoadError(
                    f"checkpoint tensor {name} has shape {tuple(value.shape)}, the config implies {tuple(target.shape)}"
                )
            value = value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
            seen.add(name)
        else:
            seen.update(f"{name}.{p}" for p, _ in _meta_params(model, name))
        assign(model, name, value)
        on_tensor()
    if model.cfg.tie_word_embeddings and "lm_head.weight" not in seen:
        if isinstance(model.embed_tokens, nn.Embedding):
            model.lm_head.weight = model.embed_tokens.weight
        seen.add("lm_head.weight")
    missing = sorted(expected - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoadError(f"checkpoint is missing {', '.join(missing[:3])}{more}")
    model.rotary.to(device)
    model.eval()


def _param(model: nn.Module, name: str) -> Tensor | None:
    try:
        return model.get_parameter(name)
    except AttributeError:
        return None


def _meta_params(model: nn.Module, module_name: str):
    try:
        return list(model.get_submodule(module_name).named_parameters())
    except AttributeError:
        return []


def memory_bytes(model: nn.Module) -> int:
    """Bytes held by the model's tensors: parameters, buffers, tensors kept as plain module
    attributes, and quantized layers' packed weights (held by their kernel), each storage once."""
    seen, total = set(), 0
    for m in model.modules():
        tensors = [
            *m._parameters.values(),
            *m._buffers.values(),
            *(v for v in vars(m).values() if isinstance(v, Tensor)),
        ]
        if isinstance(m, QuantLinear):
            tensors += m.kernel.tensors()
        for t in tensors:
            if t is None or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def release_memory() -> None:
    """Returns freed heap to the OS after loading, so RSS reflects the model. NOTE: gguf's reader
    builds ~150 MB of small objects for a 49k vocabulary, and load-time temporaries (dequantized
    rows, the parts of fused projections) leave holes that glibc keeps unless asked."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
