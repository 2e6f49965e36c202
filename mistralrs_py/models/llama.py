"""The Mistral/Llama decoder, written for the engine's cache: tokens of many sequences in one step.

One implementation serves Llama-layout models (SmolLM2, TinyLlama, Llama 2/3), Mistral
(sliding-window attention) and Qwen2/2.5/3 (q/k/v biases, per-head q/k norms): what differs is in
the config (models/config.py), not in copies of the decoder. Linear layers are `layers.Linear` (an nn.Linear) by default; loaders may replace
them with quantized or LoRA-wrapped modules that have the same call signature.

Our fused CPU ops (models/csrc, built by kernels.py) are chosen once, when the model is loaded:
`use_cpu_kernels(model, enabled)` sets the plain attribute `cpu_ops` on every module whose class
declares one (Linear, RMSNorm, Attention, MLP, CausalLM here; XLoraLinear in lora/). A forward then
tests its own `cpu_ops` (and the shapes and dtypes the op takes), never module-level state.
NOTE: an attribute rather than gpt-fast's swap of module classes: loaders and X-LoRA replace and
wrap modules by type (fusion, quantized layers, the adapters' wrapper), and one flag per module
keeps those types unchanged; torch.compile treats the flag as a constant of the module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lora.linear import Scalings, project
from . import kernels
from .config import ModelConfig
from .layers import BatchView, Linear, RMSNorm, Rotary, apply_rotary, attend, decode_attention_cpu
from .quant import QuantLinear

if TYPE_CHECKING:
    from .tensor_parallel import Shard


class Attention(nn.Module):
    cpu_ops: bool = False  # decode rows through our fused op (decode_attention_cpu)

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(bias=cfg.attention_bias or cfg.qkv_bias, device=device, dtype=dtype)
        self.q_proj = Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, **kw)
        self.k_proj = Linear(cfg.hidden_size, cfg.kv_dim, **kw)
        self.v_proj = Linear(cfg.hidden_size, cfg.kv_dim, **kw)
        self.o_proj = Linear(
            cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.attention_bias, device=device, dtype=dtype
        )
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections(): q, k, v in one matmul
        # NOTE: Qwen3: an RMSNorm over each head of q and of k, before rope (transformers' names)
        self.q_norm = self.k_norm = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, device=device, dtype=dtype)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        view: BatchView,
        lora: Scalings | None = None,
    ) -> Tensor:
        # x: [N, D]; lora: the pass's X-LoRA scalings, for the projections the adapters wrap
        n, H, Hk, hd = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x) if lora is None else project(self.qkv_proj, x, lora)  # [N, (H + 2 Hk) hd]
            qk = qkv[:, : (H + Hk) * hd].view(n, H + Hk, hd)
            v = qkv[:, (H + Hk) * hd :].view(n, Hk, hd)
        elif lora is None:
            qk = torch.cat([self.q_proj(x).view(n, H, hd), self.k_proj(x).view(n, Hk, hd)], dim=1)
            v = self.v_proj(x).view(n, Hk, hd)
        else:
            q, k = project(self.q_proj, x, lora).view(n, H, hd), project(self.k_proj, x, lora).view(n, Hk, hd)
            qk = torch.cat([q, k], dim=1)
            v = project(self.v_proj, x, lora).view(n, Hk, hd)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, :H].contiguous()), self.k_norm(qk[:, H:].contiguous())], dim=1)
        # qk: [N, H + Hk, hd] before rope; v: [N, Hk, hd]
        # NOTE: the fused op wants float32 rope tables (CausalLM.hidden_states makes them so)
        if self.cpu_ops and view.num_decode:
            o = decode_attention_cpu(qk[:, :H], qk[:, H:], v, cos, sin, k_cache, v_cache, view)  # [B, H, hd]
            if view.num_decode < n:
                qk = apply_rotary(qk, cos.to(qk.dtype), sin.to(qk.dtype))
                pre = attend(qk[:, :H], qk[:, H:], v, k_cache, v_cache, view, skip_decode=True)
                o = torch.cat([o, pre], dim=0)
        else:
            qk = apply_rotary(qk, cos, sin)  # one rope for q and k
            o = attend(qk[:, :H], qk[:, H:], v, k_cache, v_cache, view)  # [N, H, hd]
        o = o.reshape(n, H * hd)
        return self.o_proj(o) if lora is None else project(self.o_proj, o, lora)


class MLP(nn.Module):
    cpu_ops: bool = False  # our fused silu(gate) * up

    def __init__(self, cfg: ModelConfig, device=None, dtype=None, intermediate: int | None = None):
        super().__init__()
        kw = dict(bias=cfg.mlp_bias, device=device, dtype=dtype)
        inter = intermediate or cfg.intermediate_size
        self.gate_proj = Linear(cfg.hidden_size, inter, **kw)
        self.up_proj = Linear(cfg.hidden_size, inter, **kw)
        self.down_proj = Linear(inter, cfg.hidden_size, **kw)

        self.gate_up_proj: nn.Module | None = None  # set by fuse_projections()

    def forward(self, x: Tensor, lora: Scalings | None = None) -> Tensor:
        # x: [N, D] -> [N, D]; lora: the pass's X-LoRA scalings, for the projections the adapters wrap
        if self.gate_up_proj is not None:
            gate_up = self.gate_up_proj(x) if lora is None else project(self.gate_up_proj, x, lora)  # [N, 2 I]
            if self.cpu_ops:
                h = torch.ops.mistralrs.silu_mul(gate_up)
            else:
                gate, up = gate_up.chunk(2, dim=-1)
                h = F.silu(gate).mul_(up)
        elif lora is None:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        else:
            h = F.silu(project(self.gate_proj, x, lora)) * project(self.up_proj, x, lora)
        # h: [N, I]
        return self.down_proj(h) if lora is None else project(self.down_proj, h, lora)


class MoE(nn.Module):
    """A mixture of experts (Mixtral, Qwen3-MoE): the router (`gate`) scores the experts per token,
    each token goes to its top `num_experts_per_tok` MLPs, and their outputs are summed weighted by
    the router's softmax (renormalised over the chosen ones with `norm_topk_prob`).

    NOTE: batched per expert, not per token: the step's (token, choice) pairs are sorted by expert
    and every expert runs once on all of its tokens (one host read of the counts per layer); an
    expert is an MLP, so quantized (GGUF) and fused (gate/up) experts take the same kernels as
    dense layers."""

    def __init__(self, cfg: ModelConfig, device=None, dtype=None):
        super().__init__()
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False, device=device, dtype=dtype)
        self.experts = nn.ModuleList(
            MLP(cfg, device=device, dtype=dtype, intermediate=cfg.moe_intermediate_size) for _ in range(cfg.num_experts)
        )

    def forward(self, x: Tensor, lora: Scalings | None = None) -> Tensor:
        # x: [N, D] -> [N, D]
        probs = torch.softmax(self.gate(x).float(), dim=-1)  # [N, E], float32 as transformers'
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [N, k]
        if self.norm_topk:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype).flatten()
        order = chosen.flatten().argsort(stable=True)  # the (token, choice) pairs by expert
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts)).tolist()
        out = torch.zeros_like(x)
        start = 0
        for expert, n in zip(self.experts, counts):
            if n:
                pairs = order[start : start + n]
                tokens = pairs // self.top_k
                out.index_add_(0, tokens, expert(x[tokens]) * weights[pairs, None])
                start += n
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, device=None, dtype=None, tp: "Shard | None" = None):
        super().__init__()
        self.tp = tp  # NOTE: tensor parallelism: this rank's share (models/tensor_parallel.py), or None
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.self_attn = Attention(cfg, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.mlp = MoE(cfg, device, dtype) if cfg.num_experts else MLP(cfg, device=device, dtype=dtype)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
        view: BatchView,
        lora: Scalings | None = None,
    ) -> Tensor:
        a = self.self_attn(self.input_layernorm(x), cos, sin, k_cache, v_cache, view, lora)
        if self.tp is not None:
            a = self.tp.all_reduce(a)  # NOTE: o_proj is row-parallel: each rank holds a partial sum
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x), lora)
        if self.tp is not None:
            m = self.tp.all_reduce(m)  # down_proj (every expert's) is row-parallel too
        return x + m


class CausalLM(nn.Module):
    """Parameter names follow transformers' `LlamaForCausalLM` (minus the `model.` prefix), so an HF
    state dict loads with one prefix strip."""

    cpu_ops: bool = False  # float32 rope tables for the fused decode attention; float32 logits from our kernels

    def __init__(self, cfg: ModelConfig, max_positions: int, device=None, dtype=None, tp: "Shard | None" = None):
        super().__init__()
        # NOTE: with tensor parallelism, `cfg` is this rank's part (tensor_parallel.local_config):
        # its heads, intermediate rows and vocabulary rows; `tp` says which and reduces across ranks
        self.cfg, self.tp = cfg, tp
        # NOTE: passing the (empty) weight skips nn.Embedding's random init; on the meta device that
        # init would import torch's Python decompositions (~70 MB resident) for nothing.
        self.embed_tokens = nn.Embedding(
            cfg.vocab_size,
            cfg.hidden_size,
            _weight=torch.empty((cfg.vocab_size, cfg.hidden_size), device=device, dtype=dtype),
        )
        self.layers = nn.ModuleList(DecoderLayer(cfg, device=device, dtype=dtype, tp=tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, device=device, dtype=dtype)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, device=device, dtype=dtype)
        self.max_positions = max_positions
        self.rotary = Rotary(cfg, max_positions, device=None if device == torch.device("meta") else device)

    def hidden_states(
        self, input_ids: Tensor, view: BatchView, cache: "KVLayers", lora: Scalings | None = None
    ) -> Tensor:
        # input_ids: [N] -> final-norm hidden states [N, D]. lora: X-LoRA scalings of this pass
        # (models/xlora.py), None for the plain model
        x = self.embed_tokens(input_ids) if self.tp is None else self.tp.embed(self.embed_tokens, input_ids)
        # NOTE: the fused CPU op applies rope in float32 from float32 tables (no rounding on the way);
        # use_cpu_kernels sets this model's choice and its attention modules' together
        cos, sin = self.rotary.tables(view.positions, torch.float32 if self.cpu_ops and view.num_decode else x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache.k[i], cache.v[i], view, lora)
        return self.norm(x)

    def forward(self, input_ids: Tensor, view: BatchView, cache: "KVLayers", lora: Scalings | None = None) -> Tensor:
        # -> logits [S, V] in float32 for the rows in view.logit_rows
        h = self.hidden_states(input_ids, view, cache, lora)
        logits = self.logits(h[view.logit_rows])
        return logits if self.tp is None else self.tp.gather_logits(logits)

    def logits(self, h: Tensor) -> Tensor:
        # h: [S, D] -> [S, V] float32. NOTE: on the CPU our kernels return the head's float32
        # accumulators: bf16 output would round each logit to 8 bits (a step of 0.125 at 20), which
        # ties or swaps near-equal top tokens; on the embedded model it flips greedy answers.
        head = self.lm_head
        if self.cpu_ops:
            if isinstance(head, QuantLinear):
                return head.forward_f32(h)
            if isinstance(head, nn.Linear) and h.dtype == head.weight.dtype:
                return torch.ops.mistralrs.linear(h, head.weight, head.bias, True)
        return head(h).float()


def fuse_projections(model: CausalLM, fuse) -> int:
    """Replaces q/k/v and gate/up by single modules where `fuse(modules)` can build one (it returns
    None when it cannot, e.g. mixed quantization types). Fewer, larger matmuls per layer: decode on
    small models is bound by per-op overhead as much as by bytes. Returns how many were fused."""
    n = 0
    for layer in model.layers:
        attn = layer.self_attn
        fused = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        if fused is not None:
            attn.qkv_proj, n = fused, n + 1
            del attn.q_proj, attn.k_proj, attn.v_proj
        for mlp in layer.mlp.experts if isinstance(layer.mlp, MoE) else [layer.mlp]:
            fused = fuse([mlp.gate_proj, mlp.up_proj])
            if fused is not None:
                mlp.gate_up_proj, n = fused, n + 1
                del mlp.gate_proj, mlp.up_proj
    return n


def use_cpu_kernels(model: nn.Module, enabled: bool) -> int:
    """Chooses, once, whether the modules of `model` run our fused CPU ops: sets `cpu_ops` on every
    module whose class declares it. Returns how many modules were set.

    NOTE: call it when the modules are final (after fuse_projections and any X-LoRA wrapping):
    a module made later keeps its class default, torch's ops. `enabled` needs the kernels built
    (kernels.available()) and the model on the CPU: the ops exist for the CPU only."""
    if enabled and not kernels.available():
        raise RuntimeError(f"our CPU kernels are not available: {kernels.why_unavailable()}")
    n, wide = 0, enabled and kernels.wide_vectors()
    for m in model.modules():
        if hasattr(type(m), "cpu_ops"):
            # NOTE: dense projections take our matrix-vector kernel only where it is vectorised
            m.cpu_ops = wide if type(m) is Linear else enabled
            n += 1
    return n


class KVLayers:
    """Anything with per-layer cache tensors `k[i]`, `v[i]` of shape [slots, Hk, P, hd]."""

    k: list[Tensor]
    v: list[Tensor]
