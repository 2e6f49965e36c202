"""GGUF files: metadata -> config and tokenizer, tensors -> our parameters (dense or kept quantized)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..models.config import GGUF_PERMUTED_QK, ConfigError, ModelConfig
from . import gguf_cache, hub
from .base import LoadError, ModelSpec, Pipeline, quant_preference, resolve_device, resolve_dtype
from .weights import build_empty, load_tensors, memory_bytes, plan_shard, release_memory, serving_length

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
    "blk.{i}.attn_output.bias": "layers.{i}.self_attn.o_proj.bias",
    "blk.{i}.attn_q_norm.weight": "layers.{i}.self_attn.q_norm.weight",
    "blk.{i}.attn_k_norm.weight": "layers.{i}.self_attn.k_norm.weight",
    "blk.{i}.ffn_norm.weight": "layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "layers.{i}.mlp.down_proj.weight",
    # mixtures of experts: the router, and every expert's projection in one [experts, out, in] tensor
    "blk.{i}.ffn_gate_inp.weight": "layers.{i}.mlp.gate.weight",
    "blk.{i}.ffn_gate_exps.weight": "layers.{i}.mlp.experts.*.gate_proj.weight",
    "blk.{i}.ffn_up_exps.weight": "layers.{i}.mlp.experts.*.up_proj.weight",
    "blk.{i}.ffn_down_exps.weight": "layers.{i}.mlp.experts.*.down_proj.weight",
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


def load_quantized(spec: ModelSpec, progress=None) -> Pipeline:
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.quantized_model_id is None and spec.quantized_filename is None:
        return load_gguf_file(
            hub.embedded_gguf_path(), spec, device, dtype, quantized=True, progress=progress, name=hub.EMBEDDED_NAME
        )
    path = resolve_gguf(spec.quantized_model_id, spec.quantized_filename, spec.revision)
    return load_gguf_file(
        path, spec, device, dtype, quantized=True, progress=progress, name=spec.quantized_model_id or path.stem
    )


def resolve_gguf(model_id: str | None, filename: str | None, revision: str | None) -> Path:
    """-f PATH.gguf alone; -m DIR [-f NAME]; or -m org/repo -f NAME (downloaded with huggingface_hub)."""
    if filename and model_id is None:
        p = Path(filename).expanduser()
        if not p.is_file():
            raise LoadError(f"GGUF file {filename} does not exist; pass a .gguf path or --quantized-model-id with it")
        return p
    assert model_id is not None
    local = Path(model_id).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if filename:
            p = local / filename
            if not p.is_file():
                raise LoadError(f"{p} does not exist")
            return p
        found = sorted(local.glob("*.gguf"))
        if len(found) != 1:
            names = ", ".join(f.name for f in found[:5]) or "none"
            raise LoadError(
                f"{local} holds {len(found)} .gguf files ({names}); choose one with --quantized-filename/-f"
            )
        return found[0]
    if hub.looks_like_path(model_id):
        raise LoadError(f"model path {model_id} does not exist; pass an existing directory or a hub id like org/name")
    if not filename:
        raise LoadError(
            f"{model_id} is a hub repo: name the file in it with --quantized-filename/-f (e.g. model.Q4_K_M.gguf)"
        )
    return hub.download_file(model_id, filename, revision)


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    qtype: int  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # torch order: (rows, columns)
    data: np.ndarray  # the tensor's bytes, uint8, memory-mapped
    offset: int  # of those bytes in the file


def read_gguf(path: Path) -> tuple[dict, list[GGUFTensor]]:
    """Metadata as plain values and memory-mapped tensor bytes.

    NOTE: the gguf reader is dropped (and its heap returned) before any weight is allocated: it
    holds ~150 MB of small objects for a 49k vocabulary, which would otherwise pin heap pages."""
    cached = gguf_cache.load_metadata(path)
    if cached is not None:
        fields, infos, start, align = cached
    else:
        fields, infos, start, align = _parse_gguf(path)
        gguf_cache.save_metadata(path, fields, infos, start, align)
    size = path.stat().st_size
    whole = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = []
    end_of_previous, previous = start, None
    # NOTE: a writer places every tensor at a multiple of general.alignment inside the data section,
    # one after the other; an offset off that grid, or into another tensor, means the file is corrupt
    # (or crafted): reading it anyway would load garbage weights.
    for name, qtype, shape, offset, n in sorted(infos, key=lambda t: t[3]):
        if offset < 0 or n < 0 or offset + n > size:
            raise LoadError(f"{path}: tensor {name} lies past the end of the file (truncated or corrupt GGUF)")
        if (offset - start) % align:
            raise LoadError(f"{path}: tensor {name} is not aligned to {align} bytes (corrupt GGUF)")
        if offset < end_of_previous:
            raise LoadError(f"{path}: tensors {previous} and {name} overlap (corrupt GGUF)")
        end_of_previous, previous = offset + n, name
        tensors.append(GGUFTensor(name, qtype, shape, whole[offset : offset + n], offset))
    return fields, tensors


def _parse_gguf(path: Path):
    from .gguf_tokenizer import read_gguf_fields

    reader = open_gguf(path)
    fields = read_gguf_fields(reader)
    infos = [
        (
            t.name,
            int(t.tensor_type),
            tuple(int(d) for d in reversed(t.shape.tolist())),
            int(t.data_offset),
            int(t.n_bytes),
        )
        for t in reader.tensors
    ]  # GGUF lists ne0 (columns) first
    start, align = int(reader.data_offset), int(reader.alignment)
    del reader
    release_memory()
    return fields, infos, start, align


def open_gguf(path: Path):
    import gguf as gguflib

    try:
        return gguflib.GGUFReader(str(path))
    except Exception as e:  # the gguf package raises ValueError/IndexError/struct errors on bad files
        raise LoadError(
            f"{path} is not a readable GGUF file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def config_from_gguf(fields: dict, tensor_names: set[str], path: Path) -> ModelConfig:
    try:
        return ModelConfig.from_gguf(
            fields, has_output_weight="output.weight" in tensor_names, tensor_names=frozenset(tensor_names)
        )
    except ConfigError as e:
        raise LoadError(f"{path}: {e}") from None
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{path}: GGUF metadata is incomplete ({type(e).__name__}: {e})") from None


def load_gguf_file(
    path: Path, spec: ModelSpec, device, dtype, *, quantized: bool, progress=None, name=None
) -> Pipeline:
    """Dense: every tensor dequantized to `dtype`. Quantized: linear layers and the embedding keep
    the file's blocks (models/quant_kernels.py picks a kernel per type); norms are dense."""
    fields, tensor_list = read_gguf(path)
    tensors = {t.name: t for t in tensor_list}
    cfg = config_from_gguf(fields, set(tensors), path)
    max_len = serving_length(spec, cfg)
    shard = plan_shard(spec, cfg)
    model = build_empty(cfg, max_len, dtype, shard)
    todo = [(t, gguf_to_ours(n)) for n, t in tensors.items() if n not in _IGNORED]
    unknown = [t.name for t, ours in todo if ours is None]
    if unknown:
        raise LoadError(f"{path}: unexpected tensor {unknown[0]} for a {cfg.model_type} model")
    todo = [part for t, ours in todo for part in _per_expert(t, ours, path)]
    unsupported = sorted({_type_name(t.qtype) for t, _ in todo if t.qtype not in _supported()})
    if unsupported:
        raise LoadError(
            f"{path}: unsupported GGUF tensor type {', '.join(unsupported)}; supported: "
            + ", ".join(sorted(_type_name(q) for q in _supported()))
        )
    task = progress.add_task("weights", total=len(todo)) if progress else None
    raw_of = {ours: (t, _raw_rows(t, ours, cfg)) for t, ours in todo}
    if shard is not None:
        raw_of = {ours: _share(t, raw, ours, shard) for ours, (t, raw) in raw_of.items()}
    kinds: dict[str, int] = {}
    prefer = quant_preference(spec, dtype)
    # NOTE: weights our quantized matmuls use, packed by an earlier load of this file (gguf_cache)
    variant = f"{dtype}|{prefer}" + (f"|rank {shard.rank} of {shard.world}" if shard is not None else "")
    packed = gguf_cache.load_packed(path, variant) if quantized and device.type == "cpu" else None
    made: dict[str, tuple] = {}

    def dense(ours: str):
        from ..models.ggml_blocks import dequantize

        t, raw = raw_of[ours]
        return dequantize(raw, t.qtype, t.shape)

    def module(ours: str):
        from ..models.quant import QuantEmbedding, QuantLinear

        t, raw = raw_of[ours]
        if ours == "embed_tokens.weight":
            mod = QuantEmbedding.from_gguf(raw, t.qtype, t.shape, dtype, device)
            kinds[f"embedding {_type_name(t.qtype)}"] = 1
            return mod
        bias = raw_of.get(ours.removesuffix("weight") + "bias")
        bias_t = dense(ours.removesuffix("weight") + "bias") if bias else None
        mod = _packed_linear(ours.removesuffix(".weight"), packed, made, dtype, bias_t) or QuantLinear.from_gguf(
            raw, t.qtype, t.shape, dtype, device, prefer=prefer, bias=bias_t, keep_raw=False
        )
        _remember(ours.removesuffix(".weight"), mod, made)
        kinds[mod.kind] = kinds.get(mod.kind, 0) + 1
        return mod

    def items():
        for t, ours in todo:
            if quantized and ours.endswith("weight") and len(t.shape) == 2:
                yield ours.removesuffix(".weight"), (lambda ours=ours: module(ours))
            elif quantized and ours.endswith("_proj.bias"):
                continue  # NOTE: folded into its QuantLinear above
            else:
                yield ours, (lambda ours=ours: dense(ours))
        if quantized and cfg.tie_word_embeddings:
            # NOTE: a tied head reads the embedding's blocks through a matmul kernel of its own.
            yield "lm_head", (lambda: _tied_head(model, kinds, prefer, packed, made, dtype))

    load_tensors(model, items(), dtype, device, on_tensor=lambda: progress and progress.advance(task))
    if packed is None and made:
        gguf_cache.save_packed(path, variant, made)
    tokenizer = tokenizer_from_fields(fields, cfg, spec)
    if name == hub.EMBEDDED_NAME and not spec.tokenizer_id:
        from .chat_template import bundled_template

        # NOTE: the embedded model's own template has no tools; ours renders the same text without
        # them (a test compares the two) and shows them the Hermes way
        tokenizer.chat_template = bundled_template("smollm2-tools")
    file_type = sorted({_type_name(t.qtype) for t, ours in todo if len(t.shape) == 2})
    fmt = f"gguf {'/'.join(file_type)} " + (
        "quantized: " + ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))
        if quantized
        else f"dequantized to {str(dtype).removeprefix('torch.')}"
    )
    emb = tensors.get("token_embd.weight")
    if quantized and emb is not None and device.type == "cpu":
        _remap_embedding(model, path, emb, shard.vocab if shard is not None else (0, emb.shape[0]))
    # NOTE: the closures above hold these: emptied rather than deleted, the same memory goes back
    for held in (tensors, tensor_list, todo, raw_of):
        held.clear()
    emb = None
    release_memory()  # NOTE: load-time temporaries (fp32 dequantized rows) go back to the OS
    return Pipeline(
        name=name or str(path),
        config=cfg,
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        device=device,
        max_model_len=max_len,
        summary={
            "format": fmt,
            "params": cfg.num_parameters(),
            "weights_bytes": memory_bytes(model),
            "file_bytes": path.stat().st_size,
        },
    )


def _per_expert(t: GGUFTensor, ours: str, path: Path) -> list[tuple[GGUFTensor, str]]:
    """An experts tensor [E, out, in] as E weights [out, in] (their bytes are consecutive)."""
    if ".experts.*." not in ours:
        return [(t, ours)]
    if len(t.shape) != 3:
        raise LoadError(f"{path}: {t.name} should be [experts, out, in], it is {list(t.shape)}")
    E, per = t.shape[0], t.data.shape[0] // t.shape[0]
    return [
        (
            GGUFTensor(f"{t.name}[{j}]", t.qtype, t.shape[1:], t.data[j * per : (j + 1) * per], t.offset + j * per),
            ours.replace("*", str(j)),
        )
        for j in range(E)
    ]


def _remap_embedding(model, path: Path, t: GGUFTensor, rows_held: tuple[int, int]) -> None:
    """Points the quantized embedding at a fresh memory map of its own bytes in the file.

    NOTE: like llama.cpp's mmap: loading touched every page of the file (all of them count as
    resident while that mapping lives); a fresh mapping of the table alone is resident only for the
    rows that lookups actually touch, and the rest of the file is unmapped."""
    import warnings

    a, b = rows_held  # NOTE: tensor parallelism: the vocabulary rows this rank holds
    row_bytes = t.data.shape[0] // t.shape[0]
    rows = np.memmap(path, dtype=np.uint8, mode="r", offset=t.offset + a * row_bytes, shape=((b - a) * row_bytes,))
    with warnings.catch_warnings():  # read-only memory map; never written
        warnings.simplefilter("ignore")
        raw = torch.from_numpy(rows).view(b - a, -1)
    model.embed_tokens.raw = raw


def _supported() -> frozenset[int]:
    from ..models.ggml_blocks import GGML_SUPPORTED

    return GGML_SUPPORTED


def _type_name(qtype: int) -> str:
    import gguf as gguflib

    return gguflib.GGMLQuantizationType(qtype).name


def _raw_rows(t: GGUFTensor, ours: str, cfg: ModelConfig) -> np.ndarray:
    """The tensor's bytes with q/k rows put back in HF order (works on quantized rows too)."""
    shape = t.shape
    raw = t.data
    heads = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}.get(ours.split(".")[-2])
    if heads is not None and cfg.model_type in GGUF_PERMUTED_QK:
        rows = unpermute_rows(shape[0], heads)
        raw = raw.reshape(shape[0], -1)[rows] if len(shape) == 2 else raw.reshape(shape[0])[rows]
    return raw


def _share(t: GGUFTensor, raw: np.ndarray, ours: str, shard) -> tuple[GGUFTensor, np.ndarray]:
    """Tensor parallelism: this rank's rows or columns of a tensor's bytes (models/tensor_parallel.py).
    Columns are cut between quantization blocks; where a cut would fall inside one (a head boundary
    that is not a multiple of the block size), that tensor's share is dequantized to float32."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    rule = shard.rule(ours)
    f32 = int(GGMLQuantizationType.F32)
    if rule is None:
        if shard.is_row_parallel_bias(ours) and shard.rank:
            zeros = np.zeros(4 * int(np.prod(t.shape)), np.uint8)
            return GGUFTensor(t.name, f32, t.shape, zeros, t.offset), zeros
        return t, raw
    axis, (a, b) = rule
    bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType(t.qtype)]
    if len(t.shape) == 1:
        if a % bs or b % bs:
            raise LoadError(f"{t.name}: a {t.shape[0]}-value vector in blocks of {bs} cannot be split at {a}..{b}")
        part = raw.reshape(-1)[a // bs * ts : b // bs * ts]
        return GGUFTensor(t.name, t.qtype, (b - a,), part, t.offset), part
    N, K = t.shape
    rows = raw.reshape(N, -1)
    if axis == 0:
        part = rows[a:b]
        return GGUFTensor(t.name, t.qtype, (b - a, K), part.reshape(-1), t.offset), part.reshape(-1)
    if a % bs == 0 and b % bs == 0:
        part = np.ascontiguousarray(rows.reshape(N, K // bs, ts)[:, a // bs : b // bs]).reshape(-1)
        return GGUFTensor(t.name, t.qtype, (N, b - a), part, t.offset), part
    from ..models.ggml_blocks import dequantize

    dense = dequantize(raw, t.qtype, t.shape)[:, a:b].contiguous().numpy().view(np.uint8).reshape(-1)
    return GGUFTensor(t.name, f32, (N, b - a), dense, t.offset), dense


def _tied_head(model, kinds: dict, prefer: str, packed: dict | None, made: dict, dtype):
    # NOTE: the output head tolerates per-row int8 (llama.cpp also rounds activations to 8 bits
    # for its Q8_0 dot products); a dense bf16 copy of a large vocabulary would double its memory.
    head = _packed_linear("lm_head", packed, made, dtype, None) or model.embed_tokens.as_linear(
        prefer="fast" if prefer == "auto" else prefer, keep_raw=False
    )
    _remember("lm_head", head, made)
    kinds[f"tied head {head.kind}"] = 1
    return head


def _packed_linear(name: str, packed: dict | None, made: dict, dtype, bias):
    """The layer from an earlier load's packed weights (gguf_cache), or None."""
    if not packed or name not in packed:
        return None
    from ..models.quant import QuantLinear
    from ..models.quant_kernels import Qmm

    qs, d, mw, bits, kind = packed[name]
    return QuantLinear(Qmm(qs, d, mw, bits, dtype, kind), bias)


def _remember(name: str, mod, made: dict) -> None:
    from ..models.quant_kernels import Qmm

    k = mod.kernel
    if isinstance(k, Qmm):
        made[name] = (k.qs, k.d, k.mw, k.bits, k.kind)


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
