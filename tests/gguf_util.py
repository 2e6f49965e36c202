"""Writes a tiny HF checkpoint (from tests/conftest.make_tiny_model) to GGUF the way llama.cpp's
converter does: llama metadata, a gpt2/BPE tokenizer, q/k rows permuted, tensors quantized with
gguf.quants."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp convert_hf_to_gguf: per head, rotate-half rows become interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


LAYER.update({"mlp.gate.weight": "ffn_gate_inp.weight", "block_sparse_moe.gate.weight": "ffn_gate_inp.weight"})
# an expert's projection (Qwen3-MoE's names, Mixtral's) -> the [experts, out, in] tensor it goes into
EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
EXPS = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps"}
EXPS.update({"down_proj": "ffn_down_exps", "w2": "ffn_down_exps"})


def gguf_name(hf: str) -> str:
    if hf in NAMES:
        return NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{LAYER[rest]}"


def stack_experts(tensors: dict) -> dict:
    """HF tensors with each layer's experts stacked as llama.cpp stores them: name -> array, GGUF names."""
    out, experts = {}, {}
    for name, arr in tensors.items():
        m = EXPERT.match(name)
        if m:
            experts.setdefault(f"blk.{m[1]}.{EXPS[m[3]]}.weight", {})[int(m[2])] = arr
        else:
            out[gguf_name(name)] = arr
    for name, parts in experts.items():
        out[name] = np.stack([parts[j] for j in sorted(parts)])
    return out


def write_gguf(hf_dir: Path, out: Path, qtypes=(Q.Q4_0, Q.Q4_1, Q.Q8_0)) -> Path:
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    # NOTE: llama.cpp writes Mistral and Mixtral as llama, and permutes q/k rows for llama only
    arch = {"mistral": "llama", "mixtral": "llama", "qwen3_moe": "qwen3moe"}.get(cfg["model_type"], cfg["model_type"])
    w = GGUFWriter(str(out), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_name("tiny")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg["hidden_size"] // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_parameters", {}).get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    if cfg["model_type"] in ("mistral", "mixtral") and cfg.get("sliding_window"):
        w.add_sliding_window(cfg["sliding_window"])
    experts = cfg.get("num_local_experts") or cfg.get("num_experts")
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        if cfg.get("moe_intermediate_size"):
            w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
    # tokenizer: byte-level BPE with merges, special tokens as control tokens
    vocab = dict(tok["model"]["vocab"])
    for a in tok["added_tokens"]:
        vocab[a["content"]] = a["id"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in specials else 1 for t in tokens])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab[tcfg["bos_token"]])
    w.add_eos_token_id(vocab[tcfg["eos_token"]])
    w.add_add_bos_token(False)
    w.add_chat_template(tcfg["chat_template"])
    tensors = load_file(str(next(hf_dir.glob("*.safetensors"))))
    for name in tensors:
        arr = tensors[name].astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            arr = permute(arr, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            arr = permute(arr, kv)
        tensors[name] = arr
    for i, (name, arr) in enumerate(sorted(stack_experts(tensors).items())):
        if arr.ndim >= 2 and not name.endswith("ffn_gate_inp.weight"):
            qt = qtypes[i % len(qtypes)]
            w.add_tensor(name, quants.quantize(arr, qt), raw_dtype=qt)
        else:  # NOTE: norms and the router stay float32, as llama.cpp's converter keeps them
            w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ---- hand-made (possibly malformed) files ----------------------------------------------------------
def _gguf_str(s: bytes, declared_len: int | None = None) -> bytes:
    import struct

    return struct.pack("<Q", len(s) if declared_len is None else declared_len) + s


def raw_gguf(
    kvs: list[bytes], tensors: list[tuple[str, list[int], int, int]], data: bytes = b"", alignment: int = 32
) -> bytes:
    """A GGUF v3 file from pre-encoded key/value records and (name, dims, ggml type, offset) infos."""
    import struct

    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs)
    for name, dims, qtype, offset in tensors:
        out += _gguf_str(name.encode()) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", qtype, offset)
    out += b"\0" * (-len(out) % alignment)
    return out + data


def kv_str(key: str, value: bytes, declared_len: int | None = None) -> bytes:
    import struct

    return _gguf_str(key.encode()) + struct.pack("<I", 8) + _gguf_str(value, declared_len)


def kv_u32(key: str, value: int) -> bytes:
    import struct

    return _gguf_str(key.encode()) + struct.pack("<II", 4, value)


def kv_str_array(key: str, items: list[bytes], declared_count: int | None = None) -> bytes:
    import struct

    n = len(items) if declared_count is None else declared_count
    return _gguf_str(key.encode()) + struct.pack("<IIQ", 9, 8, n) + b"".join(_gguf_str(i) for i in items)
