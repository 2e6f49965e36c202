"""One config dataclass for the Mistral/Llama decoder family, read from HF config.json or GGUF metadata.

The family's members differ in data, not code: Llama and Mistral (sliding window), Qwen2/2.5 (biases
on q, k and v), Qwen3 (an RMSNorm per head on q and k before rope), and the mixtures of experts
Mixtral and Qwen3-MoE (each layer's MLP is `num_experts` MLPs and a router that picks
`num_experts_per_tok` of them per token)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
# NOTE: llama.cpp's converter permutes q/k rows into its interleaved rope layout for these archs only
# (the Qwen converters keep the HF rotate-half layout)
GGUF_PERMUTED_QK = ("llama", "mistral", "mixtral")
# llama.cpp's architecture names -> ours (Mixtral is `llama` with expert tensors)
GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config this implementation cannot serve; the message names the value and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope_scaling: {"rope_type": "linear"|"llama3", "factor": ..., ...} or None
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q, k, v and o
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3)
    mlp_bias: bool = False
    # NOTE: mixture of experts (0: a dense MLP): every layer routes each token to the top
    # num_experts_per_tok of num_experts MLPs of moe_intermediate_size, weighted by the router's
    # softmax (renormalised over the chosen ones with norm_topk_prob, as Mixtral always does)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of num_key_value_heads={self.num_kv_heads}"
            )

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_parameters(self) -> int:
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.num_heads * self.head_dim * 2 + h * self.kv_dim * 2
        if self.attention_bias or self.qkv_bias:
            attn += self.num_heads * self.head_dim + 2 * self.kv_dim + (h if self.attention_bias else 0)
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * h * i if not self.num_experts else self.num_experts * (3 * h * self.moe_intermediate_size + h)
        layer = attn + mlp + 2 * h
        return self.num_layers * layer + v * h * (1 if self.tie_word_embeddings else 2) + h

    # ---- readers -------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any]) -> "ModelConfig":
        """Reads a transformers config.json dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or []
            raise ConfigError(
                f"unsupported architecture model_type={model_type!r} {archs}; "
                f"this server runs {', '.join(SUPPORTED_MODEL_TYPES)} models"
            )
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"unsupported hidden_act={act!r}; only 'silu' (SwiGLU) is implemented")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        rope_params = dict(cfg.get("rope_parameters") or {})
        rope_theta = float(rope_params.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        scaling = cfg.get("rope_scaling") or rope_params or None
        scaling = _normalise_rope_scaling(scaling)
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        sliding = cfg.get("sliding_window") if model_type in ("mistral", "mixtral") else None
        if cfg.get("use_sliding_window") is False:
            sliding = None
        moe = {}
        if model_type == "mixtral":
            experts = int(cfg["num_local_experts"])
            moe = dict(num_experts_per_tok=int(cfg.get("num_experts_per_tok", 2)), norm_topk_prob=True)
            moe.update(num_experts=experts, moe_intermediate_size=int(cfg["intermediate_size"]))
        elif model_type == "qwen3_moe":
            if int(cfg.get("decoder_sparse_step", 1)) != 1 or cfg.get("mlp_only_layers"):
                raise ConfigError(
                    "a qwen3_moe model with dense layers among the expert ones (decoder_sparse_step != 1 or "
                    "mlp_only_layers) is not supported"
                )
            # NOTE: `num_experts` on the hub; transformers 5 writes `num_local_experts`
            experts = cfg.get("num_experts") or cfg["num_local_experts"]
            moe = dict(num_experts=int(experts), num_experts_per_tok=int(cfg["num_experts_per_tok"]))
            moe.update(
                moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            )
        if model_type in ("qwen2", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
            raise ConfigError(
                f"use_sliding_window=true on a {model_type} model (a window on some layers only) is not supported; "
                "set it to false in config.json to serve the model with full attention"
            )
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            sliding_window=int(sliding) if sliding else None,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            qkv_bias=model_type == "qwen2",
            qk_norm=model_type in ("qwen3", "qwen3_moe"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            **moe,
            model_type=model_type,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=tuple(int(e) for e in eos_ids),
        )

    @classmethod
    def from_gguf(
        cls, fields: Mapping[str, Any], *, has_output_weight: bool, tensor_names: frozenset[str] = frozenset()
    ) -> "ModelConfig":
        """Reads llama.cpp's GGUF metadata keys (`{arch}.block_count`, ...); which optional tensors
        exist (q/k/v biases, q/k norms) comes from `tensor_names`."""
        arch = fields.get("general.architecture")
        if arch not in GGUF_ARCHS:
            shown = repr(arch)[:40] + ("..." if len(repr(arch)) > 40 else "")
            raise ConfigError(f"unsupported GGUF architecture {shown}; this server runs {', '.join(GGUF_ARCHS)} models")

        def get(key: str, default: Any = None) -> Any:
            return fields.get(f"{arch}.{key}", default)

        hidden = int(get("embedding_length"))
        heads = int(get("attention.head_count"))
        kv_heads = get("attention.head_count_kv", heads)
        vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens") or [])
        head_dim = int(get("attention.key_length") or get("rope.dimension_count") or hidden // heads)
        scaling = None
        if get("rope.scaling.type") in ("linear",) and get("rope.scaling.factor"):
            scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
        eos = fields.get("tokenizer.ggml.eos_token_id")
        sliding = get("attention.sliding_window")
        model_type, moe = GGUF_ARCHS[arch], {}
        experts = int(get("expert_count", 0) or 0)
        if experts:
            # NOTE: llama.cpp renormalises the chosen experts' weights for both (Mixtral, Qwen3-MoE)
            moe_ff = int(get("expert_feed_forward_length") or get("feed_forward_length"))
            moe = dict(num_experts=experts, num_experts_per_tok=int(get("expert_used_count")))
            moe.update(moe_intermediate_size=moe_ff, norm_topk_prob=True)
            model_type = "mixtral" if arch == "llama" else model_type
        return cls(
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length") or moe.get("moe_intermediate_size", 0)),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_position_embeddings=int(get("context_length", 4096)),
            sliding_window=int(sliding) if sliding else None,
            tie_word_embeddings=not has_output_weight,
            attention_bias="blk.0.attn_output.bias" in tensor_names,
            qkv_bias="blk.0.attn_q.bias" in tensor_names and "blk.0.attn_output.bias" not in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            model_type=model_type,
            **moe,
            bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=(int(eos),) if eos is not None else (),
        )


def _normalise_rope_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    s = dict(scaling)
    rope_type = s.pop("rope_type", None) or s.pop("type", None) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if rope_type == "default":
        return None
    s["rope_type"] = rope_type
    return s
