"""Loader for `mistral`: HF safetensors checkpoints (local or hub), or the embedded GGUF dequantized."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..models.config import ConfigError, ModelConfig
from . import hub
from .base import LoadError, ModelSpec, Pipeline, quant_preference, resolve_device, resolve_dtype
from .tokenizer import load_hf_tokenizer
from .weights import build_empty, load_tensors, memory_bytes, open_safetensors, plan_shard, serving_length

# NOTE: checkpoint naming is data: transformers' names -> ours (we drop the `model.` prefix).
_PREFIX = "model."
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# NOTE: Mixtral's checkpoints name its experts' projections w1 (gate), w3 (up), w2 (down) under
# block_sparse_moe; ours (and Qwen3-MoE's) are mlp.experts.N.{gate,up,down}_proj and mlp.gate
_MIXTRAL = re.compile(r"\.block_sparse_moe\.(?:(gate)|experts\.(\d+)\.(w[123]))\.")
_W = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def hf_to_ours(name: str) -> str:
    name = name[len(_PREFIX) :] if name.startswith(_PREFIX) else name
    if ".block_sparse_moe." in name:
        name = _MIXTRAL.sub(lambda m: ".mlp.gate." if m[1] else f".mlp.experts.{m[2]}.{_W[m[3]]}.", name)
    return name


def load_plain(spec: ModelSpec, progress=None) -> Pipeline:
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.isq is not None and (spec.model_id is None or hub.resolve(spec.model_id, spec.revision).is_file()):
        raise LoadError(
            "--isq quantizes a safetensors checkpoint as it loads, and this model is a GGUF file (the embedded "
            "default is one), quantized already: serve it without --isq, or give --model-id a safetensors model"
        )
    if spec.model_id is None:
        from .gguf import load_gguf_file

        return load_gguf_file(
            hub.embedded_gguf_path(), spec, device, dtype, quantized=False, progress=progress, name=hub.EMBEDDED_NAME
        )
    path = hub.resolve(spec.model_id, spec.revision)
    if path.is_file():
        if path.suffix == ".gguf":
            from .gguf import load_gguf_file

            return load_gguf_file(path, spec, device, dtype, quantized=False, progress=progress, name=spec.model_id)
        raise LoadError(
            f"{path} is a file; `mistral` takes a model directory or hub id (use `gguf-mistral` for .gguf files)"
        )
    return load_safetensors_dir(path, spec, device, dtype, progress, name=spec.model_id)


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise LoadError(f"{path} has no config.json; is it a Hugging Face model directory?")
    try:
        return ModelConfig.from_hf(json.loads(cfg_file.read_text()))
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    except (KeyError, ValueError, TypeError) as e:
        raise LoadError(f"{cfg_file} is not a valid model config ({type(e).__name__}: {e})") from None


def safetensors_files(path: Path) -> list[Path]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise LoadError(
                f"{path} has only pickle weights ({', '.join(pickles[:3])}); they can run code when loaded and are "
                "refused. Convert them to safetensors (e.g. with transformers' save_pretrained(safe_serialization=True))"
            )
        raise LoadError(f"{path} has no *.safetensors weights")
    return files


def load_safetensors_dir(
    path: Path, spec: ModelSpec, device, dtype, progress=None, name: str | None = None
) -> Pipeline:
    cfg = read_config(path)
    files = safetensors_files(path)
    max_len = serving_length(spec, cfg)
    shard = plan_shard(spec, cfg)
    model = build_empty(cfg, max_len, dtype, shard)
    handles = [open_safetensors(f) for f in files]
    names = [(h, k) for h in handles for k in h.keys() if not k.endswith(_IGNORED_SUFFIXES)]
    task = progress.add_task("weights", total=len(names)) if progress else None

    def tensors():
        for h, k in names:
            # NOTE: get_tensor reads the memory-mapped bytes once; load_tensors casts/moves once.
            ours = hf_to_ours(k)
            yield (
                ours,
                (lambda h=h, k=k, ours=ours: h.get_tensor(k) if shard is None else _read_share(h, k, ours, shard)),
            )

    kinds: dict[str, int] = {}
    items = (
        tensors()
        if spec.isq is None
        else quantized_items(tensors(), cfg, spec.isq, dtype, device, kinds, quant_preference(spec, dtype))
    )
    load_tensors(model, items, dtype, device, on_tensor=lambda: progress and progress.advance(task))
    eos = list(cfg.eos_token_ids)
    gen = path / "generation_config.json"
    if gen.exists():
        g = json.loads(gen.read_text()).get("eos_token_id")
        eos += g if isinstance(g, list) else ([g] if g is not None else [])
    tok_dir = hub.resolve(spec.tokenizer_id, spec.revision, what="tokenizer") if spec.tokenizer_id else path
    tokenizer = load_hf_tokenizer(tok_dir, extra_eos_ids=eos)
    return Pipeline(
        name=name or str(path),
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        summary={
            "format": "safetensors"
            + (f" in-situ quantized: {', '.join(f'{k} x{n}' for k, n in sorted(kinds.items()))}" if kinds else ""),
            "params": cfg.num_parameters(),
            "weights_bytes": memory_bytes(model),
        },
    )


def _read_share(handle, key: str, ours: str, shard):
    """Tensor parallelism: reads only this rank's rows or columns of a tensor from the file."""
    rule = shard.rule(ours)
    if rule is None:
        return shard.take(ours, handle.get_tensor(key))
    axis, (a, b) = rule
    part = handle.get_slice(key)
    return part[a:b] if axis == 0 else part[:, a:b]


def quantized_items(tensors, cfg, isq: str, dtype, device, kinds: dict, prefer: str = "auto"):
    """--isq: each linear's weight (and its bias) becomes a quantized module as it is read, so only
    one dense weight is in memory at a time; norms and the embedding stay dense. An output head of
    its own is quantized to q8_0 whatever the type (as llama.cpp keeps it at 6 bits or more in its
    4-bit files: logits are the most sensitive); a head tied to the embedding stays the embedding."""
    pending = dict(tensors)  # NOTE: name -> a thunk; nothing is read yet
    for name in list(pending):
        if name not in pending or not (name.endswith("_proj.weight") or name == "lm_head.weight"):
            continue
        load = pending.pop(name)
        bias = pending.pop(name.removesuffix("weight") + "bias", None)
        head = name == "lm_head.weight"

        def module(load=load, bias=bias, head=head):
            return _isq_linear(load(), bias() if bias else None, isq, dtype, device, kinds, prefer, head=head)

        yield name.removesuffix(".weight"), module
    # NOTE: copies, so that nothing refers to the memory-mapped file once loading ends (its pages,
    # all read by the quantization, would otherwise stay resident with the mapping)
    for name, load in pending.items():
        yield name, (lambda load=load: load().clone())


def _isq_linear(w, bias, isq: str, dtype, device, kinds: dict, prefer: str = "auto", head: bool = False):
    from ..models.isq import isq_type, quantize, type_for
    from ..models.layers import Linear
    from ..models.quant import QuantLinear

    qtype = type_for(tuple(w.shape), isq_type("q8_0" if head else isq))
    if qtype is None:
        # NOTE: rows that do not split into whole blocks stay dense (the load line counts them)
        kinds["dense"] = kinds.get("dense", 0) + 1
        lin = Linear(w.shape[1], w.shape[0], bias=bias is not None, device="meta")
        lin.weight = torch.nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias.to(device=device, dtype=dtype), requires_grad=False)
        return lin
    raw = quantize(w, qtype)
    mod = QuantLinear.from_gguf(raw, qtype, tuple(w.shape), dtype, device, prefer=prefer, bias=bias, keep_raw=False)
    kinds[mod.kind] = kinds.get(mod.kind, 0) + 1
    return mod
