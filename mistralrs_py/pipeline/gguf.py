"""GGUF files: metadata -> config and tokenizer, tensors -> our parameters (dense or kept quantized)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from ..models.config import ConfigError, ModelConfig
from .base import LoadError, ModelSpec, Pipeline
from .weights import build_empty, load_tensors, memory_bytes

# NOTE: llama.cpp's tensor names -> ours; `{i}` is the layer index.
_GGUF_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.attn_q.bias": "layers.{i}.self_attn.q_proj.bias",
    "blk.{i}.attn_k.bias": "layers.{i}.self_attn.k_proj.bias",
    "blk.{i}.attn_v.bias": "layers.{i}.self_attn.v_proj.bias",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
}
_PATTERNS = [(re.compile("^" + re.escape(k).replace(r"\{i\}", r"(\d+)") + "$"), v) for k, v in _GGUF_NAMES.items()]
_IGNORED = {"rope_freqs.weight"}


def gguf_to_ours(name: str) -> str | None:
    for pat, ours in _PATTERNS:
        m = pat.match(name)
        if m:
            return ours.format(i=m.group(1)) if m.groups() else ours
    return None


def unpermute_rows(n_rows: int, n_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (interleaved rope pairs -> rotate-half).

    NOTE: llama.cpp's converter stores, per head, row 2j+i of the file as HF row i*hd/2+j
    (i in {0,1}); reading rows in this order gives the HF layout back, quantized rows included."""
    hd = n_rows // n_heads
    r = np.arange(n_rows)
    h, rem = r // hd, r % hd
    i, j = rem // (hd // 2), rem % (hd // 2)
    return h * hd + 2 * j + i


def read_fields(reader) -> dict:
    from .gguf_tokenizer import read_gguf_fields

    return read_gguf_fields(reader)


def open_gguf(path: Path):
    import gguf as gguflib

    try:
        return gguflib.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on bad files
        raise LoadError(f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def config_from_gguf(fields: dict, tensor_names: set[str], path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_gguf(fields, has_output_weight="output.weight" in tensor_names)
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{path}: GGUF metadata is incomplete ({type(e).__name__}: {e})") from None


def load_gguf_file(path: Path, spec: ModelSpec, device, dtype, *, quantized: bool, progress=None, name=None) -> Pipeline:
    from gguf.quants import dequantize

    reader = open_gguf(path)
    fields = read_fields(reader)
    tensors = {t.name: t for t in reader.tensors}
    cfg = config_from_gguf(fields, set(tensors), path)
    max_len = min(spec.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
    model = build_empty(cfg, max_len, dtype)
    todo = [(t, gguf_to_ours(n)) for n, t in tensors.items() if n not in _IGNORED]
    unknown = [t.name for t, ours in todo if ours is None]
    if unknown:
        raise LoadError(f"{path}: unexpected tensor {unknown[0]} for a {cfg.model_type} model")
    task = progress.add_task("weights", total=len(todo)) if progress else None

    def load_one(t, ours: str):
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne0 (columns) first
        raw = np.asarray(t.data)
        heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(ours.split(".")[-2])
        if heads is not None and ours.endswith("weight"):
            rows = unpermute_rows(shape[0], heads)
            raw = raw.reshape(shape[0], -1)[rows]
        elif heads is not None:  # bias
            raw = raw.reshape(shape[0])[unpermute_rows(shape[0], heads)]
        values = dequantize(raw, t.tensor_type).reshape(shape)
        return torch.tensor(np.asarray(values, dtype=np.float32))

    def items():
        for t, ours in todo:
            yield ours, (lambda t=t, ours=ours: load_one(t, ours))

    load_tensors(model, items(), dtype, device, on_tensor=lambda: progress and progress.advance(task))
    tokenizer = tokenizer_from_fields(fields, cfg, spec)
    return Pipeline(
        name=name or str(path),
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        summary={"format": f"gguf dequantized to {str(dtype).removeprefix('torch.')}", "params": cfg.num_parameters(),
                 "weights_bytes": memory_bytes(model)},
    )


def tokenizer_from_fields(fields: dict, cfg: ModelConfig, spec: ModelSpec):
    from .tokenizer import Tokenizer, load_hf_tokenizer

    if spec.tokenizer_id:
        from . import hub

        return load_hf_tokenizer(hub.resolve(spec.tokenizer_id, spec.revision, what="tokenizer"), cfg.eos_token_ids)
    from .gguf_tokenizer import tokenizer_from_gguf

    try:
        info = tokenizer_from_gguf(fields)
    except ValueError as e:
        raise LoadError(f"GGUF tokenizer: {e}; pass --tok-model-id with a tokenizer directory or hub id") from None
    return Tokenizer(
        info.tokenizer,
        bos_token=info.bos_token,
        eos_token=info.eos_token,
        chat_template=info.chat_template,
        add_bos=info.add_bos_token,
        extra_eos_ids=cfg.eos_token_ids,
    )
